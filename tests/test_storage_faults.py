"""A real storage fault under the engine: a full disk.

The ledger lives on a small tmpfs mounted for the test (CI runs as root), so
SQLite meets the same errors it would on a real full or read-only disk.
"""

from __future__ import annotations

import os
import subprocess
from typing import Iterator

import pytest

from balancesim import errors
from balancesim.reports import verify
from tests.conftest import TIMEOUT_S, new_user


@pytest.fixture
def small_disk(tmp_path) -> Iterator[str]:
    mount_point = str(tmp_path / "disk")
    os.mkdir(mount_point)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mount_point], check=True)
    yield mount_point
    subprocess.run(["umount", "-l", mount_point], check=True)


def fill(directory: str) -> str:
    filler = os.path.join(directory, "filler")
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_fails_the_mutation_keeps_memory_equal_to_the_ledger_and_recovers(make_engine, small_disk):
    engine = make_engine(path=os.path.join(small_disk, "ledger.db"))
    alice = new_user(engine, "alice", usdt="100")
    before = engine.balance(alice)
    filler = fill(small_disk)
    for _ in range(20):
        with pytest.raises(errors.StorageUnavailable):
            engine.withdraw(alice, "1", description="x" * 400).get(timeout=TIMEOUT_S)
    assert engine.balance(alice) == before
    os.remove(filler)
    after = engine.withdraw(alice, "100").get(timeout=TIMEOUT_S)["transaction"]
    assert (after["version"], after["balance_after"]) == (2, "0")
    engine.stop()
    assert verify(os.path.join(small_disk, "ledger.db")).ok

"""Helpers shared by the benchmarks: CPU pinning, peak RSS, a JSON last line."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from typing import Any

__all__ = ["pin_to_one_core", "peak_rss_mb", "emit", "run_self"]


def pin_to_one_core() -> None:
    """Pin this process (and every thread it starts later) to its first allowed CPU."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def peak_rss_mb() -> float:
    """The process's peak resident set size in MiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def emit(result: dict[str, Any]) -> None:
    """Print the machine-readable last line."""
    print(json.dumps(result), flush=True)


def run_self(script: str, *args: str) -> dict[str, Any]:
    """Run ``script`` in a fresh interpreter and return its last line as JSON."""
    out = subprocess.run(
        [sys.executable, script, *args], check=True, capture_output=True, text=True
    ).stdout
    for line in out.splitlines()[:-1]:
        print("   ", line)
    return json.loads(out.splitlines()[-1])

"""A child of ``serve --workers`` dies with its parent, however the parent dies.

The parent keeps the write end of a pipe and never writes; each child gets the read end
(its number in ``BALANCESIM_WATCHDOG_FD``) and blocks reading it on a thread. The read
returns end-of-file only when every write end is closed, which the kernel does when the
parent exits, SIGKILL included. ``PR_SET_PDEATHSIG`` would not do: it fires when the
*thread* that forked the child ends, not the process.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

__all__ = ["WATCHDOG_FD_ENV", "LISTEN_FDS_ENV", "watch_parent", "die_with_parent_preexec"]

log = logging.getLogger(__name__)

WATCHDOG_FD_ENV = "BALANCESIM_WATCHDOG_FD"
LISTEN_FDS_ENV = "BALANCESIM_LISTEN_FDS"

# After SIGTERM to itself, how long a child whose parent is gone may take to drain
# before it exits anyway: an orphan must not keep the port, a ledger or Redis for long.
ORPHAN_GRACE_S = 5.0


def watch_parent() -> bool:
    """When started by ``serve`` (the variable is set), stop this process once the parent
    is gone: SIGTERM to itself (the usual drain), then ``os._exit`` after a grace period.
    Whether a watchdog was set up."""
    raw = os.environ.pop(WATCHDOG_FD_ENV, None)
    if raw is None:
        return False
    fd = int(raw)

    def watch() -> None:
        try:
            while os.read(fd, 64):
                pass  # the parent never writes; anything read is ignored
        except OSError:
            pass
        log.warning("the serve process that started this one is gone: stopping")
        os.kill(os.getpid(), signal.SIGTERM)
        threading.Timer(ORPHAN_GRACE_S, os._exit, args=(70,)).start()

    threading.Thread(target=watch, name="watchdog", daemon=True).start()
    return True


def die_with_parent_preexec(parent_pid: int) -> None:
    """For a child that cannot watch a pipe (``redis-server``): ``PR_SET_PDEATHSIG``.

    Only sound when the forking thread lives as long as the process: the supervisor
    starts Redis from its main thread, which ends only when the process does.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

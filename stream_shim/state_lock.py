"""One process per state directory: an exclusive ``flock`` on ``<state_dir>/lock``."""

from __future__ import annotations

__all__ = ["ShimAlreadyRunningError", "take_state_lock"]

import fcntl
import os
from pathlib import Path
from typing import IO

from workflow.core.exceptions import RetriableError


class ShimAlreadyRunningError(RetriableError, RuntimeError):
    """Another shim, fan-out or worker holds this state directory."""


def take_state_lock(state_dir: Path, who: str) -> IO[str]:
    """Lock ``state_dir`` for this process (held while the returned file stays open).

    Parameters
    ----------
    state_dir : `pathlib.Path`
        The state directory (created if missing).
    who : `str`
        What runs there, for the error (``stream shim``, ``fan-out``, ...).

    Raises
    ------
    ShimAlreadyRunningError
        If another process holds the lock.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    lock_file = open(state_dir / "lock", "w")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        raise ShimAlreadyRunningError(f"another {who} runs with state directory {state_dir}") from None
    lock_file.write(str(os.getpid()))
    lock_file.flush()
    return lock_file

"""A thread's name where the system shows it (``top -H``, ``ps -L``,
/proc/PID/task/TID/comm, the benchmarks' CPU per thread): Python does not
pass thread names on (before 3.14)."""

from __future__ import annotations

import ctypes
import ctypes.util

_PR_SET_NAME = 15


def name_os_thread(name: bytes) -> None:
    """Give the calling thread ``name`` (at most 15 bytes are kept)."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl(_PR_SET_NAME, name, 0, 0, 0)
    except (OSError, AttributeError, TypeError):
        pass  # not Linux, or no libc: only the name is missing

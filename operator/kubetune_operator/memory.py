"""Keep the operator's resident memory close to what it holds.

glibc gives every thread that allocates its own malloc arena (up to 8 per
core), and the API and storage thread pools each parse JSON in theirs: freed
memory then stays resident, spread over arenas that are never full. Two arenas
are plenty for threads that mostly wait on sockets. Bursts (an initial listing
of a thousand jobs, a thousand creates) leave freed pages behind too;
`malloc_trim` hands them back to the kernel.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from typing import Optional

log = logging.getLogger("kubetune.operator")

M_ARENA_MAX = -8  # glibc's mallopt parameter number
ARENAS = 2
TRIM_SECONDS = 10.0


def _libc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 - glibc only (musl has neither call)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def limit_arenas() -> bool:
    """Call before the thread pools start threads. False where libc is not glibc."""
    libc = _libc()
    return bool(libc and libc.mallopt(M_ARENA_MAX, ARENAS))


async def trim_periodically(every: float = TRIM_SECONDS) -> None:
    libc = _libc()
    if libc is None:
        return
    while True:
        await asyncio.sleep(every)
        libc.malloc_trim(0)

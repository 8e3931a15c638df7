"""How every relay process runs: its event loop (uvloop or asyncio's), and one allocator setting.

The allocator setting, for large messages: glibc serves blocks above ``M_MMAP_THRESHOLD`` (128 KiB at first) with their own mmap, given
back to the kernel on free. But the threshold is dynamic: the first time such a block is
freed, glibc raises the threshold to its size, so after the first 10 MB message every later
10 MB buffer comes from the heap of the thread that allocated it, and stays in the process's
RSS after it is freed (a heap only shrinks from its top). Setting the threshold explicitly
turns the adjustment off: buffers above 1 MiB (message bodies being received, not the spool's
256 KB chunks nor a 100 KB message) are mmapped and returned at once, and a growing receive
buffer is moved by ``mremap`` rather than copied. Measured in bench/README.md ("Large messages").
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import platform

log = logging.getLogger("relay")

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
LARGE_BLOCK = 1 << 20  # bytes: blocks from this size are mmapped and given back when freed


def return_large_blocks_to_the_os(threshold: int = LARGE_BLOCK) -> bool:
    """Fix glibc's mmap threshold at ``threshold``; False (and nothing done) on another C library."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        done = ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, threshold) == 1
    except (OSError, AttributeError):  # a static or unusual build without mallopt
        done = False
    if not done:
        log.warning("could not set glibc's mmap threshold: freed large messages may stay in memory")
    return done


def run_event_loop(main, choice: str = "auto"):
    """Run ``main`` on ``server.event_loop``: uvloop (``auto`` when installed) or asyncio's loop.

    Every relay process (the server and its acceptors) starts here, so the allocator setting
    for large messages is made here too, before any message is read.
    """
    return_large_blocks_to_the_os()
    if choice == "asyncio":
        return asyncio.run(main)
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit("server.event_loop: uvloop is not installed (pip install uvloop)") from None
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)

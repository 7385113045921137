"""Process-wide settings of ``securechat server``: how the C allocator gives memory back.

glibc's malloc serves a request of 128 KiB or more with a private mmap and
unmaps it at ``free``, but every time it frees such a block it raises that
threshold to the block's size (up to 32 MiB), and its heap trim threshold
to twice that. A password check needs a 19 MiB Argon2id buffer: after the
first one, the next ones come from the heap of the worker thread's malloc
arena and stay there when freed, 19 MiB or more per arena that ever hashed,
kept while the server idles. :func:`tune_allocator` sets the threshold
explicitly, which also turns that adjustment off: blocks of
:data:`MMAP_THRESHOLD` or more always come from mmap and go back to the
system at ``free``. The price: each password check maps and faults in its
19 MiB anew, which costs CPU where page faults are slow (figures in
docs/security.md, "Memory"). Elsewhere than glibc nothing is changed.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("securechat.process")

MMAP_THRESHOLD = 1024 * 1024
_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h


def tune_allocator() -> bool:
    """Make glibc's malloc return large freed blocks at once; False where it is not glibc.

    Called once where the server starts. The setting is process-wide and
    applies to every thread, including those that already exist.
    """
    try:
        libc_version = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        libc_version = None
    if not libc_version:
        log.debug("not glibc: allocator settings left as they are")
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.debug("%s without mallopt: allocator settings left as they are", libc_version)
        return False
    mallopt.restype, mallopt.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_int]
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        log.warning("%s refused M_MMAP_THRESHOLD=%d", libc_version, MMAP_THRESHOLD)
        return False
    log.debug(
        "%s: blocks of %d KiB or more are returned at free", libc_version, MMAP_THRESHOLD >> 10
    )
    return True

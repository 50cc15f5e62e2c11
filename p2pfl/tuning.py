"""Process limits for a node daemon (heap settings: fltasks/malloc.py)."""

from __future__ import annotations

# Enough for every peer connection, stream, status client and checkpoint file of a
# busy node; the usual soft default (1024, or 256 on some systems) is not.
OPEN_FILES_WANTED = 65536


def raise_open_file_limit() -> int:
    """Raise the soft limit on open files toward the hard one; returns the new soft limit.

    An idle daemon uses about 11 descriptors, but every connection, stream and
    status client holds one, and running out (``EMFILE``) made checkpoint
    writes fail (measured at a soft limit of 256).
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_WANTED)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        return wanted
    return soft

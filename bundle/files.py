"""Writing files so that a crash never leaves half of one: :func:`atomic_path`, used for datalists and checkpoints."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside ``path`` to write to; when the block ends without error, it replaces ``path``
    atomically (``os.replace``), so a crash never leaves half a file and readers see the old file or the new one.

    The folder is created; temporary files of ``path`` left by killed processes of this host are removed (the name
    holds host and pid, so writers on several nodes of a shared disk never collide); on error the temporary file is
    removed and ``path`` is left as it was. The file gets the permissions ``open`` gives a new file.

    Example:
        >>> with atomic_path("runs/datalist.json") as tmp:  # doctest: +SKIP
        ...     tmp.write_text(text)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().replace("-", "_")  # several nodes may write beside each other on a shared disk
    tmp = path.with_name(f".{path.name}.tmp-{host}-{os.getpid()}")
    for stale in path.parent.glob(f".{path.name}.tmp-{host}-*"):  # left by a run on this host killed while writing
        if stale != tmp and not _pid_alive(stale.name.rsplit("-", 1)[-1]):
            stale.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the write failed


def _pid_alive(pid: str) -> bool:
    """Whether the process that owns a temporary file (its name ends with the pid) still runs."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True

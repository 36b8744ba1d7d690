"""File locks: whether a run may start beside another on the same outputs (never what it writes)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def exclusive(path: Path, busy: str) -> Iterator[None]:
    """Hold the file lock ``path`` for the block, or refuse at once with ``busy`` (:class:`coin.errors.Busy`, a
    RuntimeError the flows never retry) while another process holds it. The OS releases the lock when its holder
    dies, so a killed run leaves nothing to clean up."""
    from filelock import FileLock, Timeout

    from coin.errors import Busy

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise Busy(busy) from None
    try:
        yield
    finally:
        lock.release()

"""Atomic file writes: a reader sees the old file or the whole new one, never half of one."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

from parity.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str, flag: Optional[str] = None, durable: bool = False) -> Iterator[str]:
    """A temporary path beside `path` that replaces `path` only when the block succeeds.

    The temporary name keeps `path`'s suffix (np.save and np.savez would otherwise append
    one) and is created with the usual permissions. `durable` fsyncs before the rename,
    for checkpoints that must survive a machine crash, not only a killed process.
    `flag` names the option the path came from, for the error when its directory is missing.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f'{flag + " " if flag else ""}{path}: directory {directory} does not exist')
    tmp = os.path.join(directory, f'.tmp-{os.getpid()}-{os.path.basename(path)}')
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str, text: str, flag: Optional[str] = None) -> None:
    """Writes `text` to `path` atomically."""
    with atomic_path(path, flag) as tmp:
        with open(tmp, 'w') as f:
            f.write(text)

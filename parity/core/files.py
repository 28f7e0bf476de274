"""Atomic file writes: a reader sees the old file or the whole new one, never half of one."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

from parity.core.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str, flag: Optional[str] = None, durable: bool = False) -> Iterator[str]:
    """A temporary path beside `path` that replaces `path` only when the block succeeds.

    The temporary name keeps `path`'s suffix (np.save and np.savez would otherwise append
    one) and is created with the usual permissions. `durable` fsyncs before the rename,
    for checkpoints that must survive a machine crash, not only a killed process.
    `flag` names the option the path came from, for the error when its directory is missing.
    """
    directory = check_directory(path, flag)
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


def check_directory(path: str, flag: Optional[str] = None) -> str:
    """The directory `path` would be written in; a one-line error when it does not exist."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f'{flag + " " if flag else ""}{path}: directory {directory} does not exist')
    return directory


def write_text(path: str, text: str, flag: Optional[str] = None) -> None:
    """Writes `text` to `path` atomically."""
    with atomic_path(path, flag) as tmp:
        with open(tmp, 'w') as f:
            f.write(text)

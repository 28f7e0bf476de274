"""One writer per workdir: an exclusive lock file that says who holds it.

`train` (and any command that owns a folder for a long time) holds `DIR/.lock` for as
long as it runs. The lock is the operating system's (`flock`), so it goes with the
process however that ends, SIGKILL included: a lock file left by a dead process is
stale and simply taken over. The file records the holder (PID, host, start time, the
command), so a second writer is refused with one line that names the first. On file
systems without `flock` the record alone decides: a holder on this host that no longer
runs is stale; one on another host is trusted.

The holder removes the file when it is done, while still holding the lock; whoever
opened the old file meanwhile notices that its lock is on a file no longer at that
path, and tries again.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Optional

from parity.core.errors import UserError
from parity.core.files import process_alive, write_error

LOCK_NAME = '.lock'


class WorkdirLock:
    """`with WorkdirLock(DIR, '--workdir'):` holds DIR/.lock exclusively, or raises one `UserError` naming the
    holder."""

    def __init__(self, directory: str, flag: str = '--workdir'):
        self.directory, self.flag = directory, flag
        self.path = os.path.join(directory, LOCK_NAME)
        self._fd: Optional[int] = None
        self.took_over: Optional[dict] = None  # the record of a dead holder whose lock this one took

    def __enter__(self) -> 'WorkdirLock':
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise write_error(self.path, e, self.flag) from None
            try:
                locked = self._lock(fd)
            except BaseException:
                os.close(fd)
                raise
            if not locked:
                holder = _read(fd)
                os.close(fd)
                raise UserError(f'{self.flag} {self.directory} is in use by {describe_holder(holder)}; wait for it to '
                                f'finish or stop it, or use another {self.flag}')
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed this file as we locked it: lock the new one
        previous = _read(fd)
        if previous:
            self.took_over = previous
        record = {'pid': os.getpid(), 'host': socket.gethostname(), 'started': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
                  'command': _command()[:500]}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + '\n').encode(), 0)
        except OSError as e:
            os.close(fd)
            raise write_error(self.path, e, self.flag) from None
        self._fd = fd

    def _lock(self, fd: int) -> bool:
        """True when this process now holds the lock."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        # No flock here (some network file systems): the record decides.
        holder = _read(fd)
        return not holder or not _alive(holder)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass  # the directory went away, or is read-only now: the lock still ends with the process
        os.close(self._fd)
        self._fd = None


def _command() -> str:
    """This process's command line as typed: `python -m vit_jax train ...` rather than a __main__.py path."""
    argv = list(sys.argv)
    if argv and os.path.basename(argv[0]) == '__main__.py':
        argv[0] = f'python -m {os.path.basename(os.path.dirname(argv[0]))}'
    return ' '.join(argv)


def _read(fd: int) -> Optional[dict]:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode('utf-8', 'replace') or 'null')
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _alive(holder: dict) -> bool:
    """Whether the recorded holder may still run: another host's cannot be checked, so it may."""
    if holder.get('host') != socket.gethostname():
        return True
    return process_alive(holder.get('pid'))


def describe_holder(holder: Optional[dict]) -> str:
    """A lock record in words: `PID 123 on HOST since ... (command)`."""
    if not holder:
        return 'another process (it has not recorded itself yet)'
    what = f'PID {holder.get("pid")} on {holder.get("host")}'
    if holder.get('started'):
        what += f' since {holder["started"]}'
    if holder.get('command'):
        what += f' ({holder["command"][:120]})'
    return what

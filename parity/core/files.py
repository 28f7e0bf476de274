"""Atomic file writes: a reader sees the old file or the whole new one, never half of one.

Every output of every command goes through `atomic_path` (one file) or `AtomicFiles`
(a folder's worth, renamed into place together at the end). The operating system's
refusals (a directory where a file should go, a read-only folder, a full disk, a file
size limit) become one `UserError` naming the path and what to do, and the temporary
is removed. `refuse_overwrite` keeps an output from replacing one of the inputs.
Temporaries are named `.tmp-PID-NAME`, beside the file they become (`TEMPORARY`).

JSON files go through `read_json` / `read_json_object` (size-checked, one line for any
file that is not what it should be) and `write_json`; `record_differences` compares a
record read back (a run's run.json, a sweep's sweep.json) with what this command would write.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import resource
from typing import Iterator, Mapping, Optional, Sequence

from parity.core.errors import UserError
from parity.core.limits import check_text

TEMPORARY = re.compile(r'^\.tmp-(\d+)-')  # what a temporary's name starts with: `.tmp-PID-`

# What to tell people for the errors a write can meet.
_ADVICE = {
    errno.ENOSPC: 'the disk is full; free space, or write somewhere else',
    errno.EDQUOT: 'the disk quota is exhausted; free space, or write somewhere else',
    errno.EFBIG: 'the file would pass a file-size limit (ulimit -f); raise the limit, or write somewhere else',
    errno.EROFS: 'the file system is read-only; write somewhere else',
    errno.EACCES: 'permission denied; write somewhere you may write',
    errno.EPERM: 'permission denied; write somewhere you may write',
    errno.EISDIR: 'it is a directory; name a file',
    errno.ENOTDIR: 'a part of the path is not a directory',
    errno.ENAMETOOLONG: 'the name is too long',
}


WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})  # only a write meets these


def write_error(path: str, e: OSError, flag: Optional[str] = None) -> UserError:
    """An OSError met while writing `path`, as one line that says what to do."""
    why = _ADVICE.get(e.errno, f'{e.strerror or type(e).__name__}; pick another place')
    return UserError(f'{flag + " " if flag else ""}{path}: cannot write it: {why}')


def stopped_write(path: str, tmp: str, flag: Optional[str] = None) -> UserError:
    """A writer that failed without an errno (torch.save raises RuntimeError): the likely cause, as `write_error`."""
    size = os.path.getsize(tmp) if os.path.exists(tmp) else 0
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and size >= limit - (1 << 16):
        code = errno.EFBIG
    else:
        fs = os.statvfs(os.path.dirname(os.path.abspath(tmp)))
        code = errno.ENOSPC if fs.f_bavail * fs.f_frsize < (1 << 20) else errno.EIO
    return write_error(path, OSError(code, os.strerror(code)), flag)


def check_output(path: str, flag: Optional[str] = None) -> str:
    """A path a file may be written to: its directory exists, it is not a directory, a device or a pipe; the directory.

    The rename that ends every write would replace whatever the path names, so only a
    regular file (or nothing) may be there.
    """
    if os.path.isdir(path):
        raise UserError(f'{flag + " " if flag else ""}{path}: is a directory; name a file to write')
    if os.path.lexists(path) and not os.path.isfile(path):
        raise UserError(f'{flag + " " if flag else ""}{path}: exists and is not a regular file (a device, pipe, '
                        'socket or broken link); name a file to write')
    return check_directory(path, flag)


def check_outputs(outputs: Mapping[str, Optional[str]], inputs: Sequence[Optional[str]] = ()) -> None:
    """Before any work: every output (`{flag: path}`, None for not asked) can be written, none is an input,
    none repeats."""
    seen: dict[str, str] = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        check_output(path, flag)
        refuse_overwrite(path, inputs, flag)
        real = os.path.realpath(path)
        if real in seen:
            raise UserError(f'{seen[real]} and {flag} both name {path}; give each its own file')
        seen[real] = flag


def refuse_overwrite(output: Optional[str], inputs, flag: Optional[str] = None) -> None:
    """One error when `output` would replace one of `inputs`: the same file by any path, or a file in an input
    folder."""
    if not output or not os.path.exists(output):
        return
    real = os.path.realpath(output)
    for given in inputs:
        if not given or not os.path.exists(given):
            continue
        inside = os.path.isdir(given) and real.startswith(os.path.realpath(given) + os.sep)
        if inside or os.path.samefile(output, given):
            raise UserError(f'{flag + " " if flag else ""}{output}: {"is in" if inside else "is"} an input of this '
                            f'command ({given}); write the output elsewhere')


@contextlib.contextmanager
def atomic_path(path: str, flag: Optional[str] = None, durable: bool = False) -> Iterator[str]:
    """A temporary path beside `path` that replaces `path` only when the block succeeds.

    The temporary name keeps `path`'s suffix (np.save and np.savez would otherwise append
    one) and is created with the usual permissions. `durable` fsyncs before the rename,
    for checkpoints that must survive a machine crash, not only a killed process.
    `flag` names the option the path came from, for the errors. An OSError inside the
    block or in the rename becomes a `UserError` about `path`.
    """
    directory = check_output(path, flag)
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
    except OSError as e:
        raise write_error(path, e, flag) from None
    finally:
        with contextlib.suppress(OSError):
            if os.path.lexists(tmp):
                os.unlink(tmp)


class AtomicFiles:
    """Several files of one folder, each written to a temporary and all renamed into place at the end.

        with AtomicFiles(folder) as out:
            np.save(out.path('a.npy'), a)      # a temporary now; folder/a.npy only once the block ends
            fig.savefig(out.path('b.png'))

    A failure anywhere removes every temporary: a reader never finds a truncated file.
    A name that would replace one of `inputs` is refused before anything is written.
    """

    def __init__(self, folder: str, flag: Optional[str] = None, inputs: Sequence[Optional[str]] = ()):
        self.folder, self.flag, self.inputs, self._pending = folder, flag, inputs, []

    def path(self, name: str) -> str:
        """Where to write `name` now (a temporary beside its final place)."""
        final = os.path.join(self.folder, name)
        check_output(final, self.flag)
        refuse_overwrite(final, self.inputs, self.flag)
        tmp = os.path.join(self.folder, f'.tmp-{os.getpid()}-{name}')
        self._pending.append((tmp, final))
        return tmp

    @property
    def written(self) -> list[str]:
        """The final paths, in the order they were asked for."""
        return [final for _, final in self._pending]

    def __enter__(self) -> 'AtomicFiles':
        return self

    def __exit__(self, kind, error, tb) -> None:
        try:
            if kind is None:
                for tmp, final in self._pending:
                    os.replace(tmp, final)
        except OSError as e:
            raise write_error(final, e, self.flag) from None
        finally:
            for tmp, _ in self._pending:
                with contextlib.suppress(OSError):
                    if os.path.lexists(tmp):
                        os.unlink(tmp)
        if isinstance(error, OSError) and not isinstance(error, UserError):
            raise write_error(self.folder, error, self.flag) from None


def check_directory(path: str, flag: Optional[str] = None) -> str:
    """The directory `path` would be written in; a one-line error when it does not exist."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f'{flag + " " if flag else ""}{path}: directory {directory} does not exist')
    return directory


def make_dirs(path: str, flag: Optional[str] = None) -> bool:
    """Makes folder `path` (and its parents) if missing; an OS refusal is `write_error`'s one line.

    Returns whether this call created it, so a command that fails early can remove what it made.
    """
    created = not os.path.exists(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise write_error(path, e, flag) from None
    return created


def write_text(path: str, text: str, flag: Optional[str] = None) -> None:
    """Writes `text` to `path` atomically."""
    with atomic_path(path, flag) as tmp:
        with open(tmp, 'w') as f:
            f.write(text)


def read_json(path: str, what: str, advice: Optional[str] = None) -> object:
    """The JSON value in file `path`, its size checked first (`limits.check_text`).

    A file that cannot be read, is not UTF-8, is not JSON or is nested too deeply to parse
    is one `UserError` naming `what` (how the command's user knows the file: `--config X`)
    and the cause, followed by `advice` (what to do) when given.
    """
    tail = f'; {advice}' if advice else ''
    try:
        check_text(path, what)
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except UserError:  # check_text's, already one line (a UserError is a ValueError too)
        raise
    except OSError as e:
        raise UserError(f'{what}: cannot read it ({e.strerror or type(e).__name__}){tail}') from None
    except UnicodeDecodeError:
        raise UserError(f'{what}: not UTF-8 text, so not JSON{tail}') from None
    except ValueError as e:  # JSONDecodeError, or a number too long to convert
        raise UserError(f'{what}: not valid JSON ({e}){tail}') from None
    except RecursionError:
        raise UserError(f'{what}: nested too deeply to read{tail}') from None


_JSON_TYPES = {list: 'list', str: 'string', int: 'number', float: 'number', bool: 'boolean', type(None): 'null'}


def read_json_object(path: str, what: str, kind: str = 'a JSON object', advice: Optional[str] = None) -> dict:
    """`read_json` of a file that must hold an object; anything else is one line: `WHAT holds a JSON list, not KIND`."""
    value = read_json(path, what, advice)
    if not isinstance(value, dict):
        raise UserError(f'{what} holds a JSON {_JSON_TYPES.get(type(value), type(value).__name__)}, not {kind}'
                        + (f'; {advice}' if advice else ''))
    return value


def write_json(path: str, obj, flag: Optional[str] = None) -> None:
    """`obj` as indented JSON with a final newline, written atomically (`write_text`)."""
    write_text(path, json.dumps(obj, indent=2) + '\n', flag)


def record_differences(recorded: Mapping, expected: Mapping, fields: Sequence[str],
                       defaults: Optional[Mapping] = None) -> list[str]:
    """The `fields` in which a record read back differs from the one this command would write (`expected`).

    What a folder's record (a run's run.json, a sweep's sweep.json) must repeat for the
    folder to be this command's. A field the record lacks counts as its value in
    `defaults` (None where that has none either): records written before the field existed.
    """
    defaults = defaults or {}
    return [k for k in fields if recorded.get(k, defaults.get(k)) != expected[k]]


def remove_temporaries(folder: str) -> list[str]:
    """Deletes the temporaries (`.tmp-PID-...`) killed writers left in `folder`; returns their names.

    A temporary whose writer (its PID) still runs is a write in progress, and is left alone.
    """
    removed = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
        m = TEMPORARY.match(name)
        if not (m and os.path.isfile(os.path.join(folder, name))):
            continue
        pid = int(m.group(1))
        # This process is not writing it (it has only just started): a reused PID, a writer of the past.
        if pid == os.getpid() or not process_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, name))
                removed.append(name)
    return removed


def process_alive(pid) -> bool:
    """Whether process `pid` on this machine may still run: one that exists, or that we may not signal, may.

    A PID that is not a positive whole number (a record's garbage), or too large for any
    process, runs nothing.
    """
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # another user's process
    return True

"""Outputs and workdirs: atomic writes, refused overwrites, the operating system's refusals, the workdir lock.

`parity.core.files` and `parity.core.lock`, in-process and fast; the temporaries a
killed writer leaves are made by really killing a writer (SIGKILL in the middle of
`containers.write_npz`), so the cleanup is tested on the names the writer really uses.
"""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from conftest import killed_writer_leftover, python
from parity.core import files
from parity.core.errors import UserError
from parity.core.lock import LOCK_NAME, WorkdirLock
from parity.core.weights import containers

# --------------------------------------------------------------------------- atomic writes

def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / 'out.txt'
    path.write_text('old')
    with pytest.raises(RuntimeError):
        with files.atomic_path(str(path)) as tmp:
            Path(tmp).write_text('half')
            raise RuntimeError('the writer failed')
    assert path.read_text() == 'old' and os.listdir(tmp_path) == ['out.txt']


@pytest.mark.parametrize('code, advice', [(errno.ENOSPC, 'the disk is full'), (errno.EFBIG, 'ulimit -f'),
                                          (errno.EROFS, 'read-only'), (errno.EACCES, 'permission denied')])
def test_operating_system_refusals_are_one_line_that_says_what_to_do(tmp_path, code, advice):
    path = tmp_path / 'out.npz'
    with pytest.raises(UserError) as e:
        with files.atomic_path(str(path), '--output') as tmp:
            Path(tmp).write_bytes(b'PK')
            raise OSError(code, os.strerror(code))
    assert str(e.value).startswith(f'--output {path}: cannot write it: ') and advice in str(e.value), e.value
    assert os.listdir(tmp_path) == []


def test_outputs_that_cannot_be_files_are_refused_before_any_work(tmp_path):
    (tmp_path / 'dir').mkdir()
    (tmp_path / 'in.npz').write_bytes(b'x')
    os.symlink(tmp_path / 'in.npz', tmp_path / 'link.npz')
    os.symlink(tmp_path / 'nowhere', tmp_path / 'broken')
    for output, needle in [(tmp_path / 'dir', 'is a directory'), ('/dev/null', 'not a regular file'),
                           (tmp_path / 'broken', 'not a regular file'), (tmp_path / 'no' / 'x', 'does not exist'),
                           (tmp_path / 'in.npz', 'is an input'), (tmp_path / 'link.npz', 'is an input')]:
        with pytest.raises(UserError, match=needle):
            files.check_outputs({'--output': str(output)}, [str(tmp_path / 'in.npz')])
    with pytest.raises(UserError, match='--json and --logits both name'):
        files.check_outputs({'--json': str(tmp_path / 'a'), '--logits': str(tmp_path / 'a')})
    hf = tmp_path / 'hf'
    hf.mkdir()
    (hf / 'model.safetensors').write_bytes(b'x')
    with pytest.raises(UserError, match='is in an input'):
        files.check_outputs({'OUT': str(hf / 'model.safetensors')}, [str(hf)])
    files.check_outputs({'OUT': str(hf / 'new.npz'), '--json': None}, [str(hf)])  # a new file beside them is fine


def test_atomic_files_are_all_or_nothing(tmp_path):
    (tmp_path / 'a.npy').write_bytes(b'old')
    with pytest.raises(UserError, match='disk is full'):
        with files.AtomicFiles(str(tmp_path), '--out') as out:
            np.save(out.path('a.npy'), np.zeros(3))
            with open(out.path('b.png'), 'wb') as f:
                f.write(b'half')
            raise OSError(errno.ENOSPC, 'No space left on device')
    assert sorted(os.listdir(tmp_path)) == ['a.npy'] and (tmp_path / 'a.npy').read_bytes() == b'old'
    with files.AtomicFiles(str(tmp_path), '--out') as out:
        np.save(out.path('a.npy'), np.zeros(3))
    assert out.written == [str(tmp_path / 'a.npy')] and np.load(tmp_path / 'a.npy').shape == (3,)
    with pytest.raises(UserError, match='is an input'):
        with files.AtomicFiles(str(tmp_path), '--out', [str(tmp_path / 'a.npy')]) as out:
            out.path('a.npy')


def test_the_temporaries_of_a_killed_writer_are_found_and_removed(tmp_path):
    (tmp_path / 'keep.npz').write_bytes(b'complete')
    left = killed_writer_leftover(tmp_path)
    assert files.remove_temporaries(str(tmp_path)) == [left]
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith('.tmp-')) == []
    assert (tmp_path / 'keep.npz').read_bytes() == b'complete'


def test_a_write_in_progress_is_left_alone(tmp_path):
    writer = python('import time; time.sleep(60)')
    try:
        (tmp_path / f'.tmp-{writer.pid}-y.npy').write_bytes(b'being written')
        assert files.remove_temporaries(str(tmp_path)) == []
    finally:
        writer.kill()
        writer.wait()
    assert files.remove_temporaries(str(tmp_path)) == [f'.tmp-{writer.pid}-y.npy']


# --------------------------------------------------------------------------- the workdir lock

HOLD = '''
    import sys, time
    from parity.core.lock import WorkdirLock
    lock = WorkdirLock(sys.argv[1])
    lock.acquire()
    print('held', flush=True)
    time.sleep(float(sys.argv[2]))
'''


def test_a_second_holder_is_refused_with_the_first_ones_name(tmp_path):
    holder = python(HOLD, tmp_path, 60)
    try:
        assert holder.stdout.readline().strip() == 'held'
        with pytest.raises(UserError) as e:
            WorkdirLock(str(tmp_path)).acquire()
        assert f'--workdir {tmp_path} is in use by PID {holder.pid} on ' in str(e.value)
        assert 'wait for it to finish or stop it' in str(e.value)
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    holder = python(HOLD, tmp_path, 60)
    assert holder.stdout.readline().strip() == 'held'
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())['pid'] == holder.pid  # the stale record is still there
    with WorkdirLock(str(tmp_path)) as lock:
        assert lock.took_over['pid'] == holder.pid
        assert json.loads((tmp_path / LOCK_NAME).read_text())['pid'] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()  # released: removed by its holder


def test_without_flock_the_record_decides(tmp_path, monkeypatch):
    """Some network file systems have no flock: a dead PID on this host is stale, a live one holds."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, 'No locks available')

    monkeypatch.setattr(fcntl, 'flock', no_flock)
    dead = python('import os; print(os.getpid())')
    dead_pid = int(dead.communicate()[0])
    import socket
    (tmp_path / LOCK_NAME).write_text(json.dumps({'pid': dead_pid, 'host': socket.gethostname()}))
    with WorkdirLock(str(tmp_path)) as lock:
        assert lock.took_over['pid'] == dead_pid
    (tmp_path / LOCK_NAME).write_text(json.dumps({'pid': os.getppid(), 'host': socket.gethostname()}))
    with pytest.raises(UserError, match=f'in use by PID {os.getppid()}'):
        WorkdirLock(str(tmp_path)).acquire()


def test_write_errors_of_containers_name_the_file(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(np, 'savez', full)
    with pytest.raises(UserError, match=f'{tmp_path / "c.npz"}: cannot write it: the disk is full'):
        containers.write_npz(str(tmp_path / 'c.npz'), {'a': np.zeros(2)})
    assert os.listdir(tmp_path) == []

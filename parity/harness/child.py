"""A user's function run in a child process, so that nothing it does can pass for a verdict.

`parity verify` calls code it did not write. In the same process a `sys.exit(0)` in that
code would end `verify` with exit 0 and no verdict (a false pass), an `os._exit(3)` would
leak its code, a crash would take the report with it and an endless loop would hang.
Here the parent writes the params and the batch to a private folder, starts
`python -m parity.harness.child FOLDER SPEC` in its own session, and waits at most
`timeout` seconds. The child imports FILE.py, calls FUNCTION(params, x) through
`counterparts.run_function` and writes what it returned (`result.npz`, `result.json`,
each atomically). Any other ending (an exit, a signal, the timeout) is one `UserError`
saying which; the child and anything it started are killed on a timeout, and die with `verify`
when it is killed itself.

The user's prints go to our stderr, so stdout stays the report.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from parity.core import files
from parity.core.errors import UserError
from parity.core.weights import containers

DEFAULT_TIMEOUT = 300.0  # seconds for the import and the call together


def check_spec(spec: str) -> str:
    """The FILE.py of `FILE.py:FUNCTION`, checked before anything is loaded (nothing of it runs here)."""
    path, sep, name = spec.rpartition(':')
    if not sep or not path or not name:
        raise UserError(f'{spec}: expected FILE.py:FUNCTION, e.g. examples/numpy_vit.py:vit')
    if not os.path.isfile(path):
        raise UserError(f'{spec}: no such file {path}')
    return path


def run_isolated(spec: str, params: Mapping[str, np.ndarray], x: np.ndarray, timeout: float = DEFAULT_TIMEOUT
                 ) -> tuple[dict[str, Any], list[str]]:
    """FUNCTION(params, x) of `spec` in a child process: (its outputs as float64 arrays, notes on reading them)."""
    out, result = _isolated(spec, params, x, timeout, None)
    return out, result['notes']


def run_module_isolated(spec: str, params: Mapping[str, np.ndarray], x: np.ndarray, job: dict,
                        timeout: float = DEFAULT_TIMEOUT) -> tuple[dict[str, Any], list[str], dict]:
    """`--module`: BUILD(config) of `spec` mapped, loaded and run in a child process (`automap.run_job`; `job`
    holds the config and what to run): (its intermediates, notes, the rest of what it reported)."""
    out, result = _isolated(spec, params, x, timeout, job)
    return out, result.pop('notes'), {k: v for k, v in result.items() if k != 'keys'}


def _isolated(spec: str, params: Mapping[str, np.ndarray], x: np.ndarray, timeout: float, job: Optional[dict]
              ) -> tuple[dict[str, Any], dict]:
    check_spec(spec)
    hint = 'return your model (BUILD) or (loss, gradients) (STEP)' if job is not None else \
        'return a dict of intermediates instead'
    with tempfile.TemporaryDirectory(prefix='parity-verify-') as folder:
        containers.write_npz(os.path.join(folder, 'params.npz'), dict(params))
        np.save(os.path.join(folder, 'x.npy'), x)
        if job is not None:
            files.write_json(os.path.join(folder, 'job.json'), job)
        child = subprocess.Popen([sys.executable, '-m', 'parity.harness.child', folder, spec],
                                 stdin=subprocess.DEVNULL, stdout=2, start_new_session=True)
        try:
            code = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(child)
            raise UserError(f'{spec}: your function did not return within {timeout:g} s and was stopped '
                            '(--timeout SECONDS allows longer)') from None
        except BaseException:  # Ctrl-C: the child goes too
            _kill(child)
            raise
        finally:
            _kill_group(child.pid)  # whatever the function started and left running
        report = os.path.join(folder, 'result.json')
        if not os.path.isfile(report):
            raise UserError(f'{spec}: {_ending(code)} before your function returned a result; {hint}')
        result = files.read_json_object(report, f'{spec}: the result.json its process wrote')
        if result.get('error'):
            raise UserError(result['error'])
        out = containers.read_npz(os.path.join(folder, 'result.npz')) if result['keys'] else {}
        return {k: np.array(out[f'{i}']) for i, k in enumerate(result['keys'])}, result


def _ending(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f'signal {-code}'
        why = 'out of memory, or killed from outside' if -code == signal.SIGKILL else 'a crash in native code'
        return f'the process running it was killed by {name} ({why})'
    return f'it exited with code {code} (sys.exit or os._exit)'


def _kill(child: subprocess.Popen) -> None:
    _kill_group(child.pid)
    child.wait()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _child(folder: str, spec: str) -> int:
    """In the child: import, call, write the result; a user's exit is reported, never passed on."""
    from parity.harness import counterparts

    def report(**fields) -> None:
        files.write_json(os.path.join(folder, 'result.json'), fields)

    _die_with_parent()
    job_path = os.path.join(folder, 'job.json')
    hint = ('return a dict of intermediates' if not os.path.isfile(job_path) else
            'return your model (BUILD) or (loss, gradients) (STEP)')
    try:
        params = containers.read_npz(os.path.join(folder, 'params.npz'))
        x = np.load(os.path.join(folder, 'x.npy'))
        fn = counterparts.load_function(spec)
        _strict_float32()
        extra = {}
        if os.path.isfile(job_path):  # --module: BUILD(config), mapped and hooked here
            from parity.harness import automap

            out, notes, extra = automap.run_job(fn, spec, files.read_json_object(job_path, 'job.json'), params, x)
        else:
            out, notes = counterparts.run_function(fn, spec, params, x)
    except UserError as e:
        report(error=str(e))
        return 0
    except SystemExit as e:
        report(error=f'{spec}: your code called sys.exit({e.code!r}) instead of returning a result; {hint}')
        return 0
    except KeyboardInterrupt:  # no Ctrl-C reaches this process (its own session): Python code raised it
        report(error=f'{spec}: your code raised KeyboardInterrupt (an exception raised by Python code: no Ctrl-C '
                     f'reaches the process running it) instead of returning a result; {hint}')
        return 0
    keys = list(out)
    if keys:
        containers.write_npz(os.path.join(folder, 'result.npz'), {f'{i}': out[k] for i, k in enumerate(keys)})
    report(keys=keys, notes=notes, **extra)
    return 0


def _die_with_parent() -> None:
    """When `verify` is gone (even SIGKILLed, as a scheduler's time limit does), this process and all it started
    go too, instead of running on and holding the caller's pipes open. A thread, not PR_SET_PDEATHSIG: the kernel's
    signal would kill this process alone and leave what it started, which shares its process group, running."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os.killpg(0, signal.SIGKILL)  # this process leads its group (start_new_session): the group is its own

    threading.Thread(target=watch, name='parity-verify-parent-watch', daemon=True).start()


def _strict_float32() -> None:
    """The float32 settings of every parity command, for the frameworks the user's file imported."""
    if 'jax' in sys.modules:
        from vit_jax import runtime as jax_runtime
        jax_runtime.strict_float32()
    if 'torch' in sys.modules:
        from vit_torch import runtime as torch_runtime
        torch_runtime.strict_float32()


def main(argv: Optional[Sequence[str]] = None) -> int:
    folder, spec = (sys.argv[1:] if argv is None else argv)
    return _child(folder, spec)


if __name__ == '__main__':
    sys.exit(main())

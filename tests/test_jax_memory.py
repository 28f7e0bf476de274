"""JAX's GPU memory options: `python -m parity` turns preallocation off before JAX starts, the user's value wins.

Each case runs the real entry point in a child whose import hook reports the environment at the
moment `jax` is first imported, and then ends the child there, so no model is built.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from parity.core import jax_memory

PROBE = '''
import json, os, runpy, sys

class Probe:
    def find_spec(self, name, path=None, target=None):
        if name == 'jax':
            env = {k: v for k, v in os.environ.items() if k.startswith(('XLA_PYTHON_CLIENT_', 'XLA_CLIENT_'))}
            print('JAX_IMPORTED ' + json.dumps(env), flush=True)
            os._exit(0)
        return None

sys.meta_path.insert(0, Probe())
module, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_module(module, run_name='__main__', alter_sys=True)
'''


def env_when_jax_is_imported(module: str, *argv: str, **user) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(jax_memory.PREFIXES)}
    env.update(user, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, '-c', PROBE, module, *argv], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=60)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('JAX_IMPORTED ')]
    assert lines, f'{module} {argv} never imported jax (exit {proc.returncode}):\n{proc.stderr}'
    return json.loads(lines[0].removeprefix('JAX_IMPORTED '))


def test_parity_turns_preallocation_off_before_jax_is_imported():
    assert env_when_jax_is_imported('parity', 'compare', '--help') == {'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}


def test_the_users_own_value_wins():
    seen = env_when_jax_is_imported('parity', 'compare', '--help', XLA_PYTHON_CLIENT_PREALLOCATE='true',
                                    XLA_CLIENT_MEM_FRACTION='.5')
    assert seen == {'XLA_PYTHON_CLIENT_PREALLOCATE': 'true', 'XLA_CLIENT_MEM_FRACTION': '.5'}


def test_vit_jax_alone_keeps_jaxs_defaults():
    assert env_when_jax_is_imported('vit_jax', 'logits', '--help') == {}


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(jax_memory, '_set_by_parity', {})
    monkeypatch.delitem(sys.modules, 'jax', raising=False)


def test_in_force_says_who_set_each_variable(fresh):
    environ = {'XLA_PYTHON_CLIENT_MEM_FRACTION': '.4', 'PATH': '/bin'}
    jax_memory.share_gpu_with_torch(environ)
    assert jax_memory.in_force(environ) == {
        'XLA_PYTHON_CLIENT_MEM_FRACTION': {'value': '.4', 'set_by': 'user'},
        'XLA_PYTHON_CLIENT_PREALLOCATE': {'value': 'false', 'set_by': 'parity'},
    }
    user = {'XLA_PYTHON_CLIENT_PREALLOCATE': 'true'}
    jax_memory.share_gpu_with_torch(user)
    assert jax_memory.in_force(user) == {'XLA_PYTHON_CLIENT_PREALLOCATE': {'value': 'true', 'set_by': 'user'}}


def test_nothing_is_set_once_jax_is_imported(fresh, monkeypatch):
    monkeypatch.setitem(sys.modules, 'jax', object())
    environ = {}
    jax_memory.share_gpu_with_torch(environ)
    assert environ == {} and jax_memory.in_force(environ) == {}

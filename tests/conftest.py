"""Shared test set-up: float32 parity settings, the committed reference vectors, tiny configs and helpers.

Markers: `slow` marks the tests that start training runs or many subprocesses;
`make test-fast` leaves them out, `make test` (what CI runs) runs everything.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from parity.core import files, weights
from parity.core.config import ViTConfig
from parity.harness.tolerance import bound as tolerance  # noqa: F401  the written policy: 1e-5 x max(1, max |ref|)
from vit_jax import runtime as jax_runtime
from vit_torch import runtime as torch_runtime


def _share_xla_compilations() -> None:
    """One persistent XLA compilation cache for the session and every process it starts.

    The suite starts hundreds of processes (training runs, sweeps, the docs' commands) that
    compile the same few programs: each is compiled once for all. A program read from the
    cache is the one a compile gives, so no result changes (the bit-identical resume and
    sweep tests run through it). JAX's threshold stays: only programs that take a second to
    compile are kept (caching the thousands of small ones costs more than it saves). The
    variables reach every process started from here, the xdist workers too (which find them
    set); `jax.config` is this process's. The process that made the folder removes it at
    exit; a cache the user set is left alone. The size bound turns on JAX's file lock around
    each entry: the workers share the folder.
    """
    if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
        folder = tempfile.mkdtemp(prefix='vit-mirror-xla-cache-')
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ.update(JAX_COMPILATION_CACHE_DIR=folder, JAX_COMPILATION_CACHE_MAX_SIZE=str(2 << 30))
    jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
    if os.environ.get('JAX_COMPILATION_CACHE_MAX_SIZE'):
        jax.config.update('jax_compilation_cache_max_size', int(os.environ['JAX_COMPILATION_CACHE_MAX_SIZE']))


_share_xla_compilations()


# Parity is judged in true float32: highest matmul precision in JAX, no TF32 in PyTorch.
jax_runtime.strict_float32()
torch_runtime.strict_float32()

REPO = Path(__file__).resolve().parents[1]
# The official reference vectors, committed with their provenance (tests/reference/README.md).
REFERENCE = REPO / 'tests' / 'reference'
BATCH = 2  # images per batch in the tiny-config tests


# `make test` runs the files on two workers (`-n 2 --dist loadfile`), each file whole on one of them, in the order
# collected: the files that take longest go first, so that the two workers finish together rather than one of them
# starting a long file last while the other sits idle. The other files follow in their usual order.
LONGEST_FIRST = ('test_docs.py', 'test_sweep.py', 'test_train.py', 'test_recipes.py', 'test_formats.py',
                 'test_harness.py', 'test_bench.py', 'test_cross_framework.py', 'test_remat.py', 'test_fast_paths.py')


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


@pytest.fixture(scope='session')
def reference() -> Path:
    assert REFERENCE.is_dir(), f'reference vectors not found at {REFERENCE}'
    return REFERENCE


def tiny(**kw) -> ViTConfig:
    """The tests' tiny ViT: 32x32 images in 8x8 patches, width 32, 2 blocks of 4 heads, 5 classes.

    Any field can be overridden.
    """
    base = dict(name='tiny', patch_size=(8, 8), hidden_size=32, num_layers=2, mlp_dim=64, num_heads=4,
                num_classes=5, image_size=32)
    return ViTConfig(**{**base, **kw})


# One of each structure both models must agree on: every classifier, a representation layer, no head,
# non-square patches, a hybrid stem alone and with stages, the MAP head, sincos2d.
CONFIGS = {
    'token': tiny(),
    'gap': tiny(classifier='gap'),
    'unpooled': tiny(classifier='unpooled'),
    'token_unpooled': tiny(classifier='token_unpooled'),
    'representation': tiny(representation_size=24),
    'no-head': tiny(num_classes=0, representation_size=16),
    'non-square-patch': tiny(patch_size=(8, 4)),
    'hybrid-stem': tiny(patch_size=(2, 2), resnet_num_layers=(), resnet_width_factor=0.5),
    'hybrid-stages': tiny(patch_size=(1, 1), resnet_num_layers=(2, 1), resnet_width_factor=0.5),
    # big_vision's: multihead attention pooling, the first token, fixed sincos2d position embeddings.
    'map': tiny(classifier='map'),
    'first': tiny(classifier='first'),
    'sincos2d': tiny(posemb='sincos2d'),
    # DeiT's class and distillation tokens, two heads averaged.
    'token_distilled': tiny(classifier='token_distilled'),
}


def images(cfg: ViTConfig, seed: int = 1, n: int = BATCH) -> np.ndarray:
    """`n` seeded uniform [-1, 1] images at the config's resolution, NHWC float32."""
    return np.random.default_rng(seed).uniform(-1, 1, (n, cfg.image_size, cfg.image_size, 3)).astype(np.float32)


def torch_forward(model, x: np.ndarray) -> np.ndarray:
    """A torch model's output for an NHWC NumPy batch, without gradients."""
    with torch.no_grad():
        return model(torch_runtime.to_nchw(x, 'cpu')).numpy()


def run_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """`python -m ARGS...` from the repo root, as a user would run it."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, '-m', *map(str, args)], capture_output=True, text=True, cwd=REPO, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f'{args} exited {proc.returncode}:\n{proc.stderr}')
    return proc


# parity/__main__.py's commands and their modules
PARITY_COMMANDS = {'compare': 'parity.harness.compare', 'verify': 'parity.harness.verify',
                   'grad': 'parity.harness.grad', 'bench': 'parity.tools.bench', 'explain': 'parity.tools.explain'}


def in_process(*args) -> subprocess.CompletedProcess:
    """`python -m PACKAGE ARGS...` in this process, as its `__main__` runs it (see `run_main`)."""
    import importlib

    if args[0] == 'parity':  # parity's __main__ runs on import: its commands' own mains, as it dispatches them
        return run_main(importlib.import_module(PARITY_COMMANDS[args[1]]).main, *args[2:])
    return run_main(importlib.import_module(f'{args[0]}.cli').main, *args[1:])


def run_main(main, *argv) -> subprocess.CompletedProcess:
    """A command's `main` run by the contract's `run`, as `__main__` runs it, with its final exit a SystemExit
    (an `os._exit` too, but a forked child's exits for real): the exit code, stdout and stderr, as `run_cli`
    gives them. For the tests whose subject is the command, not a fresh interpreter (which `run_cli` keeps for
    what only a real process shows: no traceback, the code the shell sees)."""
    import contextlib
    import io

    from parity.cli import contract

    stdout, stderr, pid, real_exit = io.StringIO(), io.StringIO(), os.getpid(), os._exit

    def exit_here(code):
        if os.getpid() != pid:
            real_exit(code)
        raise SystemExit(code)

    contract.os._exit = exit_here
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
                pytest.raises(SystemExit) as e:
            contract.run(main, list(map(str, argv)))
    finally:
        contract.os._exit = real_exit
    return subprocess.CompletedProcess(argv, e.value.code, stdout.getvalue(), stderr.getvalue())


def random_params(shapes: dict[str, tuple[int, ...]], seed: int = 0, scale: float = 0.2) -> dict[str, np.ndarray]:
    """Random float32 params for a shape spec: nothing zero, so every parameter matters."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, s in shapes.items():
        v = rng.normal(0.0, scale, s)
        if k.endswith('/scale'):
            v = 1.0 + v  # norms near identity keep activations in a sane range
        out[k] = v.astype(np.float32)
    return out


def python(code: str, *args) -> subprocess.Popen:
    """A child Python running `code` (with the repo importable), stdout piped."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, '-c', textwrap.dedent(code), *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def popen(*args, out: Path) -> subprocess.Popen:
    """`python -m ARGS...` in the background, stdout and stderr to files beside `out` (OUT.out, OUT.err)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(f'{out}.out', 'w') as stdout, open(f'{out}.err', 'w') as stderr:  # the child keeps its own copies
        return subprocess.Popen([sys.executable, '-m', *map(str, args)], cwd=REPO, env=env, text=True,
                                stdout=stdout, stderr=stderr)


def kill_once_written(proc: subprocess.Popen, path: Path, out: Path, timeout: float = 300) -> None:
    """SIGKILLs `proc` (started by `popen(..., out=out)`) as soon as `path` exists."""
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, Path(f'{out}.err').read_text()
        assert time.time() < deadline, f'no {path.name} after {timeout:.0f} s'
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def killed_writer_leftover(directory: Path) -> str:
    """SIGKILLs a process in the middle of writing DIRECTORY/ckpt-0000005.npz; the temporary it left."""
    writer = python('''
        import sys
        import numpy as np
        from parity.core.weights import containers
        big = np.ones((16, 1 << 20), np.float32)  # 64 MiB, fsynced: each write takes a while
        while True:
            containers.write_npz(sys.argv[1], {'a': big}, durable=True)
    ''', directory / 'ckpt-0000005.npz')
    deadline = time.time() + 60
    try:
        while not any(files.TEMPORARY.match(n) for n in os.listdir(directory)):
            assert writer.poll() is None, writer.stderr.read()
            assert time.time() < deadline, 'the writer never started a write'
            time.sleep(0.005)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    left = [n for n in os.listdir(directory) if files.TEMPORARY.match(n)]
    assert left == [f'.tmp-{writer.pid}-ckpt-0000005.npz'], os.listdir(directory)
    return left[0]


@pytest.fixture(scope='module')
def timm_small(tmp_path_factory):
    """A random checkpoint shaped like timm's `test_vit` (width 64, depth 6, 2 heads, MLP 192, patch 16), 64x64:
    test_harness's and test_pixels' timm counterpart."""
    cfg = ViTConfig(name=None, patch_size=(16, 16), hidden_size=64, num_layers=6, mlp_dim=192, num_heads=2,
                    num_classes=10, image_size=64)
    path = tmp_path_factory.mktemp('timm') / 'test_vit.npz'
    weights.save_npz(str(path), random_params(weights.param_shapes(cfg), seed=3, scale=0.1))
    return path

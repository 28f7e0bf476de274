"""The layout the README describes: each tier imports only from the tiers above it.

Tier 1 (`parity.core`) and the data tier know no framework; the command-line tier reaches the
frameworks only by name, at run time; each framework's package stands on those three alone (not
on the other framework, the harness or the tools); the harness and the tools stand on both
models. The model files do no I/O and know nothing of checkpoints, and each `vit_jax/X.py` with a
`vit_torch/X.py` twin lists the same functions and classes in the same order.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

# Which packages each tier may import (besides the standard library and third-party packages).
ALLOWED = {
    'parity.core': {'parity.core'},
    'parity.data': {'parity.core', 'parity.data'},
    'parity.cli': {'parity.core', 'parity.data', 'parity.cli'},
    'vit_jax': {'parity.core', 'parity.data', 'parity.cli', 'vit_jax'},
    'vit_torch': {'parity.core', 'parity.data', 'parity.cli', 'vit_torch'},
    'parity.harness': {'parity.core', 'parity.data', 'parity.cli', 'parity.harness', 'vit_jax', 'vit_torch'},
    'parity.tools': {'parity.core', 'parity.data', 'parity.cli', 'parity.harness', 'parity.tools', 'vit_jax',
                     'vit_torch'},
}
FRAMEWORKS = {'jax', 'flax', 'optax', 'torch', 'timm', 'transformers', 'tensorflow', 'tensorflow_datasets'}


def imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f'{node.module}.{a.name}' for a in node.names}
    return found


def tier_of(module: str):
    """parity.X for a module of tier X, vit_jax or vit_torch for theirs, None for anything else."""
    if module.startswith('parity.'):
        return '.'.join(module.split('.')[:2])
    top = module.split('.')[0]
    return top if top in ('vit_jax', 'vit_torch') else None


@pytest.mark.parametrize('tier', ALLOWED)
def test_each_tier_imports_only_from_the_tiers_above_it(tier):
    folder = REPO / Path(*tier.split('.'))
    files = sorted(folder.rglob('*.py'))
    assert files, f'{tier} is empty'
    for path in files:
        bad = {t for t in map(tier_of, imports(path)) if t is not None and t not in ALLOWED[tier]}
        assert not bad, f'{path.relative_to(REPO)} ({tier}) imports {sorted(bad)}'


@pytest.mark.parametrize('tier', ['parity.core', 'parity.data', 'parity.cli'])
def test_the_lower_tiers_know_no_framework(tier):
    for path in sorted((REPO / Path(*tier.split('.'))).rglob('*.py')):
        used = {m.split('.')[0] for m in imports(path)} & FRAMEWORKS
        # .pt files are PyTorch pickles: the container module alone reads them with torch.load;
        # tf.data is the tfds pipeline's own.
        allowed = {'torch'} if path.name == 'containers.py' else {'tensorflow', 'tensorflow_datasets'} \
            if path.name == 'datasets.py' else set()
        assert used <= allowed, f'{path.relative_to(REPO)} imports {sorted(used - allowed)}'


@pytest.mark.parametrize('model', ['vit_jax/model.py', 'vit_torch/model.py'])
def test_the_model_files_do_no_io_and_know_no_checkpoints(model):
    used = imports(REPO / model)
    ours = {m for m in used if m.split('.')[0] in ('parity', 'vit_jax', 'vit_torch')}
    assert ours <= {'parity.core', 'parity.core.config', 'parity.core.config.ViTConfig', 'parity.core.posemb',
                    'vit_jax', 'vit_jax.fast', 'vit_torch', 'vit_torch.fast'}, ours
    assert not used & {'os', 'io', 'pathlib', 'numpy', 'json'}, used


def test_the_model_files_are_mirrors_class_for_class():
    def classes(path):
        return [n.name for n in ast.parse((REPO / path).read_text()).body if isinstance(n, ast.ClassDef)]

    assert classes('vit_jax/model.py') == classes('vit_torch/model.py')


# Where the frameworks part, each twin keeps its own word for the one concept: a Flax model's
# parameters live outside it (variables), a torch model's inside (a state dict); optax masks a
# transformation where torch.optim takes parameter groups, and optax's chain is torch's optimizer.
TWIN_NAMES = {'variables_from_params': 'state_dict_from_params', 'params_from_variables': 'params_from_state_dict',
              'kernels_mask': 'param_groups', 'make_optimizer': 'Optimizer'}


def definitions(path: str) -> dict[str, ast.AST]:
    """The top-level functions and classes of `path`, in order."""
    return {n.name: n for n in ast.parse((REPO / path).read_text()).body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def arguments(node: ast.AST) -> list[str]:
    args = node.args
    return [a.arg for a in args.posonlyargs + args.args] + ['*'] + [a.arg for a in args.kwonlyargs]


@pytest.mark.parametrize('twin', ['objective.py', 'params.py'])
def test_the_twin_files_define_the_same_functions_in_the_same_order(twin):
    jax, torch = definitions(f'vit_jax/{twin}'), definitions(f'vit_torch/{twin}')
    assert [TWIN_NAMES.get(name, name) for name in jax] == list(torch)
    for name in jax.keys() & torch.keys():
        if isinstance(jax[name], ast.FunctionDef):
            assert arguments(jax[name]) == arguments(torch[name]), f'{twin}: {name} takes other arguments'

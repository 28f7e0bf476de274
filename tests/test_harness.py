"""The parity harness: compare, verify and grad, their JSON, verdicts, exit codes and diagnosis.

Commands run in-process (their main functions with argv) to skip interpreter start-up;
one subprocess per command proves the `python -m parity ...` contract. The faulty
implementations are the NumPy example with exactly one fault planted in one block, by a
small wrapper file written into tmp_path.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from conftest import REFERENCE, REPO, in_process, kill_once_written, popen, random_params, run_cli, tolerance
from parity.core import weights
from parity.core.config import ViTConfig
from parity.core.errors import UserError
from parity.data import images
from parity.harness import compare, counterparts, diagnosis, grad, tolerance as policy, verdict, verify

TINY, HYBRID = REFERENCE / 'tiny_token', REFERENCE / 'hybrid_stem'
EXAMPLE = REPO / 'examples' / 'numpy_vit.py'


def case_args(case, x='x', size=None):
    args = [str(case / 'ckpt.npz'), '--config', str(case / 'model.json'), '--input', str(case / f'{x}.npy')]
    return args + (['--image-size', str(size)] if size else [])


def run(main, args, tmp_path, name='out.json'):
    """A command in-process: (exit code, its JSON)."""
    out = tmp_path / name
    code = main([*map(str, args), '--json', str(out)])
    return code, json.loads(out.read_text())


def run_verify(fn, case, tmp_path, *extra):
    ckpt, *rest = case_args(case)
    return run(verify.main, [fn, '--checkpoint', ckpt, *rest, *extra], tmp_path)


def causes(report) -> set:
    return {f['cause'] for f in report['diagnosis'] if f['kind'] == 'cause'}


# --------------------------------------------------------------------------- verify: the NumPy example

@pytest.mark.parametrize('case', [TINY, HYBRID], ids=['tiny_token', 'hybrid_stem'])
def test_numpy_example_passes_verify(case, tmp_path):
    code, report = run_verify(f'{EXAMPLE}:vit', case, tmp_path)
    assert code == 0 and report['first_divergence'] is None and report['ok']
    names = [a['name'] for a in report['activations']]
    assert names[-1] == 'logits' and names.index('attention_1') < names.index('encoderblock_1')
    assert ('stem' in names) == (case == HYBRID)
    assert report['max_abs_logit_diff'] < 1e-5 and report['top1_agreement'] == 1.0
    assert all(a['rel_diff'] < 1e-5 for a in report['activations'])


def wrapper(tmp_path, name: str, body: str) -> str:
    """A file in tmp_path that loads its own copy of the example as `nv`, then runs `body`."""
    path = tmp_path / f'{name}.py'
    path.write_text(textwrap.dedent(f'''
        import importlib.util, math
        import numpy as np
        spec = importlib.util.spec_from_file_location({name!r}, {str(EXAMPLE)!r})
        nv = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(nv)
    ''') + textwrap.dedent(body))
    return str(path)


FAULTY = '''
from scipy.special import erf

FAULT, BLOCK = {fault!r}, {block}
faithful_block = nv.encoder_block


def block(x, p, prefix):
    if prefix != f'Transformer/encoderblock_{{BLOCK}}/':
        return faithful_block(x, p, prefix)
    p, attn = dict(p), prefix + 'MultiHeadDotProductAttention_0/'
    saved = nv.gelu, nv.LN_EPS
    if FAULT == 'erf_gelu':
        nv.gelu = lambda h: 0.5 * h * (1 + erf(h / math.sqrt(2)))
    elif FAULT == 'layernorm_eps':
        nv.LN_EPS = 1e-3
    elif FAULT == 'unscaled_queries':  # scaling the query weights by sqrt(Dh) undoes the 1/sqrt(Dh)
        dh = p[attn + 'query/kernel'].shape[-1]
        for k in ('kernel', 'bias'):
            p[attn + 'query/' + k] = p[attn + 'query/' + k] * np.float32(math.sqrt(dh))
    elif FAULT == 'out_projection_transposed':
        H, Dh, D = p[attn + 'out/kernel'].shape
        p[attn + 'out/kernel'] = p[attn + 'out/kernel'].reshape(H * Dh, D).T.reshape(H, Dh, D)
    try:
        return faithful_block(x, p, prefix)
    finally:
        nv.gelu, nv.LN_EPS = saved


nv.encoder_block = block


def vit(params, x):
    return nv.vit(params, x)
'''


def faulty(tmp_path, fault, block=1):
    return wrapper(tmp_path, f'faulty_{fault}_{block}', FAULTY.format(fault=fault, block=block)) + ':vit'


@pytest.mark.parametrize('fault,block', [('erf_gelu', 1), ('layernorm_eps', 1), ('unscaled_queries', 1),
                                         ('out_projection_transposed', 1), ('erf_gelu', 0)])
def test_one_fault_is_caught_at_its_block_and_named(fault, block, tmp_path):
    code, report = run_verify(faulty(tmp_path, fault, block), TINY, tmp_path)
    assert code == 1 and not report['ok']
    assert report['first_divergence'] == f'encoderblock_{block}'
    upstream = ('embedding', 'with_posemb') + (('attention_0', 'encoderblock_0') if block else ())
    assert all(a['ok'] for a in report['activations'] if a['name'] in upstream)
    assert fault in causes(report), report['diagnosis']
    assert causes(report) == {fault}  # the detectors test hypotheses: nothing else reproduces it


def test_symmetric_padding_in_the_stem_is_named(tmp_path):
    path = wrapper(tmp_path, 'symmetric', '''
        nv.same_padding = lambda size, kernel, stride: (kernel // 2, kernel // 2)  # PyTorch's padding=k//2
        vit = nv.vit
    ''')
    code, report = run_verify(f'{path}:vit', HYBRID, tmp_path)
    assert code == 1 and report['first_divergence'] == 'stem'
    assert causes(report) == {'same_padding'}


def test_verify_reads_what_outsiders_return(tmp_path):
    """Torch tensors, float64, channels-first stem, missing intermediates, an extra key: compared or noted."""
    path = wrapper(tmp_path, 'outsider', '''
        import torch

        def forward(params, x):
            out = nv.vit({k: v.astype(np.float64) for k, v in params.items()}, x.astype(np.float64))
            return {'stem': torch.from_numpy(out['stem']).permute(0, 3, 1, 2).requires_grad_(),
                    'embedding': out['embedding'].reshape(x.shape[0], 2, 2, -1),
                    'encoderblock_1': out['encoderblock_1'],
                    'logits': torch.from_numpy(out['logits'].astype(np.float32)),
                    'encoderblock_01': out['encoderblock_1']}
    ''')
    code, report = run_verify(f'{path}:forward', HYBRID, tmp_path)
    assert code == 0 and report['first_divergence'] is None
    assert [a['name'] for a in report['activations']] == ['stem', 'embedding', 'encoderblock_1', 'logits']
    notes = ' '.join(report['notes'])
    assert 'channels-first' in notes and 'reshaped' in notes and "'encoderblock_01' is not an intermediate" in notes
    assert {s['name'] for s in report['not_compared']} >= {'with_posemb', 'encoderblock_0', 'encoder_norm'}


def test_verify_user_errors_are_one_line(tmp_path):
    ckpt, *rest = case_args(TINY)
    broken = tmp_path / 'broken.py'
    broken.write_text('def vit(params, x):\n    return {"logits": params["no/such/param"]}\n\n'
                      'def other(p, x):\n    return 3\n')
    for spec, needle in [(f'{broken}:nope', "no function 'nope'"), (f'{tmp_path}/missing.py:vit', 'no such file'),
                         (f'{broken}:vit', "KeyError: 'no/such/param' (at broken.py:2)"),
                         (f'{broken}:other', 'returned int'), (str(broken), 'expected FILE.py:FUNCTION')]:
        with pytest.raises(UserError, match=None) as e:
            verify.main([spec, '--checkpoint', ckpt, *rest])
        assert needle in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('body, needle', [
    ('sys.exit(0)', 'your code called sys.exit(0) instead of returning a result'),
    ('os._exit(3)', 'it exited with code 3'),
    ('ctypes.string_at(0)', 'killed by SIGSEGV (a crash in native code)'),
    ('os.kill(os.getpid(), signal.SIGKILL)', 'killed by SIGKILL (out of memory, or killed from outside)'),
    ('raise KeyboardInterrupt', 'your code raised KeyboardInterrupt (an exception raised by Python code'),
], ids=['sys.exit(0)', 'os._exit(3)', 'segfault', 'SIGKILL', 'KeyboardInterrupt'])
def test_verify_reports_how_a_function_ended_never_as_a_pass(tmp_path, body, needle):
    """The user's function runs in a child process: an exit or a crash there is exit 2 here, with a verdict of none."""
    path = tmp_path / 'ends.py'
    path.write_text(f'import ctypes, os, signal, sys\n\ndef vit(params, x):\n    {body}\n')
    ckpt, *rest = case_args(TINY)
    with pytest.raises(UserError) as e:
        verify.main([f'{path}:vit', '--checkpoint', ckpt, *rest])
    assert needle in str(e.value) and str(e.value).startswith(f'{path}:vit: '), e.value


def test_verify_stops_a_function_that_never_returns(tmp_path):
    path = tmp_path / 'hangs.py'
    path.write_text('import subprocess, time\n\ndef vit(params, x):\n'
                    '    subprocess.Popen(["sleep", "600"])\n    while True:\n        time.sleep(1)\n')
    ckpt, *rest = case_args(TINY)
    start = time.monotonic()
    with pytest.raises(UserError, match=r'did not return within 1 s and was stopped \(--timeout SECONDS'):
        verify.main([f'{path}:vit', '--checkpoint', ckpt, *rest, '--timeout', '1'])
    assert time.monotonic() - start < 30


def test_a_killed_verify_takes_the_function_and_what_it_started_with_it(tmp_path):
    """`kill -9` of verify (a scheduler's time limit): the child running the function, and the process that function
    started, go too, instead of running on with the caller's pipes."""
    pids = tmp_path / 'pids'
    path = tmp_path / 'hangs.py'
    path.write_text('import os, subprocess, time\n\ndef vit(params, x):\n'
                    '    sleep = subprocess.Popen(["sleep", "600"])\n'
                    f'    open({str(pids)!r} + ".tmp", "w").write(f"{{os.getpid()}} {{sleep.pid}}")\n'
                    f'    os.rename({str(pids)!r} + ".tmp", {str(pids)!r})\n'
                    '    while True:\n        time.sleep(1)\n')
    ckpt, *rest = case_args(TINY)
    proc = popen('parity', 'verify', f'{path}:vit', '--checkpoint', ckpt, *rest, out=tmp_path / 'verify')
    kill_once_written(proc, pids, tmp_path / 'verify')
    left = [int(p) for p in pids.read_text().split()]
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in left) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in left if _alive(p)], 'still running after verify was killed'


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


def test_verify_runs_nothing_of_the_users_file_in_its_own_process(tmp_path):
    """An exit at import time is reported too, and the file's prints go to stderr, never into the report."""
    path = tmp_path / 'exits_on_import.py'
    path.write_text('import sys\nprint("imported")\nsys.exit(0)\n')
    ckpt, *rest = case_args(TINY)
    with pytest.raises(UserError, match='called sys.exit'):
        verify.main([f'{path}:vit', '--checkpoint', ckpt, *rest])
    assert '_parity_verify' not in ' '.join(sys.modules)


@pytest.mark.slow
def test_verify_command_line(tmp_path):
    out = tmp_path / 'v.json'
    ckpt, *rest = case_args(TINY)
    proc = in_process('parity', 'verify', f'{EXAMPLE}:vit', '--checkpoint', ckpt, *rest, '--json', out)
    assert proc.returncode == 0, proc.stderr
    assert 'verdict: PASS' in proc.stdout
    assert json.loads(out.read_text())['first_divergence'] is None
    proc = in_process('parity', 'verify', f'{faulty(tmp_path, "erf_gelu")}', '--checkpoint', ckpt, *rest, '--json',
                      out)
    assert proc.returncode == 1 and 'first divergence at encoderblock_1' in proc.stdout
    report = json.loads(out.read_text())
    assert set(report) >= {'first_divergence', 'activations', 'max_abs_logit_diff', 'top1_agreement', 'diagnosis'}
    assert set(report['activations'][0]) >= {'name', 'shape', 'max_abs_diff', 'rel_diff', 'cosine'}
    exits = tmp_path / 'exits.py'
    exits.write_text('import sys\n\ndef vit(params, x):\n    sys.exit(0)\n')
    out.unlink()
    proc = run_cli('parity', 'verify', f'{exits}:vit', '--checkpoint', ckpt, *rest, '--json', out)
    assert proc.returncode == 2 and 'verdict' not in proc.stdout and not out.exists()
    assert proc.stderr.strip().splitlines()[-1].startswith(f'error: {exits}:vit: your code called sys.exit(0)')


# --------------------------------------------------------------------------- compare

@pytest.mark.parametrize('case,x,size', [(TINY, 'x', None), (TINY, 'x_resized', 48), (HYBRID, 'x', None)],
                         ids=['tiny_token', 'tiny_token-resized', 'hybrid_stem'])
def test_compare_passes_on_the_reference_vectors(case, x, size, tmp_path):
    code, report = run(compare.main, case_args(case, x, size) + ['--attention'], tmp_path)
    assert code == 0 and report['first_divergence'] is None and report['diagnosis'] == []
    assert report['max_abs_logit_diff'] < 1e-5 and report['top1_agreement'] == 1.0
    assert any(a['name'] == 'attention_0' for a in report['activations'])


def test_compare_fails_on_a_mismatched_candidate(tmp_path, monkeypatch):
    """vit_torch with one LayerNorm's eps changed: caught at that block, in that sub-step, for that reason."""
    from vit_torch import params as torch_params

    build = torch_params.build_model

    def mismatched(cfg, params, **kw):
        model = build(cfg, params, **kw)
        model.Transformer.encoderblock_1.LayerNorm_1.eps = 1e-2
        return model

    monkeypatch.setattr(torch_params, 'build_model', mismatched)
    code, report = run(compare.main, case_args(TINY), tmp_path)
    assert code == 1 and report['first_divergence'] == 'encoderblock_1'
    where = {f['where'] for f in report['diagnosis'] if f['kind'] == 'localisation'}
    assert where == {'encoderblock_1/LayerNorm_1'}
    eps = [f['eps'] for f in report['diagnosis'] if f['cause'] == 'layernorm_eps']
    assert eps and abs(math.log10(eps[0] / 1e-2)) < 0.1


@pytest.mark.slow  # compiles the reference at two precisions and the candidate under autocast
def test_compare_reduced_precision(tmp_path):
    code, report = run(compare.main, case_args(TINY) + ['--precision', 'bf16'], tmp_path)
    assert code == 0 and report['precision'] == 'bf16' and report['top1_agreement'] == 1.0
    assert 1e-4 < report['max_abs_logit_diff'] < 0.1  # bf16 really ran, inside its bound
    assert 0 < report['yardstick']['max_abs_logit_diff'] < 0.1
    code, report = run(compare.main, case_args(TINY) + ['--precision', 'tf32'], tmp_path)
    assert code == 0 and any('no TF32 on CPU' in n for n in report['notes'])
    assert report['max_abs_logit_diff'] < 1e-5


def test_compare_reads_an_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8)).save(tmp_path / 'a.jpg')
    Image.fromarray(rng.integers(0, 255, (20, 20), np.uint8), 'L').save(tmp_path / 'b.png')
    Image.fromarray(rng.integers(0, 255, (30, 30, 4), np.uint8), 'RGBA').save(tmp_path / 'c.png')
    (tmp_path / 'notes.txt').write_text('not an image')
    x = images.load_images(images.images_in(str(tmp_path)), 32)
    assert x.shape == (3, 32, 32, 3) and x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1
    ckpt, cfg_flag, cfg_path, *_ = case_args(TINY)
    code, report = run(compare.main, [ckpt, cfg_flag, cfg_path, '--images', tmp_path], tmp_path)
    assert code == 0 and report['batch'].startswith('3 images')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(UserError, match='holds no image files'):
        images.images_in(str(tmp_path / 'empty'))
    with pytest.raises(UserError, match='no such directory'):
        images.images_in(str(tmp_path / 'missing'))


@pytest.mark.slow
def test_compare_command_line(tmp_path):
    out = tmp_path / 'c.json'
    proc = in_process('parity', 'compare', *case_args(HYBRID), '--json', out)
    assert proc.returncode == 0, proc.stderr
    assert 'verdict: PASS' in proc.stdout and 'stem' in proc.stdout
    report = json.loads(out.read_text())
    assert report['max_abs_logit_diff'] < 1e-5 and report['first_divergence'] is None
    proc = run_cli('parity', 'compare', *case_args(HYBRID), '--against', 'hf')
    assert proc.returncode == 2 and 'cannot express a hybrid' in proc.stderr and 'Traceback' not in proc.stderr


# --------------------------------------------------------------------------- counterparts

@pytest.fixture(scope='module')
def small(tmp_path_factory):
    """A small random ViT with tiny token activations, so LayerNorm eps matters, as a released npz."""
    cfg = ViTConfig(name=None, patch_size=(8, 8), hidden_size=64, num_layers=2, mlp_dim=128, num_heads=4,
                    num_classes=10, image_size=32)
    params = random_params(weights.param_shapes(cfg), seed=5)
    for k in ('embedding/kernel', 'embedding/bias', 'cls', weights.POSEMB):
        params[k] = params[k] * np.float32(1e-3)
    path = tmp_path_factory.mktemp('small') / 'small.npz'
    weights.save_npz(str(path), params)
    return path


def test_against_hf_names_erf_gelu_and_layernorm_eps(small, tmp_path):
    code, report = run(compare.main, [small, '--against', 'hf'], tmp_path)
    assert code == 1 and report['first_divergence'] == 'encoderblock_0'
    assert [a['ok'] for a in report['activations'][:2]] == [True, True]  # embeddings convert exactly
    assert causes(report) == {'erf_gelu', 'layernorm_eps'}
    assert [f['eps'] for f in report['diagnosis'] if f['cause'] == 'layernorm_eps'] == [1e-12]


def test_hf_conversion_table_is_complete(small):
    params = weights.load_npz(str(small))
    cfg = weights.resolve_config(None, params)
    model = counterparts.build_hf(cfg, params)
    state = model.state_dict()
    converted = counterparts.to_hf(params, cfg)
    assert converted.keys() == state.keys()
    assert all(np.array_equal(converted[k], state[k].numpy()) for k in converted)
    for bad in (cfg.replace(classifier='gap'), cfg.replace(resnet_num_layers=()), cfg.replace(representation_size=8)):
        with pytest.raises(UserError, match='cannot express'):
            counterparts.check_hf_expressible(bad)


def test_against_timm_names_erf_gelu(timm_small, tmp_path):
    code, report = run(compare.main, [timm_small, '--against', 'timm:test_vit', '--attention'], tmp_path)
    assert code == 1 and report['first_divergence'] == 'encoderblock_0'
    assert [a['name'] for a in report['activations'] if a['ok']][:3] == ['embedding', 'with_posemb', 'attention_0']
    assert causes(report) == {'erf_gelu'}
    assert {f['where'] for f in report['diagnosis'] if f['kind'] == 'localisation'} == {'encoderblock_0/MlpBlock_0'}


def test_against_timm_names_its_position_embedding_resize(timm_small, tmp_path):
    code, report = run(compare.main, [timm_small, '--against', 'timm:test_vit', '--image-size', 96], tmp_path)
    assert code == 1 and report['first_divergence'] == 'with_posemb'
    found = [f for f in report['diagnosis'] if f['cause'] == 'posemb_resize']
    assert found and found[0]['method'].startswith('torch bilinear')


def test_against_timm_refuses_what_it_cannot_hold(timm_small):
    for spec, needle in [('timm:vit_tiny_patch16_224', 'does not fit the checkpoint'),
                         ('timm:no_such_vit', 'timm has no such model'), ('tim:x', 'expected timm:MODEL_NAME')]:
        with pytest.raises(UserError, match=needle):
            compare.main([str(timm_small), '--against', spec])


# --------------------------------------------------------------------------- grad

def test_numpy_stem_with_stages_is_the_reference_stem():
    """The diagnosis's ResNet (projected and strided units) is the reference's; symmetric padding is not."""
    cfg = ViTConfig(name='staged', patch_size=(1, 1), hidden_size=32, num_layers=1, mlp_dim=64, num_heads=4,
                    resnet_num_layers=(2, 1), resnet_width_factor=0.5, num_classes=5, image_size=32)
    params = random_params(weights.param_shapes(cfg), seed=2, scale=0.1)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    ref = verdict.run_reference(cfg, params, x)['stem']
    assert np.abs(diagnosis.stem(cfg, params, x) - ref).max() <= tolerance(ref)
    symmetric = diagnosis.stem(cfg, params, x, diagnosis.StemNumerics('symmetric', 'symmetric'))
    assert not policy.within(ref, symmetric)


@pytest.mark.slow  # the hybrid's two backward passes compile for several seconds
def test_grad_parity_on_a_hybrid(tmp_path):
    code, report = run(grad.main, case_args(HYBRID) + ['--lr', '0.1'], tmp_path)
    assert code == 0 and report['first_divergence'] is None and report['loss']['ok']
    names = [g['name'] for g in report['gradients']]
    cfg = weights.resolve_config(str(HYBRID / 'model.json'), weights.load_npz(str(HYBRID / 'ckpt.npz')))
    assert names == list(weights.param_shapes(cfg))
    assert 'conv_root/kernel' in names and all(g['ok'] for g in report['gradients'])
    assert all(u['ok'] for u in report['updated_params'])
    assert max(g['max_abs_diff'] for g in report['gradients']) > 0  # two real backward passes


@pytest.mark.slow
def test_grad_command_line_on_a_tiny_vit(tmp_path):
    out, labels = tmp_path / 'g.json', tmp_path / 'labels.npy'
    np.save(labels, np.array([3, 7]))
    proc = in_process('parity', 'grad', *case_args(TINY), '--labels', labels, '--json', out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report['first_divergence'] is None and report['labels'] == [3, 7] and report['momentum'] == 0.9
    assert len(report['gradients']) == len(report['updated_params']) == 40
    np.save(labels, np.array([3, 70]))
    with pytest.raises(UserError, match=r'class indices must lie in \[0, 10\)'):
        grad.main([*case_args(TINY), '--labels', str(labels)])


# --------------------------------------------------------------------------- the pieces

def test_faithful_numpy_block_is_the_reference_block():
    raw = weights.load_npz(str(TINY / 'ckpt.npz'))
    cfg = weights.resolve_config(str(TINY / 'model.json'), raw)
    params = weights.prepare_for_inference(raw, cfg, 'tiny')
    ref = verdict.run_reference(cfg, params, np.load(TINY / 'x.npy'), attention=True)
    got = diagnosis.block(ref['encoderblock_0'], diagnosis.block_params(params, 1))
    assert np.abs(got['output'] - ref['encoderblock_1']).max() <= tolerance(ref['encoderblock_1'])
    assert np.abs(got['weights'] - ref['attention_1']).max() <= tolerance(ref['attention_1'])


def test_tf32_rounding_and_its_detector():
    a = np.array([1.0, 1 + 2 ** -10, 1 + 2 ** -12, 1 + 3 * 2 ** -11, -3.14159265], np.float32)
    r = diagnosis.round_operand(a, 'tf32')
    assert list(r[:4]) == [1.0, 1 + 2 ** -10, 1.0, 1 + 2 ** -9]  # ties to even
    assert abs(r[4] - a[4]) <= 2 ** -11 * abs(a[4])
    cfg = ViTConfig(name=None, patch_size=(8, 8), hidden_size=32, num_layers=1, mlp_dim=64, num_heads=4,
                    num_classes=5, image_size=16)
    params = random_params(weights.param_shapes(cfg), seed=1)
    u = np.random.default_rng(0).normal(0, 3, (2, 5, 32))
    p = diagnosis.block_params(params, 0)
    tf32 = diagnosis.block(u, p, diagnosis.Numerics(matmul='tf32'))['output']
    assert not policy.within(diagnosis.block(u, p)['output'], tf32)  # TF32 is visible at the fp32 bound
    found = diagnosis.diagnose_block(0, params, u, {'encoderblock_0': tf32}, 'fp32', 'test input')
    assert {f['cause'] for f in found if f['kind'] == 'cause'} == {'tf32_matmul'}


def test_tolerance_policy():
    ref = np.array([[3.0, 1.0, 0.0], [0.5, 0.5 + 1e-7, 0.0]])
    assert policy.bound(ref) == pytest.approx(3e-5) and policy.bound(ref * 0.1) == pytest.approx(1e-5)
    assert tolerance is policy.bound  # tests/conftest.py uses the written policy
    swapped = ref[:, [1, 0, 2]].copy()  # row 1: the two near-equal classes trade places
    swapped[0] = ref[0]
    assert policy.topk_agreement(ref, swapped, 1) == 0.5
    assert policy.top1_disagreements(ref, swapped, 'bf16') == 0  # a near-tie is not a disagreement
    assert policy.top1_disagreements(ref, ref[:, ::-1], 'fp32') == 1
    row = policy.measure('x', ref, ref + 1e-6, 1e-5)
    assert row['ok'] and row['cosine'] == pytest.approx(1.0) and row['rel_diff'] == pytest.approx(1e-6 / 3)
    assert not policy.measure('x', ref, ref[:1], 1e-5)['ok']
    assert not policy.measure('x', ref, ref * np.nan, 1e-5)['ok']


def test_align_reads_conventions_not_faults():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5)
    got, note = counterparts.align('stem', (2, 4, 5, 3), x)  # a torch stem, NCHW
    assert np.array_equal(got, x.transpose(0, 2, 3, 1)) and 'channels-first' in note
    got, note = counterparts.align('embedding', (2, 12, 5), x)
    assert np.array_equal(got, x.reshape(2, 12, 5)) and 'reshaped' in note
    got, note = counterparts.align('embedding', (2, 13, 5), x[:, :2])
    assert got is None and 'not compared' in note
    assert counterparts.to_numpy(torch.ones(2, dtype=torch.bfloat16, requires_grad=True)).dtype == np.float32

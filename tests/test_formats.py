"""Every public ViT checkpoint layout in and out: big_vision, timm and Hugging Face, through the one weight layer.

The files are made by each library's own code where it is installed (timm's npz loader
and state dicts, transformers' `save_pretrained`), and for big_vision, which is not on
PyPI, by `tests/big_vision_vit.py`, a stand-in written from what big_vision documents.
Every reader is held to the source model's logits within the fp32 bound, in both
frameworks; every writer to what the target library itself makes of the file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import big_vision_vit as bv
from conftest import random_params, run_cli, tiny, tolerance
from parity import cli
from parity.core import weights
from parity.core.config import BIG_VISION_VARIANTS, ViTConfig
from parity.core.errors import UserError
from parity.core.weights.formats import timm as timm_format
from parity.harness import counterparts
from vit_jax import cli as jax_cli, runtime as jax_runtime
from vit_torch import cli as torch_cli, runtime as torch_runtime

S = 32  # images are 32x32: a 4x4 grid of 8x8 patches
X = np.random.default_rng(7).uniform(-1, 1, (2, S, S, 3)).astype(np.float32)
SMALL = dict(patch_size=(8, 8), width=32, depth=2, mlp_dim=64, num_heads=4)  # big_vision's keyword arguments
FRAMEWORKS = {'vit_jax': jax_runtime.forward, 'vit_torch': torch_runtime.forward}


def logits_of(path, config=None, numerics='source') -> dict[str, np.ndarray]:
    """What both frameworks compute for X from a checkpoint file, read as the commands read it."""
    cfg, params = cli.load_checkpoint(str(path), None if config is None else str(config), None, S, numerics)
    return {fw: forward(cfg, params)(X) for fw, forward in FRAMEWORKS.items()}


def assert_close(got: dict, want: np.ndarray) -> None:
    for fw, y in got.items():
        assert y.shape == want.shape and np.abs(y - want).max() <= tolerance(want), (fw, np.abs(y - want).max())


def write_json(path: Path, d: dict) -> Path:
    path.write_text(json.dumps(d))
    return path


def official(tmp_path, cfg, name='ckpt.npz', seed=0) -> tuple[Path, dict, np.ndarray]:
    """A random checkpoint of `cfg` in the released layout, its params, and the official logits for X."""
    params = random_params(weights.param_shapes(cfg), seed=seed)
    path = tmp_path / name
    weights.save_npz(str(path), params)
    return path, params, jax_runtime.forward(cfg, params)(X)


# --------------------------------------------------------------------------- big_vision

BIG_VISION_CASES = {
    'map': dict(pool_type='map'),
    'tok-rep': dict(pool_type='tok', rep_size=True),
    'gap-sincos2d-scan': dict(pool_type='gap', posemb='sincos2d', scan=True),
    'first': dict(pool_type='0'),
    'none': dict(pool_type='none'),
    'map-bfloat16': dict(pool_type='map'),
}


def big_vision_file(tmp_path, case: str, num_classes=5) -> tuple[Path, Path, np.ndarray]:
    """A big_vision checkpoint of `case`, its model config as JSON, and big_vision's logits for X."""
    kw = BIG_VISION_CASES[case]
    model = bv.Model(num_classes=num_classes, **SMALL, **kw)
    params = bv.init(model, S)
    if case.endswith('bfloat16'):  # what a bfloat16 run saves; its logits are those of the rounded weights
        params = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16), params)
        bv.save_checkpoint(params, tmp_path / f'{case}.npz')
        params = jax.tree.map(lambda a: np.asarray(a).astype(np.float32), params)
    else:
        bv.save_checkpoint({'params': params}, tmp_path / f'{case}.npz')  # a training checkpoint nests params/
    config = write_json(tmp_path / f'{case}.json', {'num_classes': num_classes, **SMALL, **kw,
                                                     'patch_size': list(SMALL['patch_size'])})
    return tmp_path / f'{case}.npz', config, bv.logits(model, params, X)


@pytest.mark.parametrize('case', BIG_VISION_CASES)
def test_big_vision_checkpoints_give_big_visions_logits(tmp_path, case):
    path, config, want = big_vision_file(tmp_path, case)
    assert_close(logits_of(path, config), want)
    if case in ('map', 'tok-rep', 'map-bfloat16'):  # the MAP head and the class token say how the file pools
        assert_close(logits_of(path), want)
    else:  # gap, 0 and none look alike: the error says which --config to give
        with pytest.raises(UserError, match='pool_type'):
            logits_of(path)


def test_scan_and_loop_files_of_one_model_give_the_same_logits(tmp_path):
    loop, scan = (bv.Model(num_classes=5, **SMALL, pool_type='map', scan=s) for s in (False, True))
    params = bv.init(loop, S)
    bv.save_checkpoint(params, tmp_path / 'loop.npz')
    stacked = dict(params, Transformer=dict(
        {k: v for k, v in params['Transformer'].items() if not k.startswith('encoderblock_')},
        encoderblock=jax.tree.map(lambda *a: np.stack(a), params['Transformer']['encoderblock_0'],
                                  params['Transformer']['encoderblock_1'])))
    bv.save_checkpoint(stacked, tmp_path / 'scan.npz')
    assert np.abs(bv.logits(scan, stacked, X) - bv.logits(loop, params, X)).max() < 1e-6  # the stand-in agrees
    a, b = logits_of(tmp_path / 'loop.npz'), logits_of(tmp_path / 'scan.npz')
    for fw in FRAMEWORKS:
        np.testing.assert_array_equal(a[fw], b[fw])


def test_bfloat16_is_read_as_bfloat16_and_upcast_exactly(tmp_path):
    path, _, _ = big_vision_file(tmp_path, 'map-bfloat16')
    with np.load(path) as z:
        stored = {k: z[k] for k in z.files}
    assert all(v.dtype == np.dtype('V2') for v in stored.values())  # how np.savez writes bfloat16
    got = weights.load(str(path)).shapes
    for k, v in stored.items():
        want = v.view(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(got[weights.POSEMB if k == 'pos_embedding' else k], want, err_msg=k)


def test_a_siglip_two_tower_file_reads_its_image_tower(tmp_path):
    model = bv.Model(num_classes=None, **SMALL, pool_type='map')  # SigLIP's image tower: MAP head, no head here
    img = bv.init(model, S)
    txt = {'Embed_0': {'embedding': np.ones((10, 32), np.float32)}, 'Encoder_0': {'encoder_norm': {
        'scale': np.ones(32, np.float32), 'bias': np.zeros(32, np.float32)}}, 'head': {'kernel': np.ones((32, 8))}}
    path = tmp_path / 'siglip.npz'
    bv.save_checkpoint({'params': {'img': img, 'txt': txt, 't': np.ones(1), 'b': np.zeros(1)}}, path)
    want = bv.logits(model, img, X)  # the pooled features
    assert_close(logits_of(f'{path}:img'), want)
    ckpt = weights.load(str(path))  # one image tower in the file: found, and said so
    assert ckpt.format == 'big_vision' and any('under img/' in n for n in ckpt.notes)
    with pytest.raises(UserError, match=r"no ViT image tower .*Embed_0, Encoder_0, head"):
        weights.load(f'{path}:txt')
    with pytest.raises(UserError, match=r"no subtree 'nope'.*b, img, t, txt"):
        weights.load(f'{path}:nope')


def test_a_file_with_two_towers_is_refused(tmp_path):
    tower = bv.init(bv.Model(num_classes=5, **SMALL, pool_type='map'), S)
    bv.save_checkpoint({'params': {'a': tower, 'b': tower}}, tmp_path / 'two.npz')
    with pytest.raises(UserError, match=r'holds 2 ViT towers \(under a/, b/\).*FILE:SUBTREE'):
        weights.load(str(tmp_path / 'two.npz'))


def vit_load_of_an_official_file(flat: dict) -> dict:
    """What big_vision's `vit.load` documents doing to an official file, written out from its description.

    Pre-linen names to linen's (`convert_pre_linen`), the position embeddings moved to the
    top, and the class token's row folded into the class token (`cls += pos_embedding[:, :1]`).
    """
    rename = {'MultiHeadDotProductAttention_1': 'MultiHeadDotProductAttention_0', 'LayerNorm_2': 'LayerNorm_1',
              'MlpBlock_3': 'MlpBlock_0'}
    out = {}
    for k, v in flat.items():
        parts = k.split('/')
        out['/'.join(rename.get(p, p) if parts[0] == 'Transformer' else p for p in parts)] = np.asarray(v)
    pe = out.pop('Transformer/posembed_input/pos_embedding')
    out['cls'] = out['cls'] + pe[:, :1]
    out['pos_embedding'] = pe[:, 1:]
    return out


def test_big_vision_export_of_an_official_file_is_what_vit_load_makes(reference, tmp_path):
    src = reference / 'tiny_token' / 'ckpt.npz'
    proc = run_cli('vit_torch', 'convert', src, tmp_path / 'bv.npz', '--to', 'big_vision')
    assert proc.returncode == 0, proc.stderr
    with np.load(src) as z:
        want = vit_load_of_an_official_file({k: z[k] for k in z.files})
    with np.load(tmp_path / 'bv.npz') as z:
        assert list(z.files) == sorted(z.files) and all(k.startswith('params/') for k in z.files)
        got = {k[len('params/'):]: z[k] for k in z.files}
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_big_vision_round_trips(tmp_path):
    # No class token: every array goes there and back bit for bit.
    gap = tiny(classifier='gap')
    path, params, want = official(tmp_path, gap)
    weights.save(str(tmp_path / 'bv.npz'), dict(params), gap, 'big_vision')
    back = weights.load(str(tmp_path / 'bv.npz')).shapes
    assert back.keys() == params.keys() and all(np.array_equal(back[k], params[k]) for k in params)
    # A class token: big_vision keeps it and its position row as one sum, so the logits are what stays exact.
    token = tiny()
    path, params, want = official(tmp_path, token)
    weights.save(str(tmp_path / 'bv_tok.npz'), dict(params), token, 'big_vision')
    got = logits_of(tmp_path / 'bv_tok.npz')
    np.testing.assert_array_equal(got['vit_jax'], want)  # adding the folded row's zero is exact
    back = weights.load(str(tmp_path / 'bv_tok.npz')).shapes
    for k in params.keys() - {'cls', weights.POSEMB}:
        np.testing.assert_array_equal(back[k], params[k], err_msg=k)
    np.testing.assert_array_equal(back[weights.POSEMB][:, 1:], params[weights.POSEMB][:, 1:])
    weights.save(str(tmp_path / 'again.npz'), dict(back), token, 'big_vision')
    with np.load(tmp_path / 'bv_tok.npz') as a, np.load(tmp_path / 'again.npz') as b:
        assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)


# --------------------------------------------------------------------------- timm

TIMM_CASES = {'token': tiny(), 'gap': tiny(classifier='gap'), 'map': tiny(classifier='map')}


def timm_model(cfg):
    from timm.models.vision_transformer import VisionTransformer

    pool, class_token = timm_format.POOLS[cfg.classifier]
    return VisionTransformer(img_size=S, patch_size=cfg.patch_size[0], embed_dim=cfg.hidden_size, depth=cfg.num_layers,
                             num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_dim / cfg.hidden_size,
                             num_classes=cfg.num_classes, class_token=class_token, global_pool=pool, fc_norm=False,
                             act_layer='gelu_tanh').eval()


def timm_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch_runtime.to_nchw(X, 'cpu')).numpy()


@pytest.fixture(scope='module')
def timm_files(tmp_path_factory):
    """Per case: timm's model loaded by timm's own npz loader, saved as .safetensors and .pth; its logits."""
    from timm.models.vision_transformer import _load_weights

    root, out = tmp_path_factory.mktemp('timm'), {}
    for name, cfg in TIMM_CASES.items():
        params = random_params(weights.param_shapes(cfg), seed=3)
        npz = root / f'{name}.npz'
        weights.save(str(npz), dict(params), cfg, 'npz' if cfg.is_official else 'big_vision')
        model = timm_model(cfg)
        _load_weights(model, str(npz))
        save_file(model.state_dict(), str(root / f'{name}.safetensors'))
        torch.save(model.state_dict(), root / f'{name}.pth')
        config = write_json(root / f'{name}.json', dict(cfg.to_official_dict(), image_size=S))
        out[name] = root, config, timm_logits(model), params
    return out


@pytest.mark.parametrize('case', TIMM_CASES)
@pytest.mark.parametrize('suffix', ['.safetensors', '.pth'])
def test_timm_files_give_timms_logits(timm_files, case, suffix):
    root, config, want, _ = timm_files[case]
    assert weights.load(str(root / f'{case}{suffix}')).format == 'timm'
    # built with act_layer='gelu_tanh', which a bare file does not record: timm's default would be erf
    assert_close(logits_of(root / f'{case}{suffix}', config, 'official'), want)


def test_timm_files_do_not_record_their_heads(timm_files):
    root, _, _, _ = timm_files['token']
    with pytest.raises(UserError, match='does not record its number of heads.*pass --config'):
        logits_of(root / 'token.safetensors')


def test_a_timm_hub_folder_names_its_variant(tmp_path):
    import timm

    model = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=S, patch_size=8, num_classes=5,
                              act_layer='gelu_tanh').eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # a zero head would hide everything
    (tmp_path / 'hub').mkdir()
    save_file(model.state_dict(), str(tmp_path / 'hub' / 'model.safetensors'))
    write_json(tmp_path / 'hub' / 'config.json', {'architecture': 'vit_tiny_patch16_224', 'num_classes': 5,
                                                  'global_pool': 'token', 'model_args': {'act_layer': 'gelu_tanh'}})
    assert_close(logits_of(tmp_path / 'hub'), timm_logits(model))  # 3 heads, from "tiny"


@pytest.mark.parametrize('case', TIMM_CASES)
@pytest.mark.parametrize('suffix', ['.safetensors', '.pth'])
def test_our_timm_export_loads_strictly_into_timm(timm_files, tmp_path, case, suffix):
    _, _, _, params = timm_files[case]
    cfg = TIMM_CASES[case].replace(image_size=S)
    path = tmp_path / f'export{suffix}'
    weights.save(str(path), dict(params), cfg, 'timm')
    model = timm_model(cfg)
    state = load_file(str(path)) if suffix == '.safetensors' else torch.load(path, weights_only=True)
    model.load_state_dict(state, strict=True)
    want = jax_runtime.forward(cfg, params)(X)
    assert np.abs(timm_logits(model) - want).max() <= tolerance(want)
    back = weights.load(str(path)).params(cfg)  # and back: bit for bit
    assert back.keys() == params.keys() and all(np.array_equal(back[k], params[k]) for k in params)


def test_timm_files_the_official_model_cannot_compute_are_refused(timm_files, tmp_path):
    root, config, _, _ = timm_files['token']
    state = load_file(str(root / 'token.safetensors'))
    bad = dict(state, **{'blocks.0.attn.qkv.weight': state['blocks.0.attn.qkv.weight'][:64]})  # 2 x 32, not 3
    save_file(bad, str(tmp_path / 'qkv.safetensors'))
    with pytest.raises(UserError, match=r'blocks\.0\.attn\.qkv\.weight expected \(96, 32\) found \(64, 32\)'):
        logits_of(tmp_path / 'qkv.safetensors', config)
    save_file(dict(state, **{'fc_norm.weight': torch.ones(32), 'fc_norm.bias': torch.zeros(32)}),
              str(tmp_path / 'fc_norm.safetensors'))
    with pytest.raises(UserError, match="fc_norm"):
        weights.load(str(tmp_path / 'fc_norm.safetensors'))


def test_a_timm_deit_distilled_file_gives_timms_logits_and_goes_back(tmp_path):
    """timm's own VisionTransformerDistilled (tiny, timm's erf GELU) saved by timm: both frameworks give its logits."""
    from timm.models.deit import VisionTransformerDistilled

    cfg = tiny(classifier='token_distilled')
    model = VisionTransformerDistilled(img_size=S, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2,
                                       num_classes=5).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # zero heads would hide everything
    save_file(model.state_dict(), str(tmp_path / 'deit.safetensors'))
    config = write_json(tmp_path / 'deit.json', dict(cfg.to_official_dict(), image_size=S))
    want = timm_logits(model)
    assert weights.load(str(tmp_path / 'deit.safetensors')).format == 'timm'
    assert_close(logits_of(tmp_path / 'deit.safetensors', config), want)
    params = weights.load(str(tmp_path / 'deit.safetensors')).params(cfg)
    weights.save(str(tmp_path / 'back.safetensors'), dict(params), cfg, 'timm')
    again = VisionTransformerDistilled(img_size=S, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2,
                                       num_classes=5).eval()
    again.load_state_dict(load_file(str(tmp_path / 'back.safetensors')), strict=True)
    np.testing.assert_array_equal(timm_logits(again), want)
    # The released npz layout holds it too (its extra arrays by name), and the config is read back from it.
    weights.save(str(tmp_path / 'deit.npz'), dict(params), cfg, 'npz')
    # the npz records no numerics: the config says timm's erf GELU
    erf = write_json(tmp_path / 'deit-erf.json', dict(cfg.replace(gelu='erf').to_official_dict(), image_size=S))
    assert_close(logits_of(tmp_path / 'deit.npz', erf), want)
    assert weights.infer_config(weights.load_npz(str(tmp_path / 'deit.npz'))).classifier == 'token_distilled'
    with pytest.raises(UserError, match="distillation token"):
        weights.save(str(tmp_path / 'bv.npz'), dict(params), cfg, 'big_vision')


def test_deit_parameter_counts_are_timms():
    import timm

    for name, variant in (('deit_tiny_distilled_patch16_224', 'Ti'), ('deit_small_distilled_patch16_224', 'S')):
        D, L, M, H = BIG_VISION_VARIANTS[variant]
        cfg = ViTConfig(name=None, patch_size=(16, 16), hidden_size=D, num_layers=L, mlp_dim=M, num_heads=H,
                        classifier='token_distilled', num_classes=1000, image_size=224)
        model = timm.create_model(name, pretrained=False)
        assert weights.count_params(cfg) == sum(p.numel() for p in model.parameters()), name


# --------------------------------------------------------------------------- Hugging Face

def hub_folder(tmp_path, params, cfg, name='hub', **extra) -> Path:
    """transformers' save_pretrained of `params`, with Google's hub-style config (erf GELU, eps 1e-12)."""
    from transformers import ViTConfig as HFConfig, ViTForImageClassification

    labels = {i: f'thing {i}' for i in range(cfg.num_classes)}
    hf_cfg = HFConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                      num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim, image_size=cfg.image_size,
                      patch_size=cfg.patch_size[0], id2label=labels, label2id={v: k for k, v in labels.items()},
                      **extra)
    model = ViTForImageClassification(hf_cfg).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in counterparts.to_hf(params, cfg).items()}, strict=True)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def hf_logits(folder) -> np.ndarray:
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(folder, attn_implementation='eager').eval()
    with torch.no_grad():
        return model(pixel_values=torch_runtime.to_nchw(X, 'cpu')).logits.numpy()


def test_a_hub_folder_gives_transformers_logits_or_with_numerics_official_the_official_ones(tmp_path, capsys):
    cfg = tiny()
    _, params, want = official(tmp_path, cfg)
    folder = hub_folder(tmp_path, params, cfg)
    assert json.loads((folder / 'config.json').read_text())['hidden_act'] == 'gelu'
    assert_close(logits_of(folder), hf_logits(folder))
    assert 'numerics: erf GELU, LayerNorm eps 1e-12' in capsys.readouterr().err
    assert_close(logits_of(folder, numerics='official'), want)
    # transformers itself, told the official numerics, computes the same function from the same file
    assert np.abs(hf_logits(hub_folder(tmp_path, params, cfg, 'tanh', hidden_act='gelu_pytorch_tanh',
                                       layer_norm_eps=1e-6)) - want).max() <= tolerance(want)
    # model.safetensors alone: its folder's config.json is read; without one, the heads are unknown
    assert_close(logits_of(folder / 'model.safetensors', numerics='official'), want)
    (tmp_path / 'alone').mkdir()
    shutil.copy(folder / 'model.safetensors', tmp_path / 'alone')
    with pytest.raises(UserError, match='does not record its number of heads'):
        logits_of(tmp_path / 'alone' / 'model.safetensors')


def test_class_names_come_from_id2label(tmp_path, capsys):
    from vit_jax import cli as jax_cli

    cfg = tiny()
    _, params, _ = official(tmp_path, cfg)
    folder = hub_folder(tmp_path, params, cfg)
    photo = Path(__import__('skimage.data').data.__file__).parent / 'chelsea.png'
    assert jax_cli.predict_main([str(photo), '--checkpoint', str(folder), '--top', '2']) == 0
    out, err = capsys.readouterr()
    assert out.count('thing ') == 2 and "its config.json's id2label" in err


def test_a_vit_model_folder_gives_its_pooler_as_pre_logits(tmp_path):
    from transformers import ViTConfig as HFConfig, ViTModel

    model = ViTModel(HFConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              image_size=S, patch_size=8, hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6)).eval()
    model.save_pretrained(tmp_path / 'vitmodel')
    with torch.no_grad():
        want = model(pixel_values=torch_runtime.to_nchw(X, 'cpu')).pooler_output.numpy()
    cfg = weights.configure(weights.load(str(tmp_path / 'vitmodel')), None)
    assert cfg.representation_size == 32 and cfg.num_classes == 0
    assert_close(logits_of(tmp_path / 'vitmodel'), want)


def test_our_hf_export_is_what_transformers_reads(tmp_path):
    from transformers import ViTImageProcessor

    cfg = tiny()
    _, params, want = official(tmp_path, cfg)
    weights.save(str(tmp_path / 'hf'), dict(params), cfg, 'hf')
    d = json.loads((tmp_path / 'hf' / 'config.json').read_text())
    assert (d['hidden_act'], d['layer_norm_eps']) == ('gelu_pytorch_tanh', 1e-6)
    assert np.abs(hf_logits(tmp_path / 'hf') - want).max() <= tolerance(want)
    pixels = np.random.default_rng(1).integers(0, 256, (S, S, 3)).astype(np.uint8)
    processed = ViTImageProcessor.from_pretrained(tmp_path / 'hf')(pixels, return_tensors='np')['pixel_values']
    np.testing.assert_allclose(processed[0].transpose(1, 2, 0), pixels / 127.5 - 1, atol=1e-6)  # official [-1, 1]
    back = weights.load(str(tmp_path / 'hf')).params(cfg)
    assert back.keys() == params.keys() and all(np.array_equal(back[k], params[k]) for k in params)


def test_hf_folders_that_are_not_a_vits_are_refused(tmp_path):
    cfg = tiny()
    _, params, _ = official(tmp_path, cfg)
    folder = hub_folder(tmp_path, params, cfg)
    (folder / 'config.json').unlink()
    with pytest.raises(UserError, match='needs its config.json'):
        weights.load(str(folder))
    write_json(folder / 'config.json', {'model_type': 'bert', 'hidden_size': 32})
    with pytest.raises(UserError, match="model_type 'bert', not a transformers ViT"):
        weights.load(str(folder))


# --------------------------------------------------------------------------- the layout from the contents

def test_the_layout_is_found_from_the_contents_not_the_name(reference, tmp_path):
    shutil.copy(reference / 'tiny_token' / 'ckpt.npz', tmp_path / 'weights.bin')
    assert weights.load(str(tmp_path / 'weights.bin')).format == 'released'
    params = random_params(weights.param_shapes(tiny()))
    weights.save(str(tmp_path / 'timm.safetensors'), dict(params), tiny(), 'timm')
    shutil.copy(tmp_path / 'timm.safetensors', tmp_path / 'timm.npz')
    assert weights.load(str(tmp_path / 'timm.npz')).format == 'timm'


def test_files_of_no_known_layout_or_two_models_are_refused(tmp_path):
    save_file({'foo.weight': torch.ones(2)}, str(tmp_path / 'foo.safetensors'))
    with pytest.raises(UserError, match=r"no known checkpoint layout.*understood: the official vit_jax npz"):
        weights.load(str(tmp_path / 'foo.safetensors'))
    params = random_params(weights.param_shapes(tiny()))
    weights.save(str(tmp_path / 'timm.safetensors'), dict(params), tiny(), 'timm')
    weights.save(str(tmp_path / 'ours.safetensors'), dict(params), tiny(), 'torch')
    both = {**load_file(str(tmp_path / 'timm.safetensors')), **load_file(str(tmp_path / 'ours.safetensors'))}
    save_file(both, str(tmp_path / 'both.safetensors'))
    with pytest.raises(UserError, match='holds the keys of two models'):
        weights.load(str(tmp_path / 'both.safetensors'))


@pytest.mark.parametrize('cfg, to, needle', [
    (tiny(classifier='map'), 'npz', '--to big_vision'),
    (tiny(posemb='sincos2d'), 'npz', '--to big_vision'),
    (tiny(patch_size=(2, 2), resnet_num_layers=(), resnet_width_factor=0.5), 'hf', 'a hybrid'),
    (tiny(patch_size=(2, 2), resnet_num_layers=(), resnet_width_factor=0.5), 'big_vision', 'no ResNet stem'),
    (tiny(representation_size=16), 'timm', 'pre_logits'),
    (tiny(classifier='gap'), 'hf', "'gap'"),
])
def test_a_format_refuses_what_it_cannot_express_and_names_one_that_can(tmp_path, cfg, to, needle):
    params = random_params(weights.param_shapes(cfg))
    out = tmp_path / ('out' if to == 'hf' else 'out.npz' if to in ('npz', 'big_vision') else 'out.safetensors')
    with pytest.raises(UserError, match=needle) as e:
        weights.save(str(out), dict(params), cfg, to)
    assert '--to' in str(e.value)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the command lines

@pytest.mark.slow
def test_every_format_through_the_logits_and_convert_commands(reference, tmp_path):
    src, cfg_json, x = (reference / 'tiny_token' / n for n in ('ckpt.npz', 'model.json', 'x.npy'))
    want = np.load(reference / 'tiny_token' / 'logits.npy')
    made = {}
    # The commands' own entry points, in this process (a new interpreter per command is what the last lines,
    # and tests/test_fuzz.py, check).
    for to, out in (('big_vision', 'bv.npz'), ('timm', 'timm.safetensors'), ('hf', 'hf'), ('torch', 'ours.pt')):
        assert torch_cli.main(['convert', str(src), str(tmp_path / out), '--to', to, '--config', str(cfg_json)]) == 0
        made[to] = tmp_path / out
    for to, path in made.items():
        for fw, main in (('vit_jax', jax_cli.main), ('vit_torch', torch_cli.main)):
            out = tmp_path / f'{to}-{fw}.npy'
            # timm's file alone runs as timm builds it (erf GELU); the official model's weights need the official
            assert main(['logits', str(path), '--config', str(cfg_json), '--input', str(x), '--output', str(out),
                         *(['--numerics', 'official'] if to == 'timm' else [])]) == 0, (to, fw)
            assert np.abs(np.load(out) - want).max() < 1e-5, (to, fw)
    # a bad input, from the command line: one line, exit 2, nothing written
    proc = run_cli('vit_torch', 'convert', f'{made["big_vision"]}:nope', tmp_path / 'x.npz')
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith('error: ')
    assert 'Traceback' not in proc.stderr and not (tmp_path / 'x.npz').exists()

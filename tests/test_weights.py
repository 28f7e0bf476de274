"""The shared weight layer: file layouts, strictness, resizing, surgery, inference, round trips."""

import numpy as np
import pytest
import scipy.ndimage

from conftest import random_params, tiny
from parity.core import weights
from parity.core.config import OFFICIAL_CONFIGS, ViTConfig, load_config
from parity.core.errors import UserError
from parity.core.weights.formats import released, vit_torch as torch_format

TINY = tiny()
HYBRID = ViTConfig('hyb', (1, 1), 32, 1, 64, 4, resnet_num_layers=(2, 1), resnet_width_factor=0.5,
                   num_classes=5, image_size=32)


def test_reference_checkpoints_are_pre_linen_and_load_canonical(reference):
    raw = weights.read_npz(str(reference / 'hybrid_stem' / 'ckpt.npz'))
    assert any('MultiHeadDotProductAttention_1' in k for k in raw)
    assert raw['gn_root/scale'].shape == (1, 1, 1, 32)
    params = released.canonicalize(raw)
    assert 'Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel' in params
    assert 'Transformer/encoderblock_0/MlpBlock_0/Dense_1/bias' in params
    assert 'Transformer/encoderblock_1/LayerNorm_1/scale' in params
    assert params['gn_root/scale'].shape == (32,)


@pytest.mark.parametrize('prefix', ['', 'opt/target/', 'params/'])
@pytest.mark.parametrize('numbering', ['released', 'linen'])
def test_every_file_flavour_reads_to_the_same_params(tmp_path, prefix, numbering):
    params = random_params(weights.param_shapes(HYBRID))
    flat = released.to_released(params) if numbering == 'released' else dict(params)
    flat = {prefix + k: v for k, v in flat.items()}
    if prefix == 'opt/target/':  # training checkpoints also carry optimizer state, which is not params
        flat['opt/state/step'] = np.array(3)
    np.savez(tmp_path / 'c.npz', **flat)
    loaded = weights.load_npz(str(tmp_path / 'c.npz'))
    assert loaded.keys() == params.keys()
    assert all(np.array_equal(loaded[k], params[k]) for k in params)


def test_released_layout_round_trip_is_bit_exact(tmp_path, reference):
    original = weights.read_npz(str(reference / 'hybrid_stem' / 'ckpt.npz'))
    weights.save_npz(str(tmp_path / 'again.npz'), released.canonicalize(original))
    again = weights.read_npz(str(tmp_path / 'again.npz'))
    assert again.keys() == original.keys()
    for k in original:
        assert again[k].dtype == original[k].dtype and again[k].shape == original[k].shape
        assert again[k].tobytes() == original[k].tobytes()
    assert not list(tmp_path.glob('.tmp-*'))  # the atomic write leaves nothing behind


def test_torch_state_dict_round_trip_is_bit_exact():
    for cfg in (TINY, HYBRID, TINY.replace(representation_size=16, classifier='gap')):
        params = random_params(weights.param_shapes(cfg))
        state = torch_format.to_torch(params, cfg)
        assert all(v.flags['C_CONTIGUOUS'] for v in state.values())
        back = torch_format.from_torch(state, cfg)
        assert back.keys() == params.keys()
        assert all(back[k].tobytes() == params[k].tobytes() for k in params)


def test_torch_layouts():
    params = random_params(weights.param_shapes(TINY))
    state = torch_format.to_torch(params, TINY)
    q = params['Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel']  # (D, H, Dh)
    assert np.array_equal(state['Transformer.encoderblock_0.MultiHeadDotProductAttention_0.query.weight'],
                          q.reshape(32, 32).T)
    out = params['Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/kernel']  # (H, Dh, D)
    assert np.array_equal(state['Transformer.encoderblock_0.MultiHeadDotProductAttention_0.out.weight'],
                          out.reshape(32, 32).T)
    assert np.array_equal(state['embedding.weight'], params['embedding/kernel'].transpose(3, 2, 0, 1))
    assert np.array_equal(state['head.weight'], params['head/kernel'].T)
    assert np.array_equal(state['Transformer.encoder_norm.weight'], params['Transformer/encoder_norm/scale'])


def test_strict_check_lists_every_problem_at_once():
    params = random_params(weights.param_shapes(TINY))
    del params['cls']
    del params['Transformer/encoderblock_1/LayerNorm_0/bias']
    params['stray/kernel'] = np.zeros(3, np.float32)
    params['head/bias'] = np.zeros(7, np.float32)
    with pytest.raises(UserError) as e:
        weights.check_params(params, TINY, 'ckpt.npz')
    msg = str(e.value)
    assert '\n' not in msg
    for needle in ('2 missing', 'cls', 'encoderblock_1/LayerNorm_0/bias', '1 extra', 'stray/kernel',
                   'head/bias expected (5,) found (7,)'):
        assert needle in msg


def test_torch_strictness():
    state = torch_format.to_torch(random_params(weights.param_shapes(TINY)), TINY)
    del state['cls']
    state['extra.weight'] = np.zeros(1, np.float32)
    with pytest.raises(UserError, match=r'1 missing: cls \| 1 extra: extra.weight'):
        torch_format.from_torch(state, TINY)


def test_posemb_resize_is_the_official_bilinear_zoom():
    rng = np.random.default_rng(0)
    posemb = rng.normal(size=(1, 1 + 16, 8)).astype(np.float32)
    out = weights.resize_posemb(posemb, (6, 6), prefix_tokens=1)
    assert out.shape == (1, 37, 8) and out.dtype == np.float32
    assert np.array_equal(out[0, 0], posemb[0, 0])  # class token kept
    want = scipy.ndimage.zoom(posemb[0, 1:].reshape(4, 4, 8), (1.5, 1.5, 1), order=1).reshape(36, 8)
    assert np.array_equal(out[0, 1:], want)
    gap = weights.resize_posemb(posemb[:, 1:], (2, 2), prefix_tokens=0)
    assert gap.shape == (1, 4, 8)
    with pytest.raises(UserError, match='square'):
        weights.resize_posemb(posemb[:, :13], (6, 6), prefix_tokens=1)


def test_finetune_surgery():
    source = TINY.replace(representation_size=16, num_classes=21)
    params = random_params(weights.param_shapes(source))
    target = TINY.replace(num_classes=3, image_size=48)
    out = weights.prepare_for_finetuning(params, target, 'pretrained.npz')
    assert not any(k.startswith('pre_logits') for k in out)
    assert out['head/kernel'].shape == (32, 3) and not out['head/kernel'].any() and not out['head/bias'].any()
    assert out[weights.POSEMB].shape == (1, 37, 32)
    assert np.array_equal(out[weights.POSEMB][0, 0], params[weights.POSEMB][0, 0])
    # Same classes and resolution: the head is kept, nothing changes.
    same = weights.prepare_for_finetuning(params, source, 'pretrained.npz')
    assert all(np.array_equal(same[k], params[k]) for k in params)


@pytest.mark.parametrize('name', ['ViT-B_16', 'ViT-B_16-gap-norep', 'R50+ViT-B_16', 'R+ViT-Ti_16', 'ViT-L_32'])
def test_infer_config_names_the_official_variant(name):
    cfg = OFFICIAL_CONFIGS[name].replace(num_classes=21843, representation_size=768, image_size=384)
    stand_ins = {k: np.broadcast_to(np.float32(0), s) for k, s in weights.param_shapes(cfg).items()}
    inferred = weights.infer_config(stand_ins)
    assert inferred.name == name
    assert inferred.num_classes == 21843 and inferred.representation_size == 768 and inferred.image_size == 384
    assert inferred.same_architecture(cfg)
    # PyTorch state dicts carry no head count; the official width table supplies it.
    torch_shapes = {torch_format.torch_name(k): torch_format.LAYOUTS[torch_format.torch_rule(k)[1]][0](v)
                    for k, v in stand_ins.items()}
    assert torch_format.infer_config_from_torch(torch_shapes).name == name


def test_official_name_takes_head_and_representation_from_the_checkpoint():
    cfg = OFFICIAL_CONFIGS['ViT-Ti_16'].replace(num_classes=21843, representation_size=192)
    stand_ins = {k: np.broadcast_to(np.float32(0), s) for k, s in weights.param_shapes(cfg).items()}
    resolved = weights.resolve_config('ViT-Ti_16', stand_ins, image_size=384)
    assert (resolved.num_classes, resolved.representation_size, resolved.image_size) == (21843, 192, 384)


def test_config_json_round_trip(tmp_path, reference):
    cfg = load_config(str(reference / 'hybrid_stem' / 'model.json'))
    assert cfg.resnet_num_layers == () and cfg.resnet_width_factor == 0.5 and cfg.num_classes == 3
    import json
    (tmp_path / 'c.json').write_text(json.dumps(OFFICIAL_CONFIGS['R50+ViT-B_16'].to_official_dict()))
    assert load_config(str(tmp_path / 'c.json')) == OFFICIAL_CONFIGS['R50+ViT-B_16']

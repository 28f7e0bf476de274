"""`python -m vit_torch convert`: npz to PyTorch state dicts and back, bit for bit.

Through the command's own entry point, in this process; tests/test_bad_inputs.py runs it as a new process."""

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from parity.core import weights
from vit_torch import cli as torch_cli


def convert(*args) -> None:
    assert torch_cli.main(['convert', *map(str, args)]) == 0


@pytest.mark.slow
@pytest.mark.parametrize('suffix,config', [('.safetensors', None), ('.pt', 'model.json')])
@pytest.mark.parametrize('case', ['tiny_token', 'hybrid_stem'])
def test_convert_round_trip_is_bit_exact(reference, tmp_path, case, suffix, config):
    src = reference / case / 'ckpt.npz'
    mid, back = tmp_path / f'ckpt{suffix}', tmp_path / 'back.npz'
    convert(src, mid)
    # .pt holds tensors only, so its way back needs the config; .safetensors carries it as metadata.
    extra = ['--config', reference / case / config] if config else []
    convert(mid, back, *extra)
    original, again = np.load(src), np.load(back)
    assert sorted(original.files) == sorted(again.files)
    for k in original.files:
        assert original[k].dtype == again[k].dtype and original[k].shape == again[k].shape, k
        assert original[k].tobytes() == again[k].tobytes(), k


@pytest.mark.slow
def test_converted_state_dict_loads_into_the_torch_model(reference, tmp_path):
    from vit_torch.model import VisionTransformer

    convert(reference / 'tiny_token' / 'ckpt.npz', tmp_path / 'c.safetensors')
    convert(reference / 'tiny_token' / 'ckpt.npz', tmp_path / 'c.pt')
    params = weights.load_npz(str(reference / 'tiny_token' / 'ckpt.npz'))
    cfg = weights.resolve_config(str(reference / 'tiny_token' / 'model.json'), params)
    sd = {k: torch.from_numpy(v) for k, v in load_file(tmp_path / 'c.safetensors').items()}
    model = VisionTransformer(cfg)
    model.load_state_dict(sd, strict=True)
    pt = torch.load(tmp_path / 'c.pt', weights_only=True)
    assert sd.keys() == pt.keys() and all(torch.equal(sd[k], pt[k]) for k in sd)
    x = torch.from_numpy(np.load(reference / 'tiny_token' / 'x.npy')).permute(0, 3, 1, 2)
    with torch.no_grad():
        y = model.eval()(x).numpy()
    assert np.abs(y - np.load(reference / 'tiny_token' / 'logits.npy')).max() < 1e-5

"""Numerics: each file runs as its own library runs it (`--numerics source`, the default), or as the official
model does (`--numerics official`): the GELU form and the LayerNorm eps, in both frameworks.

Files are written by their libraries' own code (transformers' `save_pretrained`, timm's `create_model`), with
weights scaled up so that erf against tanh GELU and eps 1e-12 against 1e-6 show in the logits.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import in_process, tiny, tolerance
from parity import cli
from parity.core import weights
from parity.core.config import ViTConfig
from parity.core.errors import UserError
from vit_jax import cli as jax_cli, runtime as jax_runtime
from vit_torch import cli as torch_cli, runtime as torch_runtime

S = 32
X = np.random.default_rng(3).uniform(-1, 1, (2, S, S, 3)).astype(np.float32)
FRAMEWORKS = {'vit_jax': jax_runtime.forward, 'vit_torch': torch_runtime.forward}


def command(*args) -> subprocess.CompletedProcess:
    """`python -m FRAMEWORK ARGS...` in this process (conftest's `in_process`): exit code, stdout and stderr."""
    return in_process(*args)


def ours(path, numerics='source', config=None) -> dict[str, np.ndarray]:
    cfg, params = cli.load_checkpoint(str(path), config, None, S, numerics)
    return {fw: forward(cfg, params)(X) for fw, forward in FRAMEWORKS.items()}


def max_diff(got: dict, want: np.ndarray) -> float:
    """The largest |difference| from `want` of either framework, in units of the fp32 tolerance
    (1e-5 x max(1, max |want|))."""
    return max(float(np.abs(y - want).max()) for y in got.values()) / tolerance(want)


def enlarge(model: torch.nn.Module, scale: float = 3.0) -> None:
    """Weights large enough that the GELU form and the eps show (random init keeps activations near zero)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * scale / p.shape[-1] ** 0.5)
            elif 'norm' in name and name.endswith('weight'):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# --------------------------------------------------------------------------- the config

def test_config_fields_validate_and_round_trip():
    cfg = tiny(gelu='erf', layer_norm_eps=1e-12)
    d = cfg.to_official_dict()
    assert (d['gelu'], d['layer_norm_eps']) == ('erf', 1e-12)
    assert ViTConfig.from_official_dict(dict(d, image_size=32)) == cfg
    assert 'gelu' not in tiny().to_official_dict() and 'layer_norm_eps' not in tiny().to_official_dict()
    with pytest.raises(UserError, match="gelu 'quick'"):
        tiny(gelu='quick')
    with pytest.raises(UserError, match='layer_norm_eps'):
        tiny(layer_norm_eps=0.0)
    with pytest.raises(UserError, match='layer_norm_eps'):
        ViTConfig.from_official_dict(dict(d, layer_norm_eps='tiny'))


# --------------------------------------------------------------------------- Hugging Face

def hf_folder(tmp_path, name='hf', **numerics) -> tuple[Path, np.ndarray]:
    """transformers' own save_pretrained of a random tiny ViT, and transformers' logits for X."""
    from transformers import ViTConfig as HFConfig, ViTForImageClassification

    hf_cfg = HFConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      image_size=S, patch_size=8, num_labels=5, **numerics)
    torch.manual_seed(0)
    model = ViTForImageClassification(hf_cfg).eval()
    enlarge(model)
    model.save_pretrained(tmp_path / name)
    with torch.no_grad():
        want = model(pixel_values=torch_runtime.to_nchw(X, 'cpu')).logits.numpy()
    return tmp_path / name, want


def transformers_logits(folder) -> np.ndarray:
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(pixel_values=torch_runtime.to_nchw(X, 'cpu')).logits.numpy()


def test_a_hf_folder_runs_as_transformers_runs_it(tmp_path, capsys):
    folder, want = hf_folder(tmp_path, hidden_act='gelu', layer_norm_eps=1e-12)
    assert max_diff(ours(folder), want) <= 1
    err = capsys.readouterr().err
    assert "numerics: erf GELU, LayerNorm eps 1e-12 (config.json hidden_act 'gelu'" in err
    # the official numerics are another function: visibly so with these weights
    official = ours(folder, 'official')
    assert max_diff(official, want) > 3  # the tolerance thrice over
    assert '(--numerics official)' in capsys.readouterr().err
    # --config given (with the official numerics): the file's numerics still apply
    cfg = weights.configure(weights.load(str(folder)), None, numerics='official')
    (tmp_path / 'c.json').write_text(json.dumps(dict(cfg.to_official_dict(), image_size=S)))
    assert max_diff(ours(folder, config=str(tmp_path / 'c.json')), want) <= 1


def test_a_tanh_hf_folder_and_an_export_round_trip(tmp_path):
    folder, want = hf_folder(tmp_path, hidden_act='gelu_new', layer_norm_eps=1e-6)
    assert max_diff(ours(folder), want) <= 1
    erf_folder, erf_want = hf_folder(tmp_path, 'erf', hidden_act='gelu', layer_norm_eps=1e-12)
    # our export of the erf model says so, and transformers computes our logits from it
    ckpt = weights.load(str(erf_folder))
    cfg = weights.configure(ckpt, None)
    assert (cfg.gelu, cfg.layer_norm_eps) == ('erf', 1e-12)
    weights.save(str(tmp_path / 'out'), ckpt.params(cfg), cfg, 'hf')
    d = json.loads((tmp_path / 'out' / 'config.json').read_text())
    assert (d['hidden_act'], d['layer_norm_eps']) == ('gelu', 1e-12)
    assert np.abs(transformers_logits(tmp_path / 'out') - erf_want).max() <= tolerance(erf_want)
    # through convert to this project's state dict and back: the metadata keeps them
    assert command('vit_torch', 'convert', erf_folder, tmp_path / 'm.safetensors').returncode == 0
    assert weights.configure(weights.load(str(tmp_path / 'm.safetensors')), None).gelu == 'erf'
    assert max_diff(ours(tmp_path / 'm.safetensors'), erf_want) <= 1


def test_an_unsupported_activation_is_one_line(tmp_path):
    folder, _ = hf_folder(tmp_path, hidden_act='quick_gelu')
    np.save(tmp_path / 'x.npy', X)
    run = ('vit_torch', 'logits', folder, '--input', tmp_path / 'x.npy', '--output', tmp_path / 'y.npy')
    proc = command(*run)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "hidden_act 'quick_gelu'" in lines[0] and 'config.json' in lines[0]
    # the official numerics run it regardless
    assert command(*run, '--numerics', 'official').returncode == 0


# --------------------------------------------------------------------------- timm

def timm_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch_runtime.to_nchw(X, 'cpu')).numpy()


@pytest.mark.parametrize('name,config', [
    ('vit_tiny_patch16_224', {'embed_dim': 32, 'depth': 2, 'num_heads': 2}),
    ('deit_tiny_distilled_patch16_224', {'embed_dim': 32, 'depth': 2, 'num_heads': 2}),
])
def test_timm_files_run_as_timm_runs_them(tmp_path, name, config):
    import timm

    model = timm.create_model(name, pretrained=False, img_size=S, patch_size=8, num_classes=5, **config)
    enlarge(model)
    want = timm_logits(model)
    heads = json.dumps({'name': None, 'hidden_size': 32, 'patches': {'size': [8, 8]},
                        'transformer': {'mlp_dim': 128, 'num_heads': 2, 'num_layers': 2},
                        'classifier': 'token_distilled' if 'distilled' in name else 'token', 'num_classes': 5,
                        'image_size': S})
    (tmp_path / 'c.json').write_text(heads)
    save_file(model.state_dict(), str(tmp_path / 'm.safetensors'))
    torch.save(model.state_dict(), tmp_path / 'm.pth')
    for path in (tmp_path / 'm.safetensors', tmp_path / 'm.pth'):
        assert max_diff(ours(path, config=str(tmp_path / 'c.json')), want) <= 1
    assert max_diff(ours(tmp_path / 'm.pth', 'official', str(tmp_path / 'c.json')), want) > 3


def test_a_timm_hub_folder_reads_model_args_and_our_export_says_how_to_build(tmp_path):
    import timm

    model = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=S, patch_size=8, num_classes=5,
                              embed_dim=48, depth=2, num_heads=3, act_layer='gelu_tanh')
    enlarge(model)
    (tmp_path / 'hub').mkdir()
    save_file(model.state_dict(), str(tmp_path / 'hub' / 'model.safetensors'))
    (tmp_path / 'hub' / 'config.json').write_text(json.dumps({
        'architecture': 'vit_tiny_patch16_224', 'num_classes': 5, 'global_pool': 'token',
        'model_args': {'act_layer': 'gelu_tanh'}}))
    ckpt = weights.load(str(tmp_path / 'hub'))
    assert ckpt.numerics.gelu == 'tanh' and 'act_layer' in ckpt.numerics.source
    cfg = weights.configure(ckpt, None, S)
    assert max_diff(ours(tmp_path / 'hub'), timm_logits(model)) <= 1
    # a tanh model written for timm: one note says how timm must build it
    notes = weights.save(str(tmp_path / 'out.safetensors'), ckpt.params(cfg), cfg, 'timm')
    assert len(notes) == 1 and "act_layer='gelu_tanh'" in notes[0]
    assert weights.save(str(tmp_path / 'erf.safetensors'), ckpt.params(cfg), cfg.replace(gelu='erf'), 'timm') == []


# --------------------------------------------------------------------------- fine-tuning

def test_fine_tuning_a_hf_folder_keeps_its_numerics(tmp_path):
    from transformers import ViTConfig as HFConfig, ViTForImageClassification

    hf_cfg = HFConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                      image_size=8, patch_size=4, num_labels=10, hidden_act='gelu', layer_norm_eps=1e-12)
    ViTForImageClassification(hf_cfg).save_pretrained(tmp_path / 'hf')
    work = tmp_path / 'run'
    proc = command('vit_jax', 'train', '--dataset', 'digits', '--checkpoint', tmp_path / 'hf', '--workdir', work,
                   '--steps', '1', '--warmup-steps', '0', '--batch-size', '8', '--image-size', '8', '--eval-every', '0')
    assert proc.returncode == 0, proc.stderr
    run = json.loads((work / 'run.json').read_text())
    assert run['numerics'] == 'source'
    assert (run['config']['gelu'], run['config']['layer_norm_eps']) == ('erf', 1e-12)
    saved = json.loads((work / 'config.json').read_text())
    assert (saved['gelu'], saved['layer_norm_eps']) == ('erf', 1e-12)
    # the final weights (the released layout, with no room for numerics) run with those of the run that wrote
    # them, as does a checkpoint of its checkpoints/; copied elsewhere, the npz alone runs the official ones
    for path in (work / 'final.npz', *sorted((work / 'checkpoints').glob('ckpt-*.npz'))):
        ckpt = weights.load(str(path))
        cfg = weights.configure(ckpt, None, 8)
        assert (cfg.gelu, cfg.layer_norm_eps) == ('erf', 1e-12), path
        assert ckpt.numerics.source.endswith('config.json, of the run that wrote it')
        assert weights.configure(ckpt, None, 8, numerics='official').gelu == 'tanh'
    (tmp_path / 'alone').mkdir()
    (tmp_path / 'alone' / 'final.npz').write_bytes((work / 'final.npz').read_bytes())
    assert weights.configure(weights.load(str(tmp_path / 'alone' / 'final.npz')), None, 8).gelu == 'tanh'


# --------------------------------------------------------------------------- from the image file to the logits

PHOTO = str(Path(__import__('skimage.data').data.__file__).parent / 'chelsea.png')


def predicted_logits(tmp_path, *args) -> dict[str, np.ndarray]:
    """`predict --json` of the photo in both frameworks: each one's raw logits."""

    got = {}
    for fw, main in (('vit_jax', jax_cli.predict_main), ('vit_torch', torch_cli.predict_main)):
        out = tmp_path / f'{fw}.json'
        assert main([PHOTO, '--top', '3', '--json', str(out), *map(str, args)]) == 0
        got[fw] = np.array([json.loads(out.read_text())['images'][0]['logits']], np.float32)
    return got


def test_a_hf_fine_tune_predicts_what_transformers_predicts_from_the_image_file(tmp_path, capsys):
    """The acceptance: transformers' own processor and model on a photo, against `predict` with its defaults."""
    from PIL import Image
    from transformers import AutoImageProcessor, ViTForImageClassification, ViTImageProcessor

    folder, _ = hf_folder(tmp_path, hidden_act='gelu', layer_norm_eps=1e-12)
    ViTImageProcessor(size={'height': S, 'width': S}).save_pretrained(folder)
    pixels = AutoImageProcessor.from_pretrained(folder)(Image.open(PHOTO), return_tensors='pt')['pixel_values']
    with torch.no_grad():
        want = ViTForImageClassification.from_pretrained(folder).eval()(pixel_values=pixels).logits.numpy()
    assert max_diff(predicted_logits(tmp_path, '--checkpoint', folder), want) <= 1
    err = capsys.readouterr().err
    assert 'preprocess: hf (' in err and 'numerics: erf GELU, LayerNorm eps 1e-12' in err


def test_a_timm_deit_file_predicts_what_timm_predicts_from_the_image_file(tmp_path, capsys):
    import timm
    from PIL import Image

    model = timm.create_model('deit_tiny_distilled_patch16_224', pretrained=False, img_size=S, patch_size=8,
                              num_classes=5, embed_dim=32, depth=2, num_heads=2).eval()
    enlarge(model)
    save_file(model.state_dict(), str(tmp_path / 'deit.safetensors'))
    transform = timm.data.create_transform(**timm.data.resolve_data_config({'input_size': (3, S, S)}, model=model))
    with torch.no_grad():
        want = model(transform(Image.open(PHOTO).convert('RGB'))[None]).numpy()
    (tmp_path / 'c.json').write_text(json.dumps({
        'hidden_size': 32, 'patches': {'size': [8, 8]}, 'transformer': {'mlp_dim': 128, 'num_heads': 2,
                                                                         'num_layers': 2},
        'classifier': 'token_distilled', 'num_classes': 5, 'image_size': S}))
    assert max_diff(predicted_logits(tmp_path, '--checkpoint', tmp_path / 'deit.safetensors', '--config',
                                     tmp_path / 'c.json'), want) <= 1
    assert 'preprocess: timm (' in capsys.readouterr().err

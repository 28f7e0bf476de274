"""The `pixels` row: compare --against hf/timm checks our preprocessing against the library's own processor,
and verify --preprocess checks a user's PREPROCESS(path, size), naming the setting that differs.

Each planted mistake is a small user function written into tmp_path; the images are tiny
random PNGs larger than the model's square, so a resize shrinks them (where antialiasing shows).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from parity.core.errors import UserError
from parity.harness import compare, verify


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp('photos')
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(48, 64), (70, 50)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f'im{i}.png')
    return folder


def run(main, args, tmp_path):
    out = tmp_path / 'out.json'
    code = main([*map(str, args), '--json', str(out)])
    return code, json.loads(out.read_text())


def causes(report) -> dict:
    return {f['cause']: f['message'] for f in report['diagnosis'] if f['where'] == 'pixels' and f['cause']}


HEAD = '''
import numpy as np
from PIL import Image
from parity.data import preprocess

def official(path, size):  # the tf-style resize, as the reference does it
    return preprocess.load_image(path, preprocess.Pipeline('official', size))

def pil(path, size, f=Image.BILINEAR):
    return np.asarray(Image.open(path).convert('RGB').resize((size, size), f), np.float32)
'''
PLANTED = {
    'correct': ('official(path, size)', None),
    'antialias': ('pil(path, size) / 127.5 - 1', 'antialias'),
    'bicubic': ('pil(path, size, Image.BICUBIC) / 127.5 - 1', 'resample'),
    'crop': ('''(lambda big: big[(big.shape[0] - size) // 2:(big.shape[0] - size) // 2 + size,
                           (big.shape[1] - size) // 2:(big.shape[1] - size) // 2 + size])(
        preprocess.tf_resize_bilinear(np.asarray(Image.open(path).convert('RGB'), np.float32),
                                      *((36, int(36 * np.asarray(Image.open(path)).shape[1] / np.asarray(
                                          Image.open(path)).shape[0])) if np.asarray(Image.open(path)).shape[0] <=
                                        np.asarray(Image.open(path)).shape[1] else (int(36 * np.asarray(
                                            Image.open(path)).shape[0] / np.asarray(Image.open(path)).shape[1]),
                                                                                    36)))) / 127.5 - 1''', 'crop'),
    'imagenet': ('((official(path, size) + 1) / 2 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])',
                 'mean_std'),
    'unit': ('(official(path, size) + 1) / 2', 'range'),
    'bgr': ('official(path, size)[..., ::-1]', 'channel_order'),
}


def planted(tmp_path, name: str) -> str:
    body, _ = PLANTED[name]
    path = tmp_path / f'pre_{name}.py'
    path.write_text(HEAD + f'\ndef prep(path, size):\n    return {body}\n')
    return f'{path}:prep'


@pytest.mark.parametrize('name', list(PLANTED))
def test_verify_names_each_planted_preprocessing_mistake(name, photos, tmp_path):
    code, report = run(verify.main, ['--preprocess', planted(tmp_path, name), '--images', photos,
                                     '--image-size', 32], tmp_path)
    row = report['activations'][0]
    assert row['name'] == 'pixels' and [a['name'] for a in report['activations']] == ['pixels']
    want = PLANTED[name][1]
    if want is None:
        assert code == 0 and report['ok'] and row['max_abs_diff'] <= 1e-6
    else:
        assert code == 1 and not report['ok'] and report['first_divergence'] == 'pixels'
        assert set(causes(report)) == {want}, report['diagnosis']
    if name == 'bicubic':
        assert 'bicubic' in causes(report)['resample']


def test_verify_preprocess_mistakes_are_one_line(photos, tmp_path, capsys):
    cases = {
        'raise ValueError("boom")': 'raised ValueError: boom',
        'return np.zeros((3, size, size), np.float32)': 'channels first',
        'return np.zeros((size, size, 3), np.uint8)': 'dtype uint8',
        'return "pixels"': 'not an array',
    }
    for body, needle in cases.items():
        path = tmp_path / 'bad.py'
        path.write_text(f'import numpy as np\ndef prep(path, size):\n    {body}\n')
        with pytest.raises(UserError, match=needle) as e:
            verify.main(['--preprocess', f'{path}:prep', '--images', str(photos), '--image-size', '32'])
        assert str(path) in str(e.value) and '\n' not in str(e.value)
    (tmp_path / 'broken.py').write_text('import no_such_module\n')
    with pytest.raises(UserError, match='ModuleNotFoundError'):
        verify.main(['--preprocess', f'{tmp_path / "broken.py"}:prep', '--images', str(photos)])
    with pytest.raises(UserError, match='give --images DIR'):
        verify.main(['--preprocess', planted(tmp_path, 'correct')])


def test_verify_preprocess_exits_2_with_one_line(photos, tmp_path):
    from conftest import run_cli

    path = tmp_path / 'bad.py'
    path.write_text('def prep(path, size):\n    raise RuntimeError("no")\n')
    proc = run_cli('parity', 'verify', '--preprocess', f'{path}:prep', '--images', str(photos), '--image-size', '32')
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith('error: ') and 'bad.py:prep' in proc.stderr


# --------------------------------------------------------------------------- compare --against

@pytest.fixture(scope='module')
def hf_folder(tmp_path_factory):
    """A tiny ViTForImageClassification folder with transformers' own preprocessor_config.json, 32x32."""
    import torch
    from transformers import ViTConfig as HFConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp('hf') / 'tiny'
    model = ViTForImageClassification(HFConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=64, image_size=32, patch_size=8, num_labels=5))
    model.save_pretrained(folder)
    ViTImageProcessor(size={'height': 32, 'width': 32}).save_pretrained(folder)
    return folder


def test_against_hf_pixels_row_comes_first_and_passes(hf_folder, photos, tmp_path):
    code, report = run(compare.main, [hf_folder, '--against', 'hf', '--images', photos], tmp_path)
    row = report['activations'][0]
    assert row['name'] == 'pixels' and [a['name'] for a in report['activations']].count('pixels') == 1
    # the hf pipeline is transformers 5's default (torchvision) ViTImageProcessor, bit for bit
    assert row['ok'] and row['max_abs_diff'] <= 1e-6 and not causes(report), report['diagnosis']


def test_against_hf_names_the_pil_backend_as_resize_rounding(hf_folder, photos, tmp_path):
    import dataclasses

    from parity.data import preprocess
    from parity.harness import pixels

    paths = sorted(str(p) for p in photos.iterdir())
    ours = dataclasses.replace(preprocess.pipeline_for(None, 'hf', str(hf_folder), 32), backend='pil')
    x = preprocess.load_images(paths, ours)
    theirs, _ = pixels.hf_processor_pixels(paths, str(hf_folder), 32)
    row, findings = pixels.compare(paths, ours, x, theirs)
    assert not row['ok'] and {f['cause'] for f in findings} == {'resize_rounding'}, findings
    assert all(f['reproduced_to'] <= 1e-6 for f in findings)


def test_against_hf_names_official_preprocessing_antialias(hf_folder, photos, tmp_path):
    code, report = run(compare.main, [hf_folder, '--against', 'hf', '--images', photos, '--preprocess', 'official'],
                       tmp_path)
    assert code == 1 and report['first_divergence'] == 'pixels' and not report['activations'][0]['ok']
    assert set(causes(report)) == {'antialias'}
    assert causes(report)['antialias'].startswith('pixels: theirs resize with antialiasing, ours without')


def test_against_timm_pixels_row(timm_small, photos, tmp_path):
    code, report = run(compare.main, [timm_small, '--against', 'timm:test_vit', '--images', photos,
                                      '--preprocess', 'timm'], tmp_path)
    row = report['activations'][0]
    # timm's test_vit config says crop_pct 0.95; the timm pipeline of a plain npz assumes ViT's 0.9: named exactly.
    assert row['name'] == 'pixels' and set(causes(report)) == {'crop'}
    assert causes(report)['crop'] == 'pixels: theirs centre crop (crop_pct 0.95), ours centre crop (crop_pct 0.9)'
    code, report = run(compare.main, [timm_small, '--against', 'timm:test_vit', '--images', photos], tmp_path)
    assert report['activations'][0]['name'] == 'pixels' and not report['activations'][0]['ok']
    assert {'crop', 'resample'} <= set(causes(report)), report['diagnosis']


@pytest.fixture(scope='module')
def timm_tiny(tmp_path_factory):
    """timm's own vit_tiny_patch16_224 (random, 32x32) saved as timm saves it, with the hub's config.json naming it."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=5, img_size=32)
    folder = tmp_path_factory.mktemp('timm_tiny')
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / 'model.safetensors'))
    (folder / 'config.json').write_text(json.dumps({'architecture': 'vit_tiny_patch16_224', 'num_classes': 5}))
    return folder / 'model.safetensors'


def test_against_timm_pixels_row_passes_when_the_crop_is_timms(timm_tiny, photos, tmp_path):
    # vit_tiny_patch16_224's pretrained_cfg: bicubic, crop_pct 0.9, mean/std 0.5, what the timm pipeline assumes
    code, report = run(compare.main, [timm_tiny, '--against', 'timm:vit_tiny_patch16_224', '--images', photos],
                       tmp_path)
    row = report['activations'][0]
    assert row['name'] == 'pixels' and row['ok'] and row['max_abs_diff'] <= 1e-6, report['diagnosis']
    assert not causes(report)

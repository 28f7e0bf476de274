"""parity.data.preprocess against the libraries it reproduces: tf.image.resize, transformers, timm."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import timm
from PIL import Image
from timm.data import create_transform, resolve_data_config
from transformers import AutoImageProcessor, ViTImageProcessor
from transformers.image_utils import load_image as hf_load_image
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from parity.core.errors import UserError
from parity.data import datasets, preprocess as pp

tf = datasets.import_tensorflow()  # loads triton first: it crashes when loaded after TensorFlow

GREY = 1 / 127.5  # one grey level on the [-1, 1] scale


def _png(tmp_path, name, shape, mode='RGB', seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    im = Image.fromarray(a)
    if mode == 'P':
        im = im.convert('P', palette=Image.Palette.ADAPTIVE)
    elif mode != im.mode:
        im = im.convert(mode)
    path = str(tmp_path / name)
    im.save(path)
    return path


def _tf_official(path, size):
    with Image.open(path) as im:  # what the official pipeline reads: RGB pixels, alpha on white (our choice)
        if im.mode in ('RGBA', 'LA') or (im.mode == 'P' and 'transparency' in im.info):
            rgba = im.convert('RGBA')
            im = Image.alpha_composite(Image.new('RGBA', rgba.size, (255, 255, 255, 255)), rgba)
        a = np.asarray(im.convert('RGB'))
    return (tf.image.resize(a, [size, size], 'bilinear', antialias=False).numpy() - 127.5) / 127.5


@pytest.mark.parametrize('shape, mode, size', [((200, 300, 3), 'RGB', 32), ((7, 10, 3), 'RGB', 32),
                                               ((300, 200), 'L', 32), ((45, 33, 4), 'RGBA', 24),
                                               ((50, 60, 3), 'P', 32), ((1, 1, 3), 'RGB', 5), ((64, 64, 3), 'RGB', 64)])
def test_official_is_tf_image_resize_bilinear_without_antialias(tmp_path, shape, mode, size):
    path = _png(tmp_path, 'x.png', shape, mode)
    x = pp.load_image(path, pp.Pipeline('official', size))
    assert x.shape == (size, size, 3) and x.dtype == np.float32
    assert np.abs(x - _tf_official(path, size)).max() <= 1e-6


def test_official_jpeg_within_one_grey_level_of_tf_decode_jpeg(tmp_path):
    rng = np.random.default_rng(1)
    a = (np.linspace(0, 255, 120 * 90 * 3).reshape(120, 90, 3) + rng.normal(0, 8, (120, 90, 3))).clip(0, 255)
    path = str(tmp_path / 'x.jpg')
    Image.fromarray(a.astype(np.uint8)).save(path, quality=90)
    # Pillow's libjpeg-turbo decodes with the accurate integer DCT; TF's default is the fast one (up to 10 grey
    # levels apart on chelsea), so the comparison names the accurate one.
    ref = tf.image.decode_jpeg(tf.io.read_file(path), channels=3, dct_method='INTEGER_ACCURATE')
    ref = (tf.image.resize(ref, [32, 32], 'bilinear', antialias=False).numpy() - 127.5) / 127.5
    assert np.abs(pp.load_image(path, pp.Pipeline('official', 32)) - ref).max() <= GREY + 1e-6


def test_official_is_what_images_load_image_gives(tmp_path):
    from parity.data import images

    path = _png(tmp_path, 'x.png', (40, 50, 3))
    np.testing.assert_array_equal(images.load_image(path, 16), pp.load_image(path, pp.Pipeline('official', 16)))


def _hf_folder(tmp_path, **kwargs):
    folder = tmp_path / 'hf'
    folder.mkdir()
    ViTImageProcessor(**kwargs).save_pretrained(str(folder))
    return str(folder)


HF_IMAGES = [((200, 300, 3), 'RGB'), ((480, 640, 3), 'RGB'), ((7, 10, 3), 'RGB'), ((300, 20, 3), 'RGB'),
             ((20, 300), 'L'), ((45, 33, 4), 'RGBA'), ((50, 60, 3), 'P')]  # down, down, up, mixed, grey, alpha, palette


@pytest.mark.parametrize('kwargs', [dict(size={'height': 32, 'width': 32}), {},
                                    dict(size={'height': 24, 'width': 40}, resample=3,
                                         image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4]),
                                    dict(size={'height': 32, 'width': 32}, resample=0, do_normalize=False)])
def test_hf_is_what_auto_image_processor_gives(tmp_path, kwargs):
    folder = _hf_folder(tmp_path, **kwargs)
    pipeline = pp.pipeline_for(None, 'hf', folder, 224)
    assert pipeline.mode == 'hf' and pipeline.source == 'preprocessor_config.json'
    assert pipeline.backend == 'torchvision' and 'torchvision uint8' in pipeline.describe()
    auto = AutoImageProcessor.from_pretrained(folder)  # transformers 5's default: the torchvision backend
    for i, (shape, mode) in enumerate(HF_IMAGES):
        path = _png(tmp_path, f'{i}.png', shape, mode, seed=i)
        x = pp.load_image(path, pipeline)
        image = hf_load_image(path)  # transformers' own: EXIF rotation, convert('RGB')
        default = auto(image, return_tensors='np')['pixel_values'][0].transpose(1, 2, 0)
        assert x.shape == default.shape and np.abs(x - default).max() <= 1e-6, (shape, mode)


@pytest.mark.parametrize('name, mode', [('bilinear', 'BILINEAR'), ('bicubic', 'BICUBIC'), ('lanczos', 'LANCZOS'),
                                        ('nearest', 'NEAREST_EXACT')])
def test_torch_resize_uint8_is_torchvisions_bit_for_bit(name, mode):
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    rng = np.random.default_rng(0)
    for (h, w), (oh, ow) in [((200, 300), (32, 32)), ((7, 10), (32, 32)), ((20, 300), (32, 32)), ((33, 45), (33, 20)),
                             ((33, 45), (10, 45)), ((1, 1), (5, 5)), ((50, 60), (24, 40))]:
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        t = torch.from_numpy(a).permute(2, 0, 1).contiguous()
        want = F.resize(t, [oh, ow], interpolation=getattr(InterpolationMode, mode), antialias=True).permute(1, 2, 0)
        np.testing.assert_array_equal(pp.torch_resize_uint8(a, oh, ow, name), want.numpy())


def test_hf_pil_backend_is_vit_image_processor_pil(tmp_path):
    folder = _hf_folder(tmp_path, size={'height': 32, 'width': 48}, resample=3)
    pipeline = dataclasses.replace(pp.pipeline_for(None, 'hf', folder, 224), backend='pil')
    with open(os.path.join(folder, 'preprocessor_config.json')) as f:
        settings = {k: v for k, v in json.load(f).items() if k != 'image_processor_type'}
    pil = ViTImageProcessorPil(**settings)
    for i, (shape, mode) in enumerate(HF_IMAGES[:1] + HF_IMAGES[4:6]):
        path = _png(tmp_path, f'{i}.png', shape, mode, seed=i)
        exact = pil(hf_load_image(path), return_tensors='np')['pixel_values'][0].transpose(1, 2, 0)
        assert np.abs(pp.load_image(path, pipeline) - exact).max() <= 1e-6


def test_hf_refuses_filters_torchvision_lacks(tmp_path):
    folder = _hf_folder(tmp_path, resample=4)
    with pytest.raises(UserError, match='resample 4 \\(box\\)') as e:
        pp.pipeline_for(None, 'hf', folder, 32)
    assert '\n' not in str(e.value)


def test_hf_defaults_without_preprocessor_config(tmp_path):
    p = pp.pipeline_for(None, 'hf', str(tmp_path), 384)
    assert (p.size, p.resample, p.mean, p.std, p.alpha) == (384, 'bilinear', pp.HALF, pp.HALF, 'drop')
    assert p.source == "ViTImageProcessor's defaults"


def _timm_reference(path, model_name, size, **cfg):
    model = timm.create_model(model_name, pretrained=False, img_size=size, num_classes=3, depth=1,
                              pretrained_cfg_overlay={"input_size": (3, size, size), **cfg})
    with Image.open(path) as im:
        return create_transform(**resolve_data_config({}, model=model))(im.convert('RGB')).numpy().transpose(1, 2, 0)


@pytest.mark.parametrize('model_name, distilled', [('vit_tiny_patch16_224', False),
                                                   ('deit_tiny_distilled_patch16_224', True)])
def test_timm_is_timms_eval_transform(tmp_path, model_name, distilled):
    pipeline = pp.pipeline_for(None, 'timm', str(tmp_path / 'model.safetensors'), 32, distilled=distilled)
    for i, shape in enumerate([(200, 300, 3), (300, 200, 3), (20, 14, 3), (45, 33, 4)]):
        path = _png(tmp_path, f'{i}.png', shape, 'RGBA' if shape[-1] == 4 else 'RGB', seed=i)
        assert np.abs(pp.load_image(path, pipeline) - _timm_reference(path, model_name, 32)).max() <= 1e-6


def test_a_timm_file_at_384_gets_the_crop_of_timms_384_fine_tunes(tmp_path):
    """Google's 384 px fine-tunes in timm (augreg, orig, DeiT's) evaluate with crop_pct 1.0, not _cfg's 0.9."""
    from timm.models import get_pretrained_cfg

    path = _png(tmp_path, 'x.png', (500, 420, 3))
    for name, distilled in (('vit_base_patch16_384.augreg_in21k_ft_in1k', False),
                            ('deit_base_distilled_patch16_384.fb_in1k', True)):
        pipeline = pp.pipeline_for(None, 'timm', str(tmp_path / 'm.safetensors'), 384, distilled=distilled)
        own = resolve_data_config({}, pretrained_cfg=get_pretrained_cfg(name).to_dict())
        with Image.open(path) as im:
            want = create_transform(**own)(im.convert('RGB')).numpy().transpose(1, 2, 0)
        assert np.abs(pp.load_image(path, pipeline) - want).max() <= 1e-6, name


def test_timm_reads_a_hub_folders_pretrained_cfg(tmp_path):
    cfg = {'interpolation': 'bilinear', 'crop_pct': 0.95, 'crop_mode': 'center', 'mean': [0.1, 0.2, 0.3],
           'std': [0.3, 0.2, 0.1], 'input_size': [3, 32, 32]}
    (tmp_path / 'config.json').write_text(json.dumps({'architecture': 'vit_tiny_patch16_224', 'pretrained_cfg': cfg}))
    pipeline = pp.pipeline_for(None, 'timm', str(tmp_path), 224)
    assert pipeline.source == 'config.json pretrained_cfg' and pipeline.size == 32
    path = _png(tmp_path, 'x.png', (90, 130, 3))
    assert np.abs(pp.load_image(path, pipeline) - _timm_reference(path, 'vit_tiny_patch16_224', 32, **cfg)).max() \
        <= 1e-6


def test_the_default_follows_the_checkpoints_source(tmp_path):
    for fmt, mode in [('released', 'official'), ('big_vision', 'official'), ('vit_torch', 'official'),
                      ('timm', 'timm'), ('hf', 'hf')]:
        assert pp.pipeline_for(None, fmt, str(tmp_path), 32).mode == mode
    assert pp.pipeline_for('official', 'hf', str(tmp_path), 32).mode == 'official'
    assert pp.pipeline_for('timm', 'released', str(tmp_path / 'x.npz'), 32).source == "timm's ViT defaults"
    assert pp.pipeline_for(None, 'released', 'x.npz', 224).describe() == \
        'preprocess: official (tf.image.resize bilinear, no antialias, 224x224, [-1, 1])'


def test_bad_settings_and_files_are_one_line_errors(tmp_path):
    (tmp_path / 'preprocessor_config.json').write_text('{"resample": 9}')
    with pytest.raises(UserError, match='resample 9'):
        pp.pipeline_for(None, 'hf', str(tmp_path), 32)
    bad = tmp_path / 'bad.png'
    bad.write_bytes(b'not a png')
    with pytest.raises(UserError, match='not a readable image'):
        pp.load_image(str(bad), pp.Pipeline('official', 32))


def test_exif_rotation_and_alpha_per_mode(tmp_path):
    a = np.zeros((10, 20, 4), np.uint8)
    a[..., 0] = 200
    im = Image.fromarray(a, 'RGBA')  # fully transparent red
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    path = str(tmp_path / 'x.png')
    im.save(path, exif=exif)
    official = pp.load_image(path, pp.Pipeline('official', 8))
    assert np.allclose(official, 1.0)  # transparent on white
    hf = pp.load_image(path, pp.pipeline_for('hf', 'released', str(tmp_path / 'none.npz'), 8))
    assert np.allclose(hf[..., 0], 200 / 127.5 - 1) and np.allclose(hf[..., 1:], -1)  # alpha dropped


def test_to_unit_undoes_each_normalisation(tmp_path):
    path = _png(tmp_path, 'x.png', (32, 32, 3))
    pixels = np.asarray(Image.open(path), dtype=np.float32) / 255
    for p in [pp.Pipeline('official', 32), pp.pipeline_for('timm', 'timm', str(tmp_path), 32, distilled=True),
              pp.Pipeline('hf', 32, mean=None, std=None, rescale=None, alpha='drop')]:
        p = dataclasses.replace(p, crop_pct=1.0) if p.mode == 'timm' else p
        assert np.abs(p.to_unit(pp.load_image(path, p)) - pixels).max() < 1e-6

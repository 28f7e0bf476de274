"""`python -m vit_jax predict` and `python -m vit_torch predict`: class names, the same top-k from both, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import random_params, run_cli, run_main, tiny
from parity.cli import predict
from parity.core import weights
from parity.core.config import ViTConfig
from parity.core.errors import UserError
from parity.data import class_names
from vit_jax import cli as jax_cli
from vit_torch import cli as torch_cli

PHOTOS = Path(__import__('skimage.data').data.__file__).parent
# RGB, grayscale and RGBA photos: all three must go through, converted.
IMAGES = [PHOTOS / 'chelsea.png', PHOTOS / 'camera.png', PHOTOS / 'logo.png', PHOTOS / 'rocket.jpg']


def imagenet_tiny(**kw) -> ViTConfig:
    """The tiny config with an ImageNet-sized head, so the bundled class names apply."""
    return tiny(**{'num_classes': 1000, **kw})


def checkpoint(tmp_path: Path, cfg: ViTConfig = None, name: str = 'ckpt.npz', **edits) -> Path:
    cfg = cfg or imagenet_tiny()
    params = random_params(weights.param_shapes(cfg), seed=0)
    params.update(edits)
    path = tmp_path / name
    weights.save_npz(str(path), params)
    return path


def parse(stdout: str) -> list[tuple[str, list[tuple[float, int, str]]]]:
    """The printed table back to [(image, [(probability, class, name), ...]), ...]."""
    out = []
    for line in stdout.splitlines():
        if not line.startswith(' '):
            out.append((line, []))
            continue
        p, c, name = line.split(maxsplit=2)
        out[-1][1].append((float(p), int(c), name))
    return out


# --------------------------------------------------------------------------- labels

def test_bundled_label_lists():
    in1k = class_names.bundled_labels('imagenet2012')
    in21k = class_names.bundled_labels('imagenet21k')
    assert len(in1k) == 1000 and len(in21k) == 21843
    assert in1k[0] == 'tench, Tinca tinca' and in1k[281] == 'tabby, tabby cat' and in1k[999].startswith('toilet tissue')
    assert in21k[0] == 'organism, being'
    assert all(in1k) and all(in21k)


def test_labels_chosen_by_head_size(tmp_path):
    assert class_names.labels_for(1000)[1] == 'imagenet2012'
    assert class_names.labels_for(21843)[1] == 'imagenet21k'
    names, source = class_names.labels_for(3)
    assert names == ['class 0', 'class 1', 'class 2'] and 'class indices' in source
    f = tmp_path / 'names.txt'
    f.write_text('zero\none\ntwo\n\n')
    assert class_names.labels_for(3, str(f)) == (['zero', 'one', 'two'], str(f))
    with pytest.raises(UserError, match=r'3 names for a head of 10 classes'):
        class_names.labels_for(10, str(f))
    with pytest.raises(UserError, match=r'1000 names for a head of 21843 classes'):
        class_names.labels_for(21843, 'imagenet2012')
    with pytest.raises(UserError, match=r'no such file, nor a bundled list'):
        class_names.labels_for(3, str(tmp_path / 'missing.txt'))


def test_softmax_top_k_and_table():
    logits = np.array([[0.0, 2.0, 1.0, 2.0]], np.float32)
    p = predict.softmax(logits)
    assert p.dtype == np.float64 and p.sum() == pytest.approx(1.0)
    assert predict.top_k(p, 3).tolist() == [[1, 3, 2]]  # a tie goes to the lower index
    text = predict.format_predictions(['a.png'], p, ['w', 'x', 'y', 'z'], 2)
    assert text.splitlines() == ['a.png', f'  {p[0, 1]:.6f}  1  x', f'  {p[0, 3]:.6f}  3  z']


# --------------------------------------------------------------------------- both frameworks

@pytest.mark.slow
def test_same_top5_in_both_frameworks(tmp_path, capsys):
    """Each framework's `predict` entry point, in this process."""
    ckpt = checkpoint(tmp_path)
    results = {}
    for framework, predict_main in (('vit_jax', jax_cli.predict_main), ('vit_torch', torch_cli.predict_main)):
        assert predict_main([*map(str, IMAGES), '--checkpoint', str(ckpt)]) == 0
        out, err = capsys.readouterr()
        assert f'{framework}: ' in err and 'labels: imagenet2012' in err
        results[framework] = parse(out)
    jax_rows, torch_rows = results['vit_jax'], results['vit_torch']
    assert [image for image, _ in jax_rows] == [image for image, _ in torch_rows] == [str(p) for p in IMAGES]
    for (image, a), (_, b) in zip(jax_rows, torch_rows):
        assert len(a) == 5
        assert [(c, n) for _, c, n in a] == [(c, n) for _, c, n in b], image
        assert max(abs(pa - pb) for (pa, _, _), (pb, _, _) in zip(a, b)) <= 1e-5
        assert [p for p, _, _ in a] == sorted((p for p, _, _ in a), reverse=True)
    names = class_names.bundled_labels('imagenet2012')
    assert all(names[c] == n for _, rows in jax_rows for _, c, n in rows)
    # Different photos, different predictions: the images really reach the model.
    assert len({tuple(c for _, c, _ in rows) for _, rows in jax_rows}) > 1


def test_in_process_probabilities_agree_across_batches_and_sizes(tmp_path, capsys):
    """More images than one batch (the last chunk padded), at a resized resolution, with --labels."""
    labels = tmp_path / 'names.txt'
    labels.write_text(''.join(f'thing {i}\n' for i in range(7)))
    ckpt = checkpoint(tmp_path, imagenet_tiny(num_classes=7))
    images = [str(IMAGES[i % len(IMAGES)]) for i in range(predict.BATCH + 2)]
    args = [*images, '--checkpoint', str(ckpt), '--top', '9', '--labels', str(labels), '--image-size', '48']
    tables = []
    for predict_main in (jax_cli.predict_main, torch_cli.predict_main):
        assert predict_main(args) == 0
        tables.append(parse(capsys.readouterr().out))
    assert len(tables[0]) == len(tables[1]) == len(images)
    for (_, rows_a), (_, rows_b) in zip(*tables):
        assert len(rows_a) == 7 and rows_a[0][2].startswith('thing ')  # --top clamps to the head
        assert [r[1] for r in rows_a] == [r[1] for r in rows_b]
        assert max(abs(x[0] - y[0]) for x, y in zip(rows_a, rows_b)) <= 1e-5
    # Image i and image i + len(IMAGES) are the same photo: same answer, whichever chunk they fell in.
    assert tables[0][0] == tables[0][len(IMAGES) * 4]


# --------------------------------------------------------------------------- bad inputs

@pytest.mark.slow
def test_missing_image_is_one_line_exit_2(tmp_path):
    proc = run_cli('vit_torch', 'predict', tmp_path / 'nope.jpg', '--checkpoint', tmp_path / 'whatever.npz')
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f'error: {tmp_path / "nope.jpg"}: no such image file']


@pytest.mark.parametrize('case, needle', [
    ('unreadable image', 'not a readable image'),
    ('no head', 'has no classification head'),
    ('zero head', 'the classification head is all zeros'),
    ('unpooled', "classifier 'unpooled' gives one output per token"),
    ('labels', '3 names for a head of 1000 classes'),
    ('top', '--top 0: must be at least 1'),
])
def test_bad_inputs(tmp_path, case, needle):
    image, extra = str(IMAGES[0]), []
    ckpt = checkpoint(tmp_path)
    if case == 'unreadable image':
        image = str(tmp_path / 'photo.jpg')
        Path(image).write_text('not a jpeg')
    elif case == 'no head':
        ckpt = checkpoint(tmp_path, imagenet_tiny(num_classes=0, representation_size=16))
    elif case == 'zero head':
        ckpt = checkpoint(tmp_path, **{'head/kernel': np.zeros((32, 1000), np.float32)})
    elif case == 'unpooled':
        cfg = imagenet_tiny(classifier='unpooled')
        ckpt = checkpoint(tmp_path, cfg)
        config = tmp_path / 'model.json'
        config.write_text(json.dumps(dict(cfg.to_official_dict(), image_size=32)))
        extra = ['--config', str(config)]
    elif case == 'labels':
        (tmp_path / 'l.txt').write_text('a\nb\nc\n')
        extra = ['--labels', str(tmp_path / 'l.txt')]
    elif case == 'top':
        extra = ['--top', '0']
    with pytest.raises(UserError) as info:
        jax_cli.predict_main([image, '--checkpoint', str(ckpt), *extra])
    assert needle in str(info.value)
    if case in ('no head', 'zero head'):  # and what to do instead
        message = str(info.value)
        assert 'imagenet21k+imagenet2012' in message and 'python -m vit_jax train --checkpoint' in message
    if case == 'zero head':
        assert 'raw ImageNet-21k checkpoints' in str(info.value)


# --------------------------------------------------------------------------- preprocessing and --json

@pytest.mark.parametrize('to, mode', [('npz', 'official'), ('hf', 'hf'), ('timm', 'timm')])
def test_the_default_pipeline_follows_the_checkpoints_source(tmp_path, capsys, to, mode):
    cfg = imagenet_tiny()
    path = str(tmp_path / {'npz': 'c.npz', 'hf': 'hf', 'timm': 'c.safetensors'}[to])
    weights.save(path, random_params(weights.param_shapes(cfg), seed=0), cfg, to)
    image, extra = str(PHOTOS / 'chelsea.png'), []
    if to == 'timm':  # a timm file does not record its heads
        (tmp_path / 'model.json').write_text(json.dumps(dict(cfg.to_official_dict(), image_size=32)))
        extra = ['--config', str(tmp_path / 'model.json')]
    assert jax_cli.predict_main([image, '--checkpoint', path, *extra]) == 0
    first = capsys.readouterr().err.strip().splitlines()[-1]
    assert first.startswith('vit_jax: ') and f'preprocess: {mode} (' in first
    torch_cli.predict_main([image, '--checkpoint', path, '--preprocess', 'official', *extra])
    assert 'preprocess: official (tf.image.resize bilinear, no antialias, 32x32' in capsys.readouterr().err


def test_predict_json_writes_the_contract(tmp_path, capsys):
    ckpt = checkpoint(tmp_path)
    out = tmp_path / 'out.json'
    images = [str(IMAGES[0]), str(IMAGES[1])]
    assert jax_cli.predict_main([*images, '--checkpoint', str(ckpt), '--top', '3', '--json', str(out)]) == 0
    table = parse(capsys.readouterr().out)
    d = json.loads(out.read_text())
    assert set(d) == {'checkpoint', 'numerics', 'preprocess', 'images'}
    assert d['checkpoint'] == str(ckpt) and d['numerics'] == 'tanh GELU, LayerNorm eps 1e-6'
    assert d['preprocess']['mode'] == 'official' and d['preprocess']['size'] == [32, 32]
    assert [im['file'] for im in d['images']] == images
    for im, (_, rows) in zip(d['images'], table):
        assert len(im['logits']) == 1000 and len(im['top']) == 3
        probs = predict.softmax(np.array(im['logits']))
        for top, (p, c, name) in zip(im['top'], rows):
            assert (top['index'], top['name']) == (c, name)
            assert abs(top['probability'] - probs[c]) < 1e-9 and abs(top['probability'] - p) < 1e-6


def test_predict_json_refused_before_work_and_unreadable_image_exits_2(tmp_path, monkeypatch, capsys):
    ckpt = checkpoint(tmp_path)
    code, err = command(monkeypatch, capsys, jax_cli.main, 'predict', IMAGES[0], '--checkpoint', ckpt, '--json', ckpt)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith('error: '), err
    bad = tmp_path / 'bad.png'
    bad.write_text('not a png')
    code, err = command(monkeypatch, capsys, torch_cli.main, 'predict', bad, '--checkpoint', ckpt,
                        '--json', tmp_path / 'o.json')
    assert code == 2 and 'not a readable image' in err and 'Traceback' not in err
    assert not (tmp_path / 'o.json').exists()


def command(monkeypatch, capsys, main, *argv) -> tuple[int, str]:
    """`python -m PACKAGE ARGV...` in this process (conftest's `run_main`): (exit code, stderr)."""
    proc = run_main(main, *argv)
    return proc.returncode, proc.stderr

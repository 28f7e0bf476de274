"""Folder datasets (`parity.data.folders`): layouts, lists, the start-up scan, decoding as `predict` does, and the
official tf.data stream's determinism on them.

Everything runs on small folders written here: scikit-learn's digits as PNGs in class
folders (the same files as a CSV and a JSON-lines list), and one image of every format and
mode `predict` reads.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from parity.core.errors import UserError
from parity.data import augment, datasets, folders, images

datasets.import_tensorflow()  # before PyTorch's eval, as every data test does

N_DIGITS = 200  # the first 200 of scikit-learn's digits: 20 to 22 per class


def take(stream, n):
    return [next(stream) for _ in range(n)]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def save(path, array, **kw):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    (array if isinstance(array, Image.Image) else Image.fromarray(array)).save(path, **kw)


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
    """The first N_DIGITS digits as grey 8x8 PNGs in class folders, plus the same files as .csv and .jsonl lists."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp('digits')
    d = load_digits()
    rows = []
    for i in range(N_DIGITS):
        rel = f'{d.target[i]}/{i:04d}.png'
        save(str(root / rel), (d.images[i] * 255 / 16).round().astype(np.uint8))
        rows.append((rel, int(d.target[i])))
    rows.reverse()  # the lists' row order must not matter
    (root / 'list.csv').write_text('path,label\n' + ''.join(f'{p},{y}\n' for p, y in rows))
    (root / 'list.jsonl').write_text(''.join(json.dumps({'path': p, 'label': y}) + '\n' for p, y in rows))
    (root / 'names.jsonl').write_text(''.join(json.dumps({'path': p, 'label': str(y)}) + '\n' for p, y in rows))
    return root


def test_folder_csv_and_jsonl_are_one_dataset(digits_dir):
    folder = datasets.load(str(digits_dir))
    csv = datasets.load(str(digits_dir / 'list.csv'))
    jsonl = datasets.load(str(digits_dir / 'list.jsonl'))
    names = datasets.load(str(digits_dir / 'names.jsonl'))
    assert folder.class_names == names.class_names == tuple('0123456789') and folder.num_classes == 10
    # Integer labels name no class: the classes are 0..max and class_names is None.
    assert csv.class_names is None and jsonl.class_names is None and csv.num_classes == 10
    assert folder.num_examples('train') == csv.num_examples('train') == N_DIGITS and folder.skipped == ()
    assert folder.preset == datasets.Preset('train', 'test', 384)
    batches = {}
    for name, ds in (('folder', folder), ('csv', csv), ('jsonl', jsonl), ('names', names)):
        batches[name] = take(ds.train_batches(32, 8, seed=1), 8) + list(ds.eval_batches('train', 64, 8))
    for name in ('csv', 'jsonl', 'names'):
        for a, b in zip(batches['folder'], batches[name]):
            assert_same(a, b)
    # The first epoch (the first 200 examples of 8 batches of 32) visits every image once.
    np.testing.assert_array_equal(np.sort(np.concatenate([b['label'] for b in batches['folder'][:8]])[:N_DIGITS]),
                                  np.sort(np.repeat(np.arange(10), folder.counts('train'))))
    with pytest.raises(UserError, match="has no split 'test'.*--val-fraction"):
        list(folder.eval_batches(None, 64, 8))


def test_eval_images_are_what_predict_reads(digits_dir):
    ds = datasets.load(str(digits_dir))
    paths = [str(digits_dir / p) for p in ds._split('train').paths[:40]]
    got = next(ds.eval_batches('train', 40, 16))
    np.testing.assert_allclose(got['image'], images.load_images(paths, 16), atol=1e-6)


def test_every_format_and_mode_decodes_as_predict_does(tmp_path):
    from PIL import Image
    from skimage import data

    photo = data.astronaut()[::8, ::8]  # 64x64x3
    grey = data.camera()[::8, ::8]
    made = {
        'a/rgb.png': (photo, {}), 'a/rgb.jpg': (photo, {'quality': 85}), 'a/grey.jpg': (grey, {}),
        'a/progressive.jpg': (photo, {'progressive': True}), 'a/grey.png': (grey, {}),
        'a/rgb.bmp': (photo, {}), 'a/rgb.webp': (photo, {'quality': 80}), 'a/rgb.tif': (photo, {}),
        'b/rgba.png': (Image.fromarray(np.dstack([photo, (np.arange(64)[:, None] * 4 + 0 * photo[..., 0]).astype(
            np.uint8)])), {}),
        'b/la.png': (Image.fromarray(grey).convert('LA'), {}),
        'b/palette.gif': (Image.fromarray(photo).convert('P', palette=Image.Palette.ADAPTIVE, colors=16),
                          {'transparency': 3}),
        'b/palette.png': (Image.fromarray(photo).convert('P', palette=Image.Palette.ADAPTIVE, colors=8), {}),
        'b/grey16.tif': (Image.fromarray((grey.astype(np.uint16) * 257)), {}),
        'b/grey16.png': (Image.fromarray((grey.astype(np.uint16) * 3)), {}),
        'b/cmyk.jpg': (Image.fromarray(photo).convert('CMYK'), {}),
    }
    for rel, (im, kw) in made.items():
        save(str(tmp_path / rel), im, **kw)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: predict turns it upright, so the stream must too
    save(str(tmp_path / 'b/rotated.jpg'), photo[:, :40], exif=exif)
    _write_png16(tmp_path / 'b/rgb16.png', photo)
    late = _png_with_late_exif(photo[:40], exif.tobytes())  # the rotation after the image data
    (tmp_path / 'b/late-exif.png').write_bytes(late)
    (tmp_path / 'a' / 'notes.txt').write_text('not an image: ignored')
    (tmp_path / 'a' / '.hidden.png').write_bytes(b'hidden: ignored')
    ds = datasets.load(str(tmp_path))
    split = ds._split('train')
    assert ds.class_names == ('a', 'b') and len(split.paths) == len(made) + 3
    kinds = dict(zip(split.paths, split.kinds))
    assert {p for p, k in kinds.items() if k == folders.TF_JPEG} == {'a/rgb.jpg', 'a/grey.jpg', 'a/progressive.jpg'}
    assert {p for p, k in kinds.items() if k == folders.TF_PNG} == {'a/rgb.png', 'a/grey.png'}
    got = next(ds.eval_batches('train', 32, 24))['image'][:len(split.paths)]
    want = images.load_images([str(tmp_path / p) for p in split.paths], 24)
    for p, g, w in zip(split.paths, got, want):
        np.testing.assert_allclose(g, w, atol=1e-6, err_msg=p)
    # The full-size pixels too, where the stream decodes JPEGs with TensorFlow's decoder.
    tf = datasets.import_tensorflow()
    for p in ('a/rgb.jpg', 'a/grey.jpg', 'a/progressive.jpg', 'a/rgb.png', 'a/grey.png'):
        full = folders.tf_decode((tf.constant(str(tmp_path / p)), tf.constant(kinds[p], tf.uint8))).numpy()
        np.testing.assert_array_equal(full, folders.decode_file(str(tmp_path / p)), err_msg=p)
    assert folders.decode_file(str(tmp_path / 'b/late-exif.png')).shape == (64, 40, 3)  # turned upright


def _chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))


def _write_png16(path, rgb: np.ndarray) -> None:
    """A 16-bit RGB PNG (Pillow writes none): Pillow reads it as 8-bit RGB, so the stream must decode it as Pillow."""
    import struct
    import zlib

    h, w, _ = rgb.shape
    pixels = (rgb.astype('>u2') * 257 + np.arange(w, dtype='>u2')[None, :, None]).astype('>u2')
    raw = b''.join(b'\0' + pixels[y].tobytes() for y in range(h))
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + _chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, 2, 0, 0, 0))
                     + _chunk(b'IDAT', zlib.compress(raw)) + _chunk(b'IEND', b''))


def _png_with_late_exif(rgb: np.ndarray, exif: bytes) -> bytes:
    """An 8-bit RGB PNG whose eXIf chunk comes after its image data, where Pillow's open does not look."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format='PNG')
    data = buf.getvalue()
    end = data.rindex(b'IEND') - 4
    return data[:end] + _chunk(b'eXIf', exif[6:] if exif.startswith(b'Exif') else exif) + data[end:]


def test_nested_classes_hidden_files_and_symlinks(tmp_path):
    px = np.zeros((4, 4, 3), np.uint8)
    for rel in ('cat/a.png', 'cat/deep/er/b.png', 'cat/.cache/c.png', 'dog/d.jpg', 'dog/e.JPEG', 'loose.png',
                '.hidden/f.png'):
        save(str(tmp_path / rel), px)
    (tmp_path / 'dog' / 'readme.md').write_text('ignored')
    elsewhere = tmp_path.parent / f'{tmp_path.name}-more'
    save(str(elsewhere / 'g.png'), px)
    os.symlink(elsewhere, tmp_path / 'dog' / 'linked')
    save(os.path.join(str(tmp_path / 'dog'), os.fsdecode(b'\xff.png')), px)  # a name that is not UTF-8
    ds = datasets.load(str(tmp_path))
    assert ds.class_names == ('cat', 'dog')
    assert ds._split('train').paths == ['cat/a.png', 'cat/deep/er/b.png', 'dog/d.jpg', 'dog/e.JPEG', 'dog/linked/g.png',
                                        'dog/' + os.fsdecode(b'\xff.png')]
    assert [int(m) for m in next(ds.eval_batches('train', 8, 4))['mask']] == [1] * 6 + [0] * 2
    os.symlink('..', tmp_path / 'cat' / 'deep' / 'up')
    with pytest.raises(UserError, match=r'cat/deep/up is a symbolic link loop'):
        datasets.load(str(tmp_path))


def test_split_folders(tmp_path):
    px = np.zeros((4, 4, 3), np.uint8)
    for rel in ('train/a/1.png', 'train/a/2.png', 'train/b/3.png', 'val/a/4.png', 'val/b/5.png', 'test/b/6.png',
                'other/a/7.png', 'other/b/8.png', 'few/a/9.png'):
        save(str(tmp_path / rel), px)
    ds = datasets.load(str(tmp_path))
    assert ds.preset.train == 'train' and ds.preset.test == 'val' and ds.class_names == ('a', 'b')
    assert (ds.num_examples('train'), ds.num_examples('val'), ds.num_examples('test')) == (3, 2, 1)
    assert ds.counts('test') == (0, 1)  # a held-out split may lack a class
    other = datasets.load(str(tmp_path), train_split='other', test_split='test')
    assert other.preset == datasets.Preset('other', 'test', 384) and other.num_examples('other') == 2
    assert other.num_examples('train') == 3  # any split folder can be evaluated
    with pytest.raises(UserError, match='val has class folders the training split lacks: b;'):
        datasets.load(str(tmp_path), train_split='few')
    with pytest.raises(UserError, match='--test-split nope: no folder'):
        datasets.load(str(tmp_path), test_split='nope')
    with pytest.raises(UserError, match='already holds a held-out split'):
        datasets.load(str(tmp_path), val_fraction=0.2)
    with pytest.raises(UserError, match='--train-split x: no folder'):
        datasets.load(str(tmp_path / 'train'), train_split='x')


def test_val_fraction_is_stable_when_files_are_added(tmp_path):
    px = np.zeros((2, 2, 3), np.uint8)
    for i in range(60):
        save(str(tmp_path / 'a' / f'{i}.png'), px)
        save(str(tmp_path / 'b' / f'{i}.png'), px)

    def val():
        ds = datasets.load(str(tmp_path), val_fraction=0.25)
        assert ds.preset.test == 'val'
        assert ds.num_examples('train') + ds.num_examples('val') == sum(1 for _ in tmp_path.rglob('*.png'))
        return set(ds._split('val').paths), ds.counts('val')

    before, counts = val()
    assert all(8 <= c <= 22 for c in counts), counts  # about a quarter of 60 per class
    for i in range(60, 100):
        save(str(tmp_path / 'b' / f'{i}.png'), px)
    after, _ = val()
    assert {p for p in after if p.startswith('a/')} == {p for p in before if p.startswith('a/')}
    assert before <= after  # nothing moved within b either
    with pytest.raises(UserError, match='--val-fraction 1.5: a fraction between 0 and 1'):
        datasets.load(str(tmp_path), val_fraction=1.5)


def test_stream_is_deterministic_resumable_and_shared_by_processes(digits_dir):
    ds = datasets.load(str(digits_dir), val_fraction=0.2)
    assert ds.num_examples('train') == 168  # the hash holds out 32 of 200
    stream = take(ds.train_batches(32, 8, seed=3), 7)  # step 5 crosses into epoch 1
    assert stream[0]['image'].shape == (32, 8, 8, 3) and stream[0]['label'].dtype == np.int32
    for a, b in zip(stream, take(ds.train_batches(32, 8, seed=3), 7)):
        assert_same(a, b)
    for step in (4, 6):
        assert_same(next(ds.train_batches(32, 8, seed=3, start_step=step)), stream[step])
    parts = [next(ds.train_batches(32, 8, seed=3, start_step=4, process_index=p, process_count=2)) for p in range(2)]
    assert_same({k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, stream[4])
    assert not np.array_equal(next(ds.train_batches(32, 8, seed=4))['label'], stream[0]['label'])
    # Every --augment and --randaug transform runs on folders, as on tensorflow-datasets: the same code.
    aug = augment.parse('crop,flip,rotate=10,jitter=0.2', '1,5', digits=False)
    resumed = next(ds.train_batches(32, 8, seed=3, start_step=1, augment=aug))
    assert_same(resumed, take(ds.train_batches(32, 8, seed=3, augment=aug), 2)[1])
    assert not np.array_equal(resumed['image'], stream[1]['image'])
    whole = list(ds.eval_batches('val', 16, 8))
    halves = [list(ds.eval_batches('val', 16, 8, process_index=p, process_count=2)) for p in range(2)]
    for k, w in enumerate(whole):
        assert_same({key: np.concatenate([halves[0][k][key], halves[1][k][key]]) for key in w}, w)


def test_bad_data_is_one_line_or_skipped(tmp_path, monkeypatch):
    px = np.zeros((4, 4, 3), np.uint8)
    for rel in ('a/1.png', 'a/2.png', 'b/3.png', 'b/4.png'):
        save(str(tmp_path / rel), px)
    save(str(tmp_path / 'b' / 'big.png'), np.zeros((5, 5, 3), np.uint8))
    (tmp_path / 'a' / 'broken.jpg').write_bytes(b'this is not a JPEG')
    (tmp_path / 'b' / 'empty.png').write_bytes(b'')
    os.symlink(tmp_path / 'gone.png', tmp_path / 'b' / 'dangling.png')
    monkeypatch.setattr(folders, 'MAX_IMAGE_PIXELS', 20)  # b/big.png's 25 pixels are past it
    with pytest.raises(UserError, match=r'^--dataset \S+: 4 bad image file\(s\): a/broken.jpg \(not a readable image '
                                        r'.*\), b/big.png \(5x5 pixels, more than the 20 .*, \.\.\. \(1 more\); .*'
                                        r'--skip-bad-images') as e:
        datasets.load(str(tmp_path))
    assert '\n' not in str(e.value)
    ds = datasets.load(str(tmp_path), skip_bad_images=True)
    assert [p for p, _ in ds.skipped] == ['a/broken.jpg', 'b/big.png', 'b/dangling.png', 'b/empty.png']
    assert ds.skipped[2][1] == 'broken symbolic link' and ds.num_examples('train') == 4
    assert '4 bad file(s) skipped' in ds.summary()
    # A class left with no images is refused, skipped or not.
    (tmp_path / 'c').mkdir()
    (tmp_path / 'c' / 'x.png').write_bytes(b'junk')
    empty = r'1 class\(es\) with no images \(an empty class folder, or only bad files\): c;'
    with pytest.raises(UserError, match=empty):
        datasets.load(str(tmp_path), skip_bad_images=True)
    (tmp_path / 'd').mkdir()
    with pytest.raises(UserError, match=r'2 class\(es\) with no images .*: c, d;'):
        datasets.load(str(tmp_path), skip_bad_images=True)


def test_list_errors(tmp_path):
    save(str(tmp_path / 'x.png'), np.zeros((4, 4, 3), np.uint8))
    (tmp_path / 'l.csv').write_text('x.png,cat\nmissing.png,dog\nx.png,dog\n')
    with pytest.raises(UserError, match=r'1 bad image file\(s\): missing.png \(no such file\)'):
        datasets.load(str(tmp_path / 'l.csv'))
    ds = datasets.load(str(tmp_path / 'l.csv'), skip_bad_images=True)
    assert ds.skipped == (('missing.png', 'no such file'),) and ds.class_names == ('cat', 'dog')
    with pytest.raises(UserError, match="has no split 'test'; it has train; hold out"):
        ds.num_examples(ds.preset.test)
    (tmp_path / 'gap.csv').write_text('x.png,0\nx.png,2\n')
    with pytest.raises(UserError, match=r'1 class\(es\) with no images .*: 1;'):
        datasets.load(str(tmp_path / 'gap.csv'))
    for text, needle in (('x.png\n', 'each row is path,label'), ('x.png,a,b\n', 'each row is path,label'),
                         ('', 'no rows'), ('x.png,-1\n', 'a negative class index')):
        (tmp_path / 'bad.csv').write_text(text)
        with pytest.raises(UserError, match=needle):
            datasets.load(str(tmp_path / 'bad.csv'))
    (tmp_path / 'bad.jsonl').write_text('{"path": "x.png"}\n')
    with pytest.raises(UserError, match='line 1 is'):
        datasets.load(str(tmp_path / 'bad.jsonl'))
    with pytest.raises(UserError, match='no such file'):
        datasets.load(str(tmp_path / 'nope.jsonl'))
    with pytest.raises(UserError, match='--val-fraction and --skip-bad-images: for a folder'):
        datasets.load('digits', val_fraction=0.1, skip_bad_images=True)


def test_a_damaged_file_stops_the_stream_in_one_line(tmp_path):
    from skimage import data

    save(str(tmp_path / 'a' / 'ok.jpg'), data.astronaut()[::8, ::8])
    save(str(tmp_path / 'a' / 'cut.jpg'), data.astronaut()[::8, ::8])
    data_bytes = (tmp_path / 'a' / 'cut.jpg').read_bytes()
    (tmp_path / 'a' / 'cut.jpg').write_bytes(data_bytes[:len(data_bytes) // 2])  # the header still reads
    ds = datasets.load(str(tmp_path))
    with pytest.raises(UserError, match=r'a/cut.jpg: not a readable image .*does not decode'):
        list(ds.eval_batches('train', 2, 8))
    with pytest.raises(UserError, match=r'a/cut.jpg: not a readable image'):
        take(ds.train_batches(2, 8, seed=0), 2)


def test_eval_on_a_folder_agrees_in_both_frameworks(digits_dir, tmp_path, capsys):
    from conftest import random_params
    from parity.core import weights
    from parity.core.config import load_config
    from vit_jax.cli import main as jax_main
    from vit_jax.settings import DIGITS_CONFIG
    from vit_torch.cli import main as torch_main

    cfg = load_config(DIGITS_CONFIG).replace(image_size=8)
    weights.save_npz(str(tmp_path / 'ckpt.npz'), random_params(weights.param_shapes(cfg), seed=2, scale=0.3))
    results, logits = {}, {}
    for fw, main in (('vit_jax', jax_main), ('vit_torch', torch_main)):
        assert main(['eval', str(tmp_path / 'ckpt.npz'), '--config', DIGITS_CONFIG, '--dataset', str(digits_dir),
                     '--split', 'val', '--val-fraction', '0.3', '--batch-size', '32',
                     '--logits', str(tmp_path / f'{fw}.npy')]) == 0
        out = capsys.readouterr()
        results[fw], logits[fw] = json.loads(out.out), np.load(tmp_path / f'{fw}.npy')
        assert f'{fw} eval: {digits_dir}: 10 classes' in out.err
    jx, pt = results['vit_jax'], results['vit_torch']
    assert jx['dataset'] == str(digits_dir) and jx['split'] == 'val' and jx['image_size'] == 8
    assert jx['examples'] == pt['examples'] == datasets.load(str(digits_dir), val_fraction=0.3).num_examples('val')
    assert jx['correct'] == pt['correct'] and jx['accuracy'] == pt['accuracy']
    np.testing.assert_allclose(logits['vit_jax'], logits['vit_torch'], atol=1e-4)
    assert np.ptp(logits['vit_jax'].argmax(-1)) > 0  # a random head that still tells images apart
    with pytest.raises(UserError, match='^--val-fraction: for a folder'):  # not for digits or tfds
        jax_main(['eval', str(tmp_path / 'ckpt.npz'), '--config', DIGITS_CONFIG, '--dataset', 'digits',
                  '--val-fraction', '0.3'])


def test_bench_times_the_folder_pipeline(digits_dir, tmp_path, capsys):
    from parity.tools import bench

    out = tmp_path / 'bench.json'
    assert bench.main(['--data-only', '--dataset', str(digits_dir), '--image-size', '8', '--batch-size', '16',
                       '--repeats', '1', '--warmup', '1', '--json', str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc['data_only'] is True and doc['device'].startswith('cpu')
    [row] = doc['results']
    assert (row['model'], row['impl'], row['mode'], row['batch_size'], row['image_size'], row['augment']) == \
        (str(digits_dir), 'data', 'train', 16, 8, 'crop,flip')
    assert row['img_per_s'] > 0 and f'{row["img_per_s"]:.1f}' in capsys.readouterr().out
    with pytest.raises(UserError, match='--dataset: times the input pipeline, with --data-only only'):
        bench.main(['--dataset', str(digits_dir)])
    with pytest.raises(UserError, match='--data-only: pass --dataset'):
        bench.main(['--data-only'])

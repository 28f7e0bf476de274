"""`--augment` and `--randaug` (`parity.data.augment`): parsed strictly, reproducible per (seed, example).

The TensorFlow transforms run on scikit-image's astronaut photograph and through the
tfds pipeline on `tfds.testing.mock_data`; the digits rotation against `np.rot90`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from parity.core.errors import UserError
from parity.data import augment, datasets

tf = datasets.import_tensorflow()
import tensorflow_datasets as tfds  # noqa: E402  (after TensorFlow, as the project loads it)


@pytest.fixture(scope='module')
def photo() -> np.ndarray:
    from skimage import data, transform

    return (transform.resize(data.astronaut(), (64, 64), anti_aliasing=True) * 255).round().astype(np.uint8)


@pytest.fixture(scope='module')
def ops():
    return augment.tf_ops()


# --------------------------------------------------------------------------- the flag

def test_defaults_and_round_trip():
    assert augment.parse(None, None, digits=False) == augment.Augment(crop=True, flip=True)
    assert augment.parse(None, None, digits=False).is_official
    assert augment.parse(None, None, digits=True) == augment.Augment(shift=augment.DIGITS_SHIFT)
    a = augment.parse('flip,rotate=15,jitter=0.4', '2,15', digits=False)
    assert (a.flip, a.crop, a.rotate, a.jitter, a.randaug) == (True, False, 15.0, (0.4, 0.4, 0.4, 0.1), (2, 15))
    assert augment.parse(a.spec(), '2,15', digits=False) == a
    assert augment.parse('none', None, digits=False) == augment.Augment()
    assert augment.parse('jitter=0.1:0.2:0.3:0.05', '0,5', digits=False).jitter == (0.1, 0.2, 0.3, 0.05)
    assert augment.parse('rotate=10,shift=0.5', '0,0', digits=True).spec() == 'rotate=10,shift=0.5'


@pytest.mark.parametrize('spec, randaug, digits, needle', [
    ('flip', None, True, 'flip is not available on this dataset'),
    ('crop', None, True, 'crop is not available'),
    ('shift=1', None, False, 'shift is the digits transform'),
    ('blur', None, False, "unknown transform 'blur'"),
    ('flip,flip', None, False, 'flip is given twice'),
    ('rotate', None, False, 'rotate needs a value'),
    ('flip=2', None, False, 'flip takes no value'),
    ('rotate=400', None, False, 'expected a number from 0 to 180'),
    ('jitter=1:2', None, False, 'expected jitter=F or jitter=B:C:S:H'),
    ('none,flip', None, False, 'none cannot go with other transforms'),
    (None, '2,15', True, 'pass --randaug 0,0 to turn it off'),
    (None, '2', False, 'expected N,M'),
    (None, '2,40', False, 'magnitude in 0..30'),
])
def test_bad_specs_are_one_clear_line(spec, randaug, digits, needle):
    with pytest.raises(UserError, match=None) as e:
        augment.parse(spec, randaug, digits)
    assert needle in str(e.value) and '\n' not in str(e.value)


# --------------------------------------------------------------------------- the TensorFlow transforms

def seed(g: int, s: int = 0):
    return tf.constant([s, g], tf.int64)


def test_jitter_is_reproducible_per_example_and_differs_between_examples(photo, ops):
    x = tf.constant(photo, tf.float32)
    amounts = (0.4, 0.4, 0.4, 0.1)
    a, b, c = (ops.jitter(x, amounts, seed(g)).numpy() for g in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() <= 255
    np.testing.assert_allclose(ops.jitter(x, (0, 0, 0, 0), seed(1)), x)


def test_rotation_is_reproducible_and_rotates(photo, ops):
    x = tf.constant(photo, tf.float32)
    a, b, c = (ops.rotate(x, 15.0, seed(g)).numpy() for g in (3, 3, 4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert (a[0, 0] == 0).all() or (a[-1, -1] == 0).all() or (a[0, -1] == 0).all()  # a corner filled black
    # Zero degrees is the identity.
    np.testing.assert_allclose(ops.rotate(x, 0.0, seed(3)), x, atol=1e-3)


def test_every_randaug_operation_keeps_the_image_a_uint8_photo(photo, ops):
    x = tf.constant(photo)
    for name, op in ops.ops.items():
        for level in (0.0, 10.0, 20.0):
            y = op(x, level, tf.constant(1.0), seed(0)).numpy()
            assert y.shape == photo.shape and y.dtype == np.uint8, (name, level)


def test_randaug_operations_do_what_their_names_say(photo, ops):
    x = tf.constant(photo)
    one, s = tf.constant(1.0), seed(0)
    run = lambda name, level=10.0: ops.ops[name](x, level, one, s).numpy()  # noqa: E731
    np.testing.assert_array_equal(run('Invert'), 255 - photo)
    assert not (run('Posterize', 10.0) & 0x0F).any()  # 4 bits kept at magnitude 10
    np.testing.assert_array_equal(run('Brightness', 0.0), (photo * 0.1).astype(np.uint8))
    auto = run('AutoContrast')
    assert (auto.reshape(-1, 3).min(0) == 0).all() and (auto.reshape(-1, 3).max(0) == 255).all()
    solar = run('Solarize', 5.0)  # threshold 128
    np.testing.assert_array_equal(solar, np.where(photo < 128, photo, 255 - photo))
    np.testing.assert_array_equal(run('Rotate', 0.0), photo)
    shifted = run('TranslateX', 1.0)  # 10 pixels (level 1 of 10 of translate_const 100)
    np.testing.assert_array_equal(shifted[:, :-10], photo[:, 10:])
    assert (shifted[:, -10:] == augment.GREY).all()
    cut = run('Cutout', 2.0)  # a square of side 2 * 8 at a random centre
    assert 0 < (cut != photo).any(-1).sum() <= 16 * 16
    equal = run('Equalize')
    hist = np.histogram(equal[..., 0], bins=8, range=(0, 256))[0]
    assert hist.std() < np.histogram(photo[..., 0], bins=8, range=(0, 256))[0].std()  # flatter


def test_randaug_is_reproducible_per_example(photo, ops):
    x = tf.constant(photo)
    a, b = (ops.randaug(x, 2, 15, seed(7)).numpy() for _ in range(2))
    np.testing.assert_array_equal(a, b)
    others = [ops.randaug(x, 2, 15, seed(g)).numpy() for g in range(8, 14)]
    assert any(not np.array_equal(a, o) for o in others)


# --------------------------------------------------------------------------- through the pipelines

@pytest.fixture
def cifar(monkeypatch):
    monkeypatch.setattr(datasets, '_online', lambda: True)  # mock_data stands in for the download
    with tfds.testing.mock_data(num_examples=16):
        yield datasets.load('cifar10')


@pytest.mark.slow
def test_the_cifar_recipe_pipeline_is_deterministic_and_resumable(cifar):
    aug = augment.parse('flip,rotate=15,jitter=0.4', '2,15', digits=False)
    stream = lambda start=0: cifar.train_batches(8, 32, seed=3, start_step=start, augment=aug)  # noqa: E731
    first, again = stream(), stream()
    batches = [next(first) for _ in range(3)]
    for b in batches:
        np.testing.assert_array_equal(b['image'], next(again)['image'])
        assert b['image'].shape == (8, 32, 32, 3) and -1 <= b['image'].min() and b['image'].max() <= 1
    np.testing.assert_array_equal(next(stream(2))['image'], batches[2]['image'])
    # The same examples plainly resized differ from the augmented ones; 'none' is the plain resize.
    plain = next(cifar.train_batches(8, 32, seed=3, augment=augment.parse('none', None, digits=False)))
    np.testing.assert_array_equal(plain['label'], batches[0]['label'])
    assert not np.array_equal(plain['image'], batches[0]['image'])


@pytest.mark.slow
def test_the_official_pipeline_is_unchanged_by_an_explicit_default(cifar):
    a = next(cifar.train_batches(8, 16, seed=1))
    b = next(cifar.train_batches(8, 16, seed=1, augment=augment.parse('crop,flip', None, digits=False)))
    np.testing.assert_array_equal(a['image'], b['image'])


def test_digits_rotation_is_a_rotation():
    digits = datasets.load('digits')
    images = digits._split('train')[0][:4]
    quarter = digits._render_rotated(images, np.zeros((4, 2)), np.full(4, math.pi / 2), 8)[..., 0]
    turned = [np.rot90(im, k) for im in images for k in (1, -1)]
    assert all(any(np.allclose(q, t, atol=1e-5) for t in turned[2 * i:2 * i + 2]) for i, q in enumerate(quarter))
    np.testing.assert_allclose(digits._render_rotated(images, np.zeros((4, 2)), np.zeros(4), 8),
                               digits._render(images, np.zeros((4, 2)), 8), atol=1e-6)
    aug = augment.parse('shift=1,rotate=15', None, digits=True)
    a, b = (next(digits.train_batches(32, 8, seed=2, augment=aug))['image'] for _ in range(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, next(digits.train_batches(32, 8, seed=2))['image'])

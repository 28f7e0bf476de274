"""Data pipelines (`parity.data.datasets`): the digits split and stream, and the tfds pipeline on mock cifar10.

The streams must be deterministic, resumable from any step (crossing epoch boundaries),
and give every process its rows of the same global batch; eval batches must cover each
example once, padded and masked. The tfds pipeline runs on `tfds.testing.mock_data`
(random uint8 32x32 images), so nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest

from parity.core.errors import UserError
from parity.data import augment, datasets

# Through parity.data.datasets, which loads TensorFlow so that PyTorch can still run beside it.
tf = datasets.import_tensorflow()
import tensorflow_datasets as tfds  # noqa: E402


@pytest.fixture(scope='module')
def digits() -> datasets.Dataset:
    return datasets.load('digits')


def take(stream, n):
    return [next(stream) for _ in range(n)]


def concat(batches, key):
    return np.concatenate([b[key] for b in batches])


def assert_same_batch(a, b):
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# --------------------------------------------------------------------------- digits

def test_digits_split_is_the_documented_one(digits):
    from sklearn.datasets import load_digits

    assert digits.num_classes == 10
    assert (digits.num_examples('train'), digits.num_examples('test')) == (1437, 360)
    batches = list(digits.eval_batches('test', 360, 8))
    order = np.random.RandomState(0).permutation(1797)
    d = load_digits()
    np.testing.assert_array_equal(batches[0]['label'], d.target[order[-360:]])
    # Eval images are the pixels scaled to [-1, 1], exactly, on 3 equal channels.
    np.testing.assert_array_equal(batches[0]['image'][..., 1], d.images[order[-360:]] / 8 - 1)
    assert (batches[0]['image'][..., 0] == batches[0]['image'][..., 2]).all()


def test_digits_train_stream_is_deterministic_and_resumable(digits):
    stream = take(digits.train_batches(100, 8, seed=3), 16)  # epoch 0 ends inside step 14
    for b in stream:
        assert b['image'].shape == (100, 8, 8, 3) and b['image'].dtype == np.float32
        assert b['label'].dtype == np.int32
        assert b['image'].min() >= -1 and b['image'].max() <= 1
    for step in (5, 14, 15):
        assert_same_batch(next(digits.train_batches(100, 8, seed=3, start_step=step)), stream[step])
    assert not np.array_equal(next(digits.train_batches(100, 8, seed=4))['label'], stream[0]['label'])
    # The first epoch visits every training example once.
    first_epoch = concat(stream, 'label')[:1437]
    train_labels = concat(digits.eval_batches('train', 1437, 8), 'label')
    np.testing.assert_array_equal(np.bincount(first_epoch), np.bincount(train_labels))


def test_digits_processes_share_one_global_batch(digits):
    whole = next(digits.train_batches(96, 16, seed=0, start_step=20))
    parts = [next(digits.train_batches(96, 16, seed=0, start_step=20, process_index=p, process_count=4))
             for p in range(4)]
    assert parts[0]['image'].shape == (24, 16, 16, 3)
    assert_same_batch({k: concat(parts, k) for k in whole}, whole)
    with pytest.raises(UserError, match='not divisible by the 3 processes'):
        next(digits.train_batches(100, 8, seed=0, process_count=3))


def test_digits_augmentation_is_on_train_only(digits):
    grid = np.arange(17) / 8 - 1  # every value an unshifted digit pixel can take
    on_grid = lambda x: np.isin(x, grid).all()  # noqa: E731
    assert on_grid(concat(digits.eval_batches(None, 128, 8), 'image'))
    assert not on_grid(next(digits.train_batches(128, 8, seed=0))['image'])  # sub-pixel shifts
    plain = augment.parse('none', None, digits=True)
    assert on_grid(next(digits.train_batches(128, 8, seed=0, augment=plain))['image'])


def test_digits_eval_batches_are_padded_and_masked(digits):
    batches = list(digits.eval_batches(None, 128, 8))
    assert [int(b['mask'].sum()) for b in batches] == [128, 128, 104]
    assert (batches[-1]['image'][104:] == 0).all() and batches[-1]['mask'].dtype == bool
    per_process = [list(digits.eval_batches(None, 128, 8, process_index=p, process_count=2)) for p in range(2)]
    assert [len(b) for b in per_process] == [3, 3]
    for k, whole in enumerate(batches):
        assert_same_batch({key: concat([per_process[0][k], per_process[1][k]], key) for key in whole}, whole)
    assert next(digits.eval_batches(None, 8, 24))['image'].shape == (8, 24, 24, 3)


# --------------------------------------------------------------------------- tfds (mock cifar10)

@pytest.fixture
def cifar(tmp_path, monkeypatch):
    # mock_data replaces the download (and the data); the look for a network must not stop it first.
    monkeypatch.setattr(datasets, '_online', lambda: True)
    with tfds.testing.mock_data(num_examples=24):
        yield datasets.load('cifar10', data_dir=str(tmp_path))


def plain(cifar, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every image of `split` as the official eval pipeline makes it, computed here by hand."""
    ds = cifar.builder.as_dataset(split=split)
    images, labels = zip(*[(ex['image'], ex['label']) for ex in ds])
    x = tf.image.resize(tf.stack(images), [size, size]).numpy()
    return (x - 127.5) / 127.5, np.array(labels)


def test_tfds_presets_follow_the_official_configs(cifar):
    assert cifar.num_classes == 10
    assert (cifar.preset.train, cifar.preset.test, cifar.preset.image_size) == ('train[:98%]', 'test', 384)
    assert datasets.PRESETS['imagenet2012'].test == 'validation'


def test_tfds_eval_is_a_plain_resize(cifar):
    batches = list(cifar.eval_batches(None, 10, 48))
    assert [int(b['mask'].sum()) for b in batches] == [10, 10, 4]
    images, labels = plain(cifar, 'test', 48)
    np.testing.assert_allclose(concat(batches, 'image')[:24], images, atol=1e-6)
    np.testing.assert_array_equal(concat(batches, 'label')[:24], labels)


def test_tfds_train_is_augmented_deterministic_and_resumable(cifar):
    stream = take(cifar.train_batches(8, 32, seed=0), 6)  # two epochs of 24
    for b in stream:
        assert b['image'].shape == (8, 32, 32, 3) and b['image'].dtype == np.float32
        assert b['image'].min() >= -1 and b['image'].max() <= 1 and b['label'].dtype == np.int32
    originals, labels = plain(cifar, 'train[:98%]', 32)
    # Random crop and flip: (almost) no training image is an original.
    same = [any(np.abs(x - o).max() < 1e-4 for o in originals) for x in concat(stream, 'image')]
    assert sum(same) <= 4, f'{sum(same)} of 48 training images are not augmented'
    np.testing.assert_array_equal(np.bincount(concat(stream[:3], 'label'), minlength=10),
                                  np.bincount(labels, minlength=10))  # epoch 0 visits each example once
    for step in (2, 4):
        assert_same_batch(next(cifar.train_batches(8, 32, seed=0, start_step=step)), stream[step])
    parts = [next(cifar.train_batches(8, 32, seed=0, start_step=4, process_index=p, process_count=2)) for p in range(2)]
    assert_same_batch({k: concat(parts, k) for k in stream[4]}, stream[4])


def test_unknown_and_unprepared_datasets(tmp_path, monkeypatch):
    with pytest.raises(UserError, match='unknown dataset'):
        datasets.load('no_such_dataset', data_dir=str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError('no network (blocked by the test)')

    import socket

    monkeypatch.setattr(socket, 'getaddrinfo', offline)
    monkeypatch.setattr(socket.socket, 'connect', offline)
    with pytest.raises(UserError, match=r'not prepared .*tfds build cifar10 --data_dir'):
        datasets.load('cifar10', data_dir=str(tmp_path))

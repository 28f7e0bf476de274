"""`vit_jax train` on your own images: a folder of class folders and the same files as a CSV train to the same
parameters, the class names land in the workdir and travel on, bad data is refused before anything is written,
and a restart or a fine-tuning on other classes is refused by name. (The folder datasets themselves, their
layouts, scan and stream, are tests/test_folders.py's.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from parity.core.errors import UserError
from vit_jax import sweep, train_cli

NAMES = ('eight', 'five', 'four', 'nine', 'one', 'seven', 'six', 'three', 'two', 'zero')  # sorted
WORDS = ['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine']


@pytest.fixture(scope='module')
def photos(tmp_path_factory) -> Path:
    """120 of scikit-learn's digits as 8x8 PNGs in class folders named by word, and the same files as a CSV."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp('own') / 'photos'
    d = load_digits()
    rows = []
    for i in range(120):
        rel = f'{WORDS[d.target[i]]}/{i:04d}.png'
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(d.images[i] * 255 / 16).astype(np.uint8)).save(root / rel)
        rows.append(f'{rel},{WORDS[d.target[i]]}\n')
    # Inside the folder, so that each file's path relative to the list is the one relative to the folder (what
    # --val-fraction hashes); the folder itself ignores a file that is not an image.
    (root / 'photos.csv').write_text('path,label\n' + ''.join(reversed(rows)))
    return root


def config(tmp_path: Path) -> Path:
    path = tmp_path / 'mu.json'
    path.write_text(json.dumps({'variant': 'mu/4', 'num_classes': 10, 'pool_type': 'tok', 'image_size': 8}))
    return path


def train(dataset, workdir: Path, cfg: Path, *extra, capsys=None) -> dict:
    assert train_cli.main(['--dataset', str(dataset), '--config', str(cfg), '--workdir', str(workdir),
                           '--image-size', '8', '--steps', '2', '--warmup-steps', '0', '--batch-size', '16',
                           '--accum-steps', '1', '--augment', 'none', '--eval-every', '0', '--val-fraction', '0.25',
                           *map(str, extra)]) == 0
    return json.loads((workdir / 'run.json').read_text())


def digest(capsys) -> str:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])['params_sha256']


def test_a_folder_and_its_csv_train_alike_and_the_names_travel(photos, tmp_path, capsys):
    cfg = config(tmp_path)
    record = train(photos, tmp_path / 'folder', cfg)
    a = digest(capsys)
    assert record['dataset'] == str(photos) and record['val_fraction'] == 0.25
    assert tuple(record['class_names']) == NAMES
    assert (tmp_path / 'folder' / 'labels.txt').read_text().split('\n')[:-1] == list(NAMES)
    assert not (tmp_path / 'folder' / 'skipped.txt').exists()
    train(photos / 'photos.csv', tmp_path / 'csv', cfg)
    assert digest(capsys) == a  # the same files, the same names: bit for bit the same parameters

    # A restart on a folder whose classes changed is refused, naming them; nothing is trained
    extra = photos.parent / 'more'
    shutil.copytree(photos, extra)
    (extra / 'zero').rename(extra / 'naught')
    with pytest.raises(UserError, match=r'other classes: added naught; missing zero; restore'):
        train(extra, tmp_path / 'folder', cfg, '--dataset', str(extra))
    # Fine-tuning the run's model, head kept (same class count), on other classes: refused by name
    with pytest.raises(UserError, match=r'trained on other classes .*added naught; missing zero'):
        train(extra, tmp_path / 'tune', cfg, '--checkpoint', tmp_path / 'folder' / 'final.npz')
    assert not (tmp_path / 'tune').exists()
    # Evaluating it on them: refused too, rather than scored against the wrong labels
    from vit_torch import cli as torch_cli

    with pytest.raises(UserError, match=r'trained on other classes .*added naught; missing zero; its logits'):
        torch_cli.eval_main([str(tmp_path / 'folder' / 'final.npz'), '--dataset', str(extra), '--val-fraction', '0.25'])


def test_bad_images_refused_before_anything_is_written_or_skipped_and_listed(photos, tmp_path, capsys):
    bad = tmp_path / 'bad'
    shutil.copytree(photos, bad)
    (bad / 'one' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
    (bad / 'notes.txt').write_text('not an image: ignored')
    with pytest.raises(UserError, match=r'broken\.png'):
        train(bad, tmp_path / 'refused', config(tmp_path))
    assert not (tmp_path / 'refused').exists()
    train(bad, tmp_path / 'skipping', config(tmp_path), '--skip-bad-images')
    listed = (tmp_path / 'skipping' / 'skipped.txt').read_text().splitlines()
    assert len(listed) == 1 and listed[0].startswith('one/broken.png\t')
    assert '1 bad file(s) skipped (listed in' in capsys.readouterr().err


def test_a_folder_with_nothing_held_out_is_refused_before_training(photos, tmp_path):
    with pytest.raises(UserError, match=r"no split 'test'.*--val-fraction"):
        train_cli.main(['--dataset', str(photos), '--config', str(config(tmp_path)), '--workdir', str(tmp_path / 'w'),
                        '--image-size', '8', '--steps', '2'])
    assert not (tmp_path / 'w').exists()


def test_sweep_checks_a_folder_dataset_before_any_run(tmp_path):
    with pytest.raises(UserError, match=r'--dataset .*nowhere\.csv: no such folder or file'):
        train_cli.check_flags(['--dataset', str(tmp_path / 'nowhere.csv'), '--workdir', str(tmp_path / 'w')])
    assert hasattr(sweep, 'main')

"""Class names travel with a model: a train run's labels.txt, read back by predict and written into the
Hugging Face (`id2label`) and timm hub (`label_names`) exports; a run refused when its classes change."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import random_params, tiny
from parity.core import weights
from parity.core.errors import UserError
from parity.data import class_names
from vit_jax import cli as jax_cli
from vit_torch import cli as torch_cli

NAMES = ['cat', 'dog', 'hot dog', 'émeu', 'zebra']
PHOTO = Path(__import__('skimage.data').data.__file__).parent / 'chelsea.png'


def run_dir(tmp_path: Path, names=NAMES, cfg=None) -> Path:
    """A workdir as `vit_jax train` leaves it: final.npz, config.json, run.json, labels.txt."""
    cfg = cfg or tiny()
    run = tmp_path / 'run'
    run.mkdir()
    weights.save(str(run / 'final.npz'), random_params(weights.param_shapes(cfg)), cfg, 'npz')
    (run / 'config.json').write_text(json.dumps(cfg.to_official_dict()))
    (run / 'run.json').write_text(json.dumps({'class_names': names}))
    (run / 'labels.txt').write_text(''.join(f'{n}\n' for n in names), encoding='utf-8')
    return run


def top1(out: str) -> str:
    return out.splitlines()[1].split(None, 2)[2]


def test_a_runs_class_names_reach_predict_and_both_exports(tmp_path, capsys):
    run = run_dir(tmp_path)
    ckpt = weights.load(str(run / 'final.npz'))
    assert ckpt.labels == NAMES and ckpt.labels_source == str(run / 'labels.txt')
    assert torch_cli.predict_main([str(PHOTO), '--checkpoint', str(run / 'final.npz'), '--top', '5']) == 0
    out, err = capsys.readouterr()
    assert sorted(line.split(None, 2)[2] for line in out.splitlines()[1:]) == sorted(NAMES)
    assert 'labels.txt' in err
    want = top1(out)

    # Hugging Face: id2label and label2id, as transformers reads them back
    from transformers import ViTForImageClassification

    assert torch_cli.convert_main([str(run / 'final.npz'), str(tmp_path / 'hf'), '--to', 'hf']) == 0
    model = ViTForImageClassification.from_pretrained(tmp_path / 'hf')
    assert [model.config.id2label[i] for i in range(5)] == NAMES and model.config.label2id['zebra'] == 4
    # timm: a hub folder whose config.json timm builds the model from, with label_names
    import timm
    import torch

    assert torch_cli.convert_main([str(run / 'final.npz'), str(tmp_path / 'timm'), '--to', 'timm']) == 0
    hub = json.loads((tmp_path / 'timm' / 'config.json').read_text())
    assert hub['label_names'] == NAMES
    tm = timm.create_model(f'local-dir:{tmp_path / "timm"}', pretrained=True).eval()
    assert tm.num_classes == 5 and tm.pos_embed.shape == (1, 17, 32)
    # Both folders read back here carry the names, and predict the same top class as the run's npz (the official
    # preprocessing, so that only the numerics the files record differ: tanh GELU, written down in each)
    for folder in ('hf', 'timm'):
        assert weights.load(str(tmp_path / folder)).labels == NAMES
        assert jax_cli.predict_main([str(PHOTO), '--checkpoint', str(tmp_path / folder), '--top', '1',
                                     '--preprocess', 'official']) == 0
        out, err = capsys.readouterr()
        assert top1(out) == want, folder
    # timm builds the very function the folder's model_args describe (tanh GELU from act_layer)
    from vit_torch import runtime

    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    loaded = weights.load(str(tmp_path / 'timm'))
    cfg = weights.configure(loaded, None)
    assert cfg.gelu == 'tanh' and hub['model_args']['act_layer'] == 'gelu_tanh'
    with torch.no_grad():
        theirs = tm(runtime.to_nchw(x, 'cpu')).numpy()
    assert np.abs(runtime.forward(cfg, loaded.params(cfg))(x) - theirs).max() < 1e-5


def test_a_state_dict_file_says_the_names_have_no_room(tmp_path, capsys):
    run = run_dir(tmp_path)
    assert torch_cli.convert_main([str(run / 'final.npz'), str(tmp_path / 'm.safetensors'), '--to', 'timm']) == 0
    assert 'no room for the 5 class names' in capsys.readouterr().err


def test_a_labels_txt_of_another_length_is_said_and_not_used(tmp_path):
    run = run_dir(tmp_path, names=NAMES[:3])
    ckpt = weights.load(str(run / 'final.npz'))
    assert ckpt.labels is None and any('names 3 classes' in n for n in ckpt.notes)


def test_the_classes_added_and_missing_are_named():
    assert class_names.change(['a', 'b', 'c'], ['a', 'c', 'd']) == 'added d; missing b'
    assert 'another order' in class_names.change(['a', 'b'], ['b', 'a'])
    assert class_names.change([str(i) for i in range(9)], []) == 'missing 0, 1, 2, 3, 4 and 4 more'


def test_a_teacher_of_other_classes_is_refused(tmp_path):
    from vit_jax import train

    run = run_dir(tmp_path)
    with pytest.raises(UserError, match=r'--teacher .*other classes than pets: added ant; missing émeu'):
        train.load_teachers([(str(run / 'final.npz'), None)], 5, 'pets',
                            class_names=['ant', 'cat', 'dog', 'hot dog', 'zebra'])
    assert len(train.load_teachers([(str(run / 'final.npz'), None)], 5, 'pets', class_names=NAMES)) == 1

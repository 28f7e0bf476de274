"""The catalogue of Google's published ViT checkpoints: what each file is, as data, and AugReg's index.csv filtered
and ranked the official way.

Every row comes from google-research/vision_transformer at commit c6de1e5 (2024-05-21); `source` says where
its numbers are written:

    README      README.md, "Available ViT models" (the AugReg table: file, size, resolution, ImageNet top-1)
                and its changelog (2020-10-29: the "-224" files and their expected top-1)
    COLAB_LS    vit_jax.ipynb, the output of `gsutil ls -lh gs://vit_models/imagenet* gs://vit_models/sam`
                (the files of each bucket and their sizes)
    AUGREG_NB   vit_jax_augreg.ipynb, the table of the best ImageNet fine-tune per model (B/8's files)

A number the sources do not give is None, never a guess. `size_mib` is the listed size (rounded by the
listing, so not a check); `size` and `sha256` are exact values to verify a download against, None where
no source records them (the download then checks the server's md5, else its length).

The gs://vit_models/gsam bucket is published (README, 2022-06-09) without a list of its files, so it has
no rows here; its files are reached by URL (`gs://vit_models/gsam/FILE.npz`).
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
from typing import Optional, Sequence

REPO = 'google-research/vision_transformer@c6de1e5'
README = f'{REPO} README.md, "Available ViT models"'
README_224 = f'{REPO} README.md, changelog 2020-10-29 (the -224 files)'
COLAB_LS = f'{REPO} vit_jax.ipynb, `gsutil ls -lh` of the buckets'
AUGREG_NB = f'{REPO} vit_jax_augreg.ipynb, best ImageNet fine-tune per model'

# AugReg's model names (index.csv's `name`) and the configs the project builds for them.
AUGREG_CONFIGS = {
    'Ti/16': 'ViT-Ti_16', 'S/16': 'ViT-S_16', 'S/32': 'ViT-S_32', 'B/8': 'ViT-B_8', 'B/16': 'ViT-B_16',
    'B/32': 'ViT-B_32', 'L/16': 'ViT-L_16', 'R+Ti/16': 'R+ViT-Ti_16', 'R26+S/32': 'R26+ViT-S_32',
    'R50+L/32': 'R50+ViT-L_32',
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One published checkpoint."""

    name: str  # CONFIG[-VARIANT]@DATA: what a command takes in place of a path
    architecture: str  # an official config name (parity.core.config.OFFICIAL_CONFIGS)
    pretrain: str  # the pre-training data
    finetune: Optional[str]  # the fine-tuning data, None for a pre-training
    url: str  # gs://BUCKET/PATH, fetched under VIT_MIRROR_GCS_URL
    source: str  # where the numbers of this row are written
    resolution: Optional[int] = None  # the image size the file was trained or fine-tuned at, where stated
    top1: Optional[float] = None  # published ImageNet top-1 (%), where stated
    size_mib: Optional[float] = None  # the listed size
    size: Optional[int] = None  # exact bytes, where recorded (checked on download)
    sha256: Optional[str] = None  # where recorded (checked on download)

    @property
    def filename(self) -> str:
        return self.url.rsplit('/', 1)[-1]


def _bucket(folder: str, pretrain: str, finetune: Optional[str], files: Sequence[tuple], source: str,
            resolutions: Optional[dict] = None, top1: Optional[dict] = None, extra: str = '') -> list[Row]:
    """Rows of one folder of gs://vit_models: (stem, architecture, listed MiB) each, named STEM@FOLDER."""
    resolutions, top1 = resolutions or {}, top1 or {}
    return [Row(f'{stem}@{folder}', arch, pretrain, finetune, f'gs://vit_models/{folder}/{stem}.npz',
                source + (extra if stem in top1 or stem in resolutions else ''), resolutions.get(stem),
                top1.get(stem), round(mib, 2))
            for stem, arch, mib in files]


_I21K = _bucket('imagenet21k', 'imagenet21k', None, [
    ('R26+ViT-B_32', 'R26+ViT-B_32', 450.23), ('R50+ViT-B_16', 'R50+ViT-B_16', 439.85),
    ('R50+ViT-L_32', 'R50+ViT-L_32', 1.31 * 1024), ('ViT-B_16', 'ViT-B_16', 393.69),
    ('ViT-B_32', 'ViT-B_32', 400.01), ('ViT-B_8', 'ViT-B_8', 393.72), ('ViT-H_14', 'ViT-H_14', 2.46 * 1024),
    ('ViT-L_16', 'ViT-L_16', 1.22 * 1024), ('ViT-L_32', 'ViT-L_32', 1.23 * 1024),
], COLAB_LS)

# The 2020-10-29 changelog: the "-224" files are fine-tuned "at 224x224 resolution (instead of default 384x384)",
# expected to reach 81.2% and 82.7% top-1; the default files of that release are therefore at 384.
_I21K_I1K = _bucket('imagenet21k+imagenet2012', 'imagenet21k', 'imagenet2012', [
    ('R50+ViT-B_16', 'R50+ViT-B_16', 377.57), ('ViT-B_16-224', 'ViT-B_16', 330.29), ('ViT-B_16', 'ViT-B_16', 331.4),
    ('ViT-B_32', 'ViT-B_32', 336.89), ('ViT-B_8', 'ViT-B_8', 334.78), ('ViT-L_16-224', 'ViT-L_16', 1.13 * 1024),
    ('ViT-L_16', 'ViT-L_16', 1.14 * 1024), ('ViT-L_32', 'ViT-L_32', 1.14 * 1024),
], COLAB_LS, resolutions={'ViT-B_16-224': 224, 'ViT-L_16-224': 224, 'ViT-B_16': 384, 'ViT-B_32': 384,
                          'ViT-L_16': 384, 'ViT-L_32': 384},
   top1={'ViT-B_16-224': 81.2, 'ViT-L_16-224': 82.7}, extra='; ' + README_224)

_SAM = _bucket('sam', 'imagenet2012', None, [
    ('ViT-B_16', 'ViT-B_16', 330.3), ('ViT-B_32', 'ViT-B_32', 336.61), ('ViT-L_16', 'ViT-L_16', 1.13 * 1024),
    ('ViT-L_32', 'ViT-L_32', 1.14 * 1024), ('ViT-S_16', 'ViT-S_16', 252.57),
], COLAB_LS)

# README's recommended AugReg checkpoints ("the best pre-training metrics"): model, upstream file, its MiB,
# the ImageNet fine-tune's file suffix (after `--imagenet2012-`), its resolution and top-1.
_AUGREG_TABLE = [
    ('L/16', 'L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-sd_0.0', 1243, 'steps_20k-lr_0.01-res_384', 384,
     85.59),
    ('B/16', 'B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0', 391, 'steps_20k-lr_0.03-res_384', 384, 85.49),
    ('S/16', 'S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0', 115, 'steps_20k-lr_0.03-res_384', 384, 83.73),
    ('R50+L/32', 'R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1', 1337, 'steps_20k-lr_0.01-res_384',
     384, 85.99),
    ('R26+S/32', 'R26_S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0', 170, 'steps_20k-lr_0.01-res_384', 384,
     83.85),
    ('Ti/16', 'Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0', 37, 'steps_20k-lr_0.03-res_384', 384, 78.22),
    ('B/32', 'B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0', 398, 'steps_20k-lr_0.01-res_384', 384, 83.59),
    ('S/32', 'S_32-i21k-300ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0', 118, 'steps_20k-lr_0.01-res_384', 384, 79.58),
    ('R+Ti/16', 'R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0', 40, 'steps_20k-lr_0.03-res_384', 384,
     75.40),
]
# B/8 (changelog 2021-07-29) is not in that table; the AugReg colab's best ImageNet fine-tune names its files.
_AUGREG_B8 = ('B/8', 'B_8-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0', None, 'steps_20k-lr_0.03-res_224',
              224, None)


def _augreg_rows() -> list[Row]:
    rows = []
    for model, upstream, mib, adapt, res, top1 in [*_AUGREG_TABLE, _AUGREG_B8]:
        arch = AUGREG_CONFIGS[model]
        source = AUGREG_NB if model == 'B/8' else README
        rows.append(Row(f'{arch}@augreg-i21k', arch, 'imagenet21k', None,
                        f'gs://vit_models/augreg/{upstream}.npz', source, None, None, mib))
        rows.append(Row(f'{arch}@augreg-i21k+imagenet2012', arch, 'imagenet21k', 'imagenet2012',
                        f'gs://vit_models/augreg/{upstream}--imagenet2012-{adapt}.npz', source, res, top1))
    return rows


CATALOGUE: tuple[Row, ...] = tuple(_I21K + _I21K_I1K + _SAM + _augreg_rows())
_BY_NAME = {r.name.lower(): r for r in CATALOGUE}


def find(name: str) -> Optional[Row]:
    """The row named `name` (case-insensitive), or None."""
    return _BY_NAME.get(name.lower())


def close_names(name: str, n: int = 3) -> list[str]:
    """Catalogue names that look like `name`, for a "did you mean"."""
    lower = difflib.get_close_matches(name.lower(), list(_BY_NAME), n=n, cutoff=0.6)
    return [_BY_NAME[k].name for k in lower]


def matching(pattern: Optional[str]) -> list[Row]:
    """Rows whose name, architecture, data or filename contain `pattern` (case-insensitive); all when None."""
    if not pattern:
        return list(CATALOGUE)
    p = pattern.lower()
    return [r for r in CATALOGUE
            if any(p in (v or '').lower() for v in (r.name, r.architecture, r.pretrain, r.finetune, r.filename))]


def as_dict(row: Row) -> dict:
    d = dataclasses.asdict(row)
    d['filename'] = row.filename
    return d


# --------------------------------------------------------------------------- AugReg's index.csv

AUGREG_INDEX = 'vit_models/augreg/index.csv'  # under VIT_MIRROR_GCS_URL
AUGREG_COLUMNS = ('name', 'ds', 'epochs', 'lr', 'aug', 'wd', 'do', 'sd', 'best_val', 'final_val', 'final_test',
                  'adapt_ds', 'adapt_lr', 'adapt_steps', 'adapt_resolution', 'adapt_final_val', 'adapt_final_test',
                  'params', 'infer_samples_per_sec', 'filename', 'adapt_filename')
# The columns `models --augreg` filters on: its flag, and how a value compares (numbers as numbers).
AUGREG_FILTERS = {'name': str, 'ds': str, 'aug': str, 'wd': float, 'sd': float, 'do': float, 'adapt_ds': str,
                  'adapt_resolution': int}


def read_augreg_index(text: str, where: str) -> list[dict]:
    """index.csv's rows as dicts of strings; ValueError (one line) when the header lacks an official column."""
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in AUGREG_COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f'{where}: not AugReg\'s index.csv (no column {", ".join(missing[:3])})')
    return list(reader)


def _same(value: str, wanted, kind) -> bool:
    if kind is str:
        return value == wanted
    try:
        return kind(float(value)) == kind(wanted) if kind is int else float(value) == float(wanted)
    except ValueError:
        return False


def _number(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float('-inf')  # an empty accuracy ranks last


def filter_augreg(rows: Sequence[dict], **wanted) -> list[dict]:
    """The rows whose columns equal each given value (None: not filtered); see AUGREG_FILTERS."""
    given = {k: v for k, v in wanted.items() if v is not None}
    for k in given:
        if k not in AUGREG_FILTERS:
            raise KeyError(k)
    return [r for r in rows if all(_same(r.get(k, ''), v, AUGREG_FILTERS[k]) for k, v in given.items())]


def rank_upstream(rows: Sequence[dict]) -> list[dict]:
    """One row per pre-training file, best first by `final_val` (the official pick: vit_jax/train.py sorts the
    i21k rows of a model by final_val and takes the last)."""
    seen: dict[str, dict] = {}
    for r in rows:
        seen.setdefault(r['filename'], r)
    return sorted(seen.values(), key=lambda r: (-_number(r['final_val']), r['filename']))


def recommended_upstream(rows: Sequence[dict]) -> set[str]:
    """The "recommended" pre-training file of each model: its best `final_val` (vit_jax_augreg.ipynb's
    `best_filenames`: per `name`, sort by final_val, the last)."""
    best: dict[str, dict] = {}
    for r in rank_upstream(rows):
        best.setdefault(r['name'], r)
    return {r['filename'] for r in best.values()}


def rank_adapt(rows: Sequence[dict]) -> list[dict]:
    """The fine-tunes, best first by `adapt_final_val` (the colab's pick within a dataset)."""
    return sorted([r for r in rows if r.get('adapt_filename')],
                  key=lambda r: (-_number(r['adapt_final_val']), r['adapt_filename']))

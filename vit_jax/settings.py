"""The settings of one training run: the per-dataset defaults, resolved once into a frozen `TrainSettings`.

`python -m vit_jax train` resolves its flags here (a flag given wins over the dataset's
default) and the run goes on these settings alone. `run.json` in the workdir is written
from them, and a restart is checked against it: the fields that decide what the run
computes (`RUN_FIELDS`) must repeat exactly, the others (how often to log, evaluate and
checkpoint, where the data lives) may change between restarts.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from parity.core.config import ViTConfig
from parity.core.errors import UserError
from parity.data import datasets

DIGITS_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'digits.json')


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Defaults of one dataset; every field is a command-line flag."""

    steps: int
    warmup_steps: int
    batch_size: int = 512
    accum_steps: int = 8
    lr: float = 0.03
    eval_every: int = 100


# The official fine-tuning defaults (configs/common.py; configs/augreg.py for other datasets).
# digits trains from scratch on 1,437 images: a higher rate, a smaller batch, no accumulation.
RECIPES = {
    'cifar10': Recipe(steps=10_000, warmup_steps=500),
    'cifar100': Recipe(steps=10_000, warmup_steps=500),
    'imagenet2012': Recipe(steps=20_000, warmup_steps=500),
    datasets.DIGITS: Recipe(steps=1000, warmup_steps=50, batch_size=128, accum_steps=1, lr=0.1, eval_every=200),
}
DEFAULT_RECIPE = Recipe(steps=500, warmup_steps=100)


def _run(**kw) -> Any:
    """A field that decides what the run computes: a restart must repeat it exactly."""
    return dataclasses.field(metadata={'run': True}, **kw)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Every setting of one training run, defaults filled in and checked."""

    config: ViTConfig = _run()  # the model trained, at its training resolution and class count
    dataset: str = _run()
    checkpoint: Optional[str] = _run()  # the absolute path fine-tuned from, or None (from scratch)
    image_size: int = _run()
    steps: int = _run()
    batch_size: int = _run()  # global, over every device and process
    accum_steps: int = _run()
    lr: float = _run()
    warmup_steps: int = _run()
    schedule: str = _run()
    dtype: str = _run()
    seed: int = _run()
    eval_every: int = 100  # 0: only at the end
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    data_dir: Optional[str] = None

    def record(self) -> dict:
        """The settings as `run.json` holds them (the config in the official field layout)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d['config'] = dict(self.config.to_official_dict(), image_size=self.config.image_size)
        return d

    def differences(self, recorded: dict) -> list[str]:
        """The run-defining fields in which `recorded` (a run.json) differs from these settings."""
        mine = self.record()
        return [k for k in RUN_FIELDS if recorded.get(k) != mine[k]]


RUN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainSettings) if f.metadata.get('run'))


def resolve(args, cfg: ViTConfig) -> TrainSettings:
    """The settings of a `train` command line for model `cfg`: flags, else the dataset's defaults; checked."""
    recipe = RECIPES.get(args.dataset, DEFAULT_RECIPE)
    pick = {name: getattr(args, name) if getattr(args, name) is not None else getattr(recipe, name)
            for name in ('steps', 'batch_size', 'accum_steps', 'lr', 'warmup_steps', 'eval_every')}
    s = TrainSettings(
        config=cfg, dataset=args.dataset, checkpoint=os.path.abspath(args.checkpoint) if args.checkpoint else None,
        image_size=cfg.image_size, schedule=args.schedule, dtype=args.dtype, seed=args.seed,
        checkpoint_every=args.checkpoint_every or pick['eval_every'] or pick['steps'],
        keep_checkpoints=args.keep_checkpoints, log_every=args.log_every, data_dir=args.data_dir, **pick)
    if s.warmup_steps < 0 or s.warmup_steps >= s.steps:
        raise UserError(f'--warmup-steps {s.warmup_steps} must be at least 0 and below --steps {s.steps}')
    if not s.lr > 0:  # NaN included
        raise UserError(f'--lr {s.lr}: must be positive')
    if s.batch_size % s.accum_steps:
        raise UserError(f'--batch-size {s.batch_size} is not divisible by --accum-steps {s.accum_steps}')
    return s

"""The settings of one training run: the per-dataset defaults, resolved once into a frozen `TrainSettings`.

`python -m vit_jax train` resolves its flags here (a flag given wins over the dataset's
default) and the run goes on these settings alone. `run.json` in the workdir is written
from them, and a restart is checked against it: the fields that decide what the run
computes (`RUN_FIELDS`) must repeat exactly, the others (how often to log, evaluate and
checkpoint, where the data lives) may change between restarts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from typing import Any, Optional

from parity.core.config import ViTConfig
from parity.core.errors import UserError
from parity.data import augment as augmentation, datasets
from parity.data.augment import Augment

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
    # The recipe beside the schedule (`vit_jax.train.make_optimizer`, `Objective`); the defaults are the official one.
    optimizer: str = _run(default='sgd')
    weight_decay: float = _run(default=0.0)
    weight_decay_on: str = _run(default='kernels')
    b1: float = _run(default=0.9)
    b2: float = _run(default=0.999)
    grad_clip: float = _run(default=1.0)  # global norm; 0: no clipping
    loss: str = _run(default='softmax')
    label_smoothing: float = _run(default=0.0)
    head_bias_init: Optional[float] = _run(default=None)  # None: the model's zero init
    mixup: float = _run(default=0.0)
    augment: str = _run(default='')  # `parity.data.augment` spec, resolved (the dataset's default when not given)
    randaug: Optional[tuple[int, int]] = _run(default=None)  # (layers, magnitude)
    # Knowledge distillation: (absolute checkpoint path, config or None) per teacher.
    teachers: tuple[tuple[str, Optional[str]], ...] = _run(default=())
    distill: str = _run(default='soft')
    distill_alpha: float = _run(default=0.0)
    distill_temperature: float = _run(default=1.0)
    teacher_weights: tuple[float, ...] = _run(default=())  # normalised to sum to 1
    eval_every: int = 100  # 0: only at the end
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    data_dir: Optional[str] = None
    recipe: str = 'official'  # the preset the unset flags came from (`RECIPE_PRESETS`); the values above decide

    @property
    def augmentation(self) -> Augment:
        """The training augmentation these settings name."""
        randaug = None if self.randaug is None else f'{self.randaug[0]},{self.randaug[1]}'
        return augmentation.parse(self.augment, randaug, digits=self.dataset == datasets.DIGITS)

    def record(self) -> dict:
        """The settings as `run.json` holds them (the config in the official field layout), JSON values only."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d['config'] = dict(self.config.to_official_dict(), image_size=self.config.image_size)
        d['teachers'] = [{'checkpoint': path, 'config': config} for path, config in self.teachers]
        return json.loads(json.dumps(d))  # tuples as lists, as they come back from the file

    def differences(self, recorded: dict) -> list[str]:
        """The run-defining fields in which `recorded` (a run.json) differs from these settings.

        A field that an older run.json does not have counts as its default (the recipe
        fields arrived after the first runs were recorded).
        """
        mine = self.record()
        defaults = dict(DEFAULTS, augment=augmentation.parse(None, None, self.dataset == datasets.DIGITS).spec())
        return [k for k in RUN_FIELDS if recorded.get(k, defaults.get(k)) != mine[k]]


RUN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainSettings) if f.metadata.get('run'))
# The record of each default, for run.json files written before a field existed.
DEFAULTS = json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(TrainSettings)
                                  if f.default is not dataclasses.MISSING}))


def _augreg(mixup: float, randaug: tuple[int, int]) -> dict:
    """big_vision's AugReg recipe (`configs/vit_i21k.py`) at one of its augmentation levels."""
    return dict(optimizer='adam', lr=0.001, weight_decay=0.0001, grad_clip=1.0, loss='sigmoid',
                head_bias_init=lambda classes: -6.9 if classes == 1000 else -10.0, augment='crop,flip',
                randaug=f'{randaug[0]},{randaug[1]}', mixup=mixup)


# `--recipe NAME`: flag values in one word; a flag given beside it wins. Steps, warm-up and batch stay the
# dataset's unless the recipe is tied to one dataset and resolution (adamw-cifar).
RECIPE_PRESETS: dict[str, dict] = {
    'official': {},
    # The commonest "fine-tune a ViT on CIFAR-10" recipe: AdamW, smoothing, flips, rotations, colour jitter, 224 px,
    # ten epochs of batch 64.
    'adamw-cifar': dict(optimizer='adamw', lr=1e-4, weight_decay=1e-4, label_smoothing=0.1, batch_size=64,
                        accum_steps=1, image_size=224, steps=7813, warmup_steps=500,
                        augment='flip,rotate=15,jitter=0.4'),
    'augreg-light1': _augreg(0.0, (2, 0)),
    'augreg-light2': _augreg(0.2, (2, 10)),
    'augreg-medium1': _augreg(0.2, (2, 15)),
    'augreg-medium2': _augreg(0.5, (2, 15)),
    'augreg-strong1': _augreg(0.5, (2, 20)),
    'augreg-strong2': _augreg(0.8, (2, 20)),
    # DeiT (Touvron et al. 2021, table 9) with what this project has: AdamW at 5e-4 x batch / 512, weight decay
    # 0.05, smoothing 0.1, mixup 0.8, RandAugment (2, 9), stochastic depth 0.1 (no CutMix, repeated augmentation or
    # random erasing).
    'deit': dict(optimizer='adamw', lr=lambda batch: 5e-4 * batch / 512, weight_decay=0.05, label_smoothing=0.1,
                 mixup=0.8, augment='crop,flip', randaug='2,9', stochastic_depth=0.1),
}


def recipe_preset(name: Optional[str]) -> dict:
    """The flag values of `--recipe NAME` (None: `official`); an unknown name is one error line."""
    if (name or 'official') not in RECIPE_PRESETS:
        raise UserError(f'--recipe {name!r}: expected one of {", ".join(RECIPE_PRESETS)}')
    return RECIPE_PRESETS[name or 'official']


def apply_recipe(args, num_classes: int):
    """A copy of the parsed flags with `--recipe`'s values filled in where no flag was given."""
    preset = recipe_preset(args.recipe)
    out = argparse.Namespace(**vars(args))
    out.recipe = args.recipe or 'official'
    out.from_recipe = set()
    for flag, value in preset.items():
        if getattr(out, flag) is None and not callable(value):
            setattr(out, flag, value)
            out.from_recipe.add(flag)
    if getattr(out, 'head_bias_init') is None and callable(preset.get('head_bias_init')):
        out.head_bias_init = preset['head_bias_init'](num_classes)
    if out.lr is None and callable(preset.get('lr')):
        out.lr = preset['lr'](out.batch_size or RECIPES.get(args.dataset, DEFAULT_RECIPE).batch_size)
    return out


def resolve(args, cfg: ViTConfig) -> TrainSettings:
    """The settings of a `train` command line for model `cfg`: flags, else `--recipe`'s values (`args` is
    `apply_recipe`'s), else the dataset's defaults; checked. `cfg` is at its training resolution."""
    recipe = RECIPES.get(args.dataset, DEFAULT_RECIPE)
    cfg, fields = recipe_settings(args, cfg)
    pick = {name: getattr(args, name) if getattr(args, name) is not None else getattr(recipe, name)
            for name in ('steps', 'batch_size', 'accum_steps', 'lr', 'warmup_steps', 'eval_every')}
    s = TrainSettings(
        config=cfg, dataset=args.dataset, checkpoint=os.path.abspath(args.checkpoint) if args.checkpoint else None,
        image_size=cfg.image_size, schedule=args.schedule, dtype=args.dtype, seed=args.seed,
        checkpoint_every=args.checkpoint_every or pick['eval_every'] or pick['steps'],
        keep_checkpoints=args.keep_checkpoints, log_every=args.log_every, data_dir=args.data_dir, recipe=args.recipe or 'official',
        **pick, **fields)
    if s.warmup_steps < 0 or s.warmup_steps >= s.steps:
        raise UserError(f'--warmup-steps {s.warmup_steps} must be at least 0 and below --steps {s.steps}')
    if not s.lr > 0:  # NaN included
        raise UserError(f'--lr {s.lr}: must be positive')
    if s.batch_size % s.accum_steps:
        raise UserError(f'--batch-size {s.batch_size} is not divisible by --accum-steps {s.accum_steps}')
    return s


def _flag(name: str) -> str:
    return '--' + name.replace('_', '-')


def _in_range(args, name: str, low: float, high: float, high_open: bool = True) -> None:
    value = getattr(args, name)
    if value is None:
        return
    ok = math.isfinite(value) and low <= value and (value < high if high_open else value <= high)
    if not ok:
        raise UserError(f'{_flag(name)} {value}: must lie in [{low:g}, {high:g}{")" if high_open else "]"}')


def recipe_settings(args, cfg: ViTConfig) -> tuple[ViTConfig, dict]:
    """The model's regularisation (into `cfg`) and the optimizer, loss and distillation fields of a
    `train` command line, checked, each flag's default the official recipe's."""
    for name in ('dropout', 'attention_dropout', 'stochastic_depth', 'label_smoothing', 'b1', 'b2'):
        _in_range(args, name, 0, 1)
    _in_range(args, 'distill_alpha', 0, 1, high_open=False)
    for name in ('weight_decay', 'grad_clip', 'mixup'):
        _in_range(args, name, 0, math.inf)
    if args.head_bias_init is not None and not math.isfinite(args.head_bias_init):
        raise UserError(f'--head-bias-init {args.head_bias_init}: must be a finite number')
    optimizer = args.optimizer or 'sgd'
    if optimizer == 'sgd' and (args.b1 is not None or args.b2 is not None):
        raise UserError('--b1 and --b2 are Adam\'s moment decays; pass --optimizer adamw or adam, or drop them')
    cfg = cfg.replace(**{k: v for k, v in (('dropout_rate', args.dropout),
                                           ('attention_dropout_rate', args.attention_dropout),
                                           ('stochastic_depth_rate', args.stochastic_depth)) if v is not None})
    try:
        aug = augmentation.parse(args.augment, args.randaug, digits=args.dataset == datasets.DIGITS)
    except UserError as e:
        given = sorted(set(getattr(args, 'from_recipe', ())) & {'augment', 'randaug'})
        if not given:
            raise
        raise UserError(f'{e} (set by --recipe {args.recipe}; pass {" and ".join(_flag(g) for g in given)} '
                        'to override)') from None
    fields = dict(optimizer=optimizer, loss=args.loss or 'softmax', head_bias_init=args.head_bias_init,
                  augment=aug.spec(), randaug=aug.randaug,
                  **{k: getattr(args, k) for k in ('weight_decay', 'weight_decay_on', 'b1', 'b2', 'grad_clip',
                                                   'label_smoothing', 'mixup') if getattr(args, k) is not None})
    teachers = args.teacher or []
    configs = args.teacher_config or []
    distill_flags = [f for f in ('distill', 'distill_alpha', 'distill_temperature', 'teacher_weights',
                                 'teacher_config') if getattr(args, f) is not None]
    if cfg.has_dist_token and not (teachers and (args.distill_alpha is None or args.distill_alpha > 0)):
        raise UserError('the token_distilled classifier learns its distillation head from a teacher: pass --teacher '
                        'CKPT (and a --distill-alpha above 0), or train a token classifier')
    if not teachers:
        if distill_flags:
            raise UserError(f'{_flag(distill_flags[0])} sets up knowledge distillation, which needs a teacher: '
                            'pass --teacher CKPT (repeatable), or drop it')
        return cfg, fields
    if configs and len(configs) != len(teachers):
        raise UserError(f'{len(configs)} --teacher-config for {len(teachers)} --teacher: give none (each config '
                        'inferred from its file) or one per teacher, in the same order')
    if args.distill_temperature is not None and not (math.isfinite(args.distill_temperature)
                                                     and args.distill_temperature > 0):
        raise UserError(f'--distill-temperature {args.distill_temperature}: must be a finite number above 0')
    weights = [1.0] * len(teachers)
    if args.teacher_weights is not None:
        try:
            weights = [float(w) for w in args.teacher_weights.split(',')]
        except ValueError:
            raise UserError(f'--teacher-weights {args.teacher_weights!r}: expected numbers separated by commas, '
                            'one per teacher') from None
        if len(weights) != len(teachers):
            raise UserError(f'--teacher-weights {args.teacher_weights}: {len(weights)} weights for '
                            f'{len(teachers)} --teacher; give one per teacher, in the same order')
        if not all(math.isfinite(w) and w >= 0 for w in weights) or not sum(weights) > 0:
            raise UserError(f'--teacher-weights {args.teacher_weights}: weights must be 0 or more, '
                            'not all 0, and finite')
    total = sum(weights)
    fields.update(
        teachers=tuple((os.path.abspath(t), _absolute_config(c)) for t, c in
                       zip(teachers, configs or [None] * len(teachers))),
        distill=args.distill or 'soft',
        distill_alpha=0.5 if args.distill_alpha is None else args.distill_alpha,  # DeiT's
        distill_temperature=args.distill_temperature or 1.0,
        teacher_weights=tuple(w / total for w in weights))
    return cfg, fields


def _absolute_config(spec: Optional[str]) -> Optional[str]:
    """A config JSON path made absolute (the run must find it again from elsewhere); names stay names."""
    return os.path.abspath(spec) if spec is not None and os.path.exists(spec) else spec

"""The settings of one training run, each declared once: `FLAGS`, and the frozen `TrainSettings` they resolve into.

Every `train` flag is one `Flag` in `FLAGS`: its type, the value it takes when not given,
its range, its help. From that table come the `train` parser (`add_flags`), the range
checks (`check_ranges`), the flag names `sweep` checks its grid against (`flag_names`),
the values `--recipe` presets may set (`RECIPE_PRESETS`, checked against the ranges) and
the flags `parity grad` shares with `train` (the same declarations, so the two accept the
same values). A flag given wins over `--recipe`'s value, which wins over the dataset's
default (`RECIPES`), which wins over the declared one.

`run.json` in the workdir is written from the settings (`TrainSettings.record`), and a
restart is checked against it: the fields that decide what the run computes (`RUN_FIELDS`)
must repeat exactly, the others (how often to log, evaluate and checkpoint, where the data
lives) may change between restarts. Adding a training flag: one `Flag` here (and, when the run
keeps its value, a `TrainSettings` field of the same name, which `resolve` fills by itself), and
the code of its effect.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from typing import Any, Callable, Iterable, Optional, Sequence

from parity import cli
from parity.cli import remote
from parity.core import files
from parity.core.config import NUMERICS_MODES, REMAT_MODES, ViTConfig, big_vision_remat
from parity.core.errors import UserError
from parity.data import augment as augmentation, datasets, folders
from parity.data.augment import Augment

DIGITS_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'digits.json')
OPTIMIZERS = ('sgd', 'adamw', 'adam')
SCHEDULES = ('cosine', 'linear', 'constant')


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


# --------------------------------------------------------------------------- the declarations

@dataclasses.dataclass(frozen=True)
class Range:
    """The values a number may take, [low, high] with either end open; `says` words the error instead of
    the interval where that reads better (a count `must be positive`)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    says: Optional[str] = None

    def holds(self, value: float) -> bool:
        return (math.isfinite(value) and (value > self.low if self.low_open else value >= self.low)
                and (value < self.high if self.high_open else value <= self.high))

    def requirement(self) -> str:
        """What the error says of a value outside: `must lie in [0, 1)`."""
        return self.says or (f'must lie in {"(" if self.low_open else "["}{self.low:g}, {self.high:g}'
                             f'{")" if self.high_open else "]"}')


@dataclasses.dataclass(frozen=True)
class Flag:
    """One flag of `train`: how it parses, the value it takes when not given, its range and its help.

    `default` None means no value of its own (the dataset's, the config's, `--recipe`'s, or none).
    The parser's own default is always None, so that a flag given can be told from one not given.
    """

    help: str
    type: Optional[Callable] = None  # argparse's: int, float, or a checking parser; None: the text
    default: Any = None
    range: Optional[Range] = None
    metavar: Optional[str] = None
    choices: Optional[tuple] = None
    group: Optional[str] = None  # a key of GROUPS; None: the parser's own
    repeat: bool = False  # action='append': one value per use
    required: bool = False
    switch: bool = False  # takes no value: True when given (action='store_true'), None when not

    @staticmethod
    def option(name: str) -> str:
        """The flag of field `name`: `--label-smoothing` for label_smoothing."""
        return '--' + name.replace('_', '-')


GROUPS = {
    'data': 'your own images (--dataset PATH)',
    'recipe': 'recipe (each default is the official fine-tuning recipe\'s)',
    'distill': 'knowledge distillation (DeiT)',
}
POSITIVE = Range(1, says='must be positive')
UNIT = Range(0, 1, high_open=True)  # [0, 1)
NONNEGATIVE = Range(0, high_open=True)  # [0, inf)


def _augreg(mixup: float, randaug: tuple[int, int]) -> dict:
    """big_vision's AugReg recipe (`configs/vit_i21k.py`) at one of its augmentation levels."""
    return dict(optimizer='adam', lr=0.001, weight_decay=0.0001, grad_clip=1.0, loss='sigmoid',
                head_bias_init=lambda classes: -6.9 if classes == 1000 else -10.0, augment='crop,flip',
                randaug=f'{randaug[0]},{randaug[1]}', mixup=mixup)


# `--recipe NAME`: flag values in one word; a flag given beside it wins. Steps, warm-up and batch stay the
# dataset's unless the recipe is tied to one dataset and resolution (adamw-cifar). Every key is a flag of
# `FLAGS`, every value within its range (`apply_recipe` checks what it sets).
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

# Every flag of `python -m vit_jax train`, in the order of its --help. The defaults are the official
# fine-tuning recipe's; the per-dataset ones (steps, batch, rate, ...) are `RECIPES`'.
FLAGS: dict[str, Flag] = {
    'config': Flag('official config name or JSON file (default: inferred from --checkpoint; for digits '
                   'vit_jax/configs/digits.json)', metavar='NAME_OR_JSON'),
    'dataset': Flag(folders.DATASET_HELP, metavar='NAME_OR_PATH', required=True),
    'train_split': Flag(folders.TRAIN_SPLIT_HELP, metavar='NAME', group='data'),
    'test_split': Flag(folders.TEST_SPLIT_HELP, metavar='NAME', group='data'),
    'val_fraction': Flag(folders.VAL_FRACTION_HELP, float,
                         range=Range(0, 1, low_open=True, high_open=True, says='must lie in (0, 1)'), metavar='F',
                         group='data'),
    'skip_bad_images': Flag(folders.SKIP_BAD_IMAGES_HELP, default=False, switch=True, group='data'),
    'workdir': Flag('metrics, checkpoints, final.npz, config.json', metavar='DIR', required=True),
    'checkpoint': Flag('fine-tune from this checkpoint, a path or a name of `models` (position embeddings resized, '
                       'head re-initialised)',
                       metavar='PRETRAINED.npz'),
    # Not a setting of the run: where its files come from (`parity.cli.remote`; VIT_MIRROR_OFFLINE=1 alike).
    'offline': Flag(remote.OFFLINE_HELP, default=False, switch=True),
    'numerics': Flag("the GELU and LayerNorm eps of --checkpoint and --teacher: source, what each file's library "
                     "runs it with (timm: erf GELU; a Hugging Face folder: its config.json's), or official, Google's "
                     "(tanh GELU, eps 1e-6); the trained model keeps them", default='source', choices=NUMERICS_MODES),
    'image_size': Flag('training resolution (default: 384; digits 8)', int, range=POSITIVE, metavar='N'),
    'steps': Flag('optimizer updates', int, range=POSITIVE, metavar='N'),
    'batch_size': Flag('global batch (all devices and processes)', int, range=POSITIVE, metavar='N'),
    'accum_steps': Flag('microbatches per update (gradient accumulation)', int, range=POSITIVE, metavar='N'),
    'lr': Flag('peak learning rate', cli.positive_float, range=Range(0, low_open=True, says='must be positive'),
               metavar='F'),
    'warmup_steps': Flag('linear warm-up steps', int, metavar='N'),  # at least 0 and below --steps: `resolve`
    'schedule': Flag('decay after warm-up', default='cosine', choices=SCHEDULES),
    'dtype': Flag('compute dtype (parameters and optimizer state stay float32)', default='float32',
                  choices=('float32', 'bfloat16')),
    'recipe': Flag(f'set the flags below in one word: {", ".join(RECIPE_PRESETS)} (flags given beside it win; '
                   'README, "Training recipes")', metavar='NAME', group='recipe'),
    'optimizer': Flag('sgd (momentum 0.9; default), adamw (optax AdamW, eps 1e-8), adam (big_vision: '
                      'scale_by_adam, then the weight decay)', default='sgd', choices=OPTIMIZERS, group='recipe'),
    'weight_decay': Flag('decoupled: the update adds -lr * F * param (default 0)', float, 0.0, NONNEGATIVE,
                         metavar='F', group='recipe'),
    'weight_decay_on': Flag('kernels (default: not biases, norms, class token, position embeddings) or all',
                            default='kernels', choices=('kernels', 'all'), group='recipe'),
    'b1': Flag('Adam first-moment decay (default 0.9)', float, 0.9, UNIT, metavar='F', group='recipe'),
    'b2': Flag('Adam second-moment decay (default 0.999)', float, 0.999, UNIT, metavar='F', group='recipe'),
    'grad_clip': Flag('clip gradients to this global norm (default 1.0; 0: no clipping)', float, 1.0, NONNEGATIVE,
                      metavar='F', group='recipe'),
    'loss': Flag('softmax cross-entropy (default) or sigmoid cross-entropy summed over classes (AugReg)',
                 default='softmax', choices=('softmax', 'sigmoid'), group='recipe'),
    'label_smoothing': Flag('targets (1 - F) onehot + F / C (default 0)', float, 0.0, UNIT, metavar='F',
                            group='recipe'),
    'head_bias_init': Flag('start the head bias here (AugReg: -10, or -6.9 for 1000 classes; default 0)', float,
                           range=Range(says='must be a finite number'), metavar='F', group='recipe'),
    'mixup': Flag('big_vision\'s mixup: lambda ~ Beta(ALPHA, ALPHA) per batch, max(lambda, 1 - lambda), the batch '
                  'rolled by one (default 0: off)', float, 0.0, NONNEGATIVE, metavar='ALPHA', group='recipe'),
    'augment': Flag('training transforms: crop, flip, rotate=DEGREES, jitter=F (or B:C:S:H), shift=PIXELS '
                    '(digits), none (default: crop,flip; digits shift=1)', metavar='T1,T2,...', group='recipe'),
    'randaug': Flag('big_vision\'s RandAugment: N operations at magnitude M (0..30)', metavar='N,M',
                    group='recipe'),
    'dropout': Flag('dropout rate (default: the config\'s)', float, range=UNIT, metavar='F', group='recipe'),
    'attention_dropout': Flag('dropout on the attention weights (default: the config\'s)', float, range=UNIT,
                              metavar='F', group='recipe'),
    'stochastic_depth': Flag('drop-path rate of the last block, rising linearly from 0 at the first (default 0)',
                             float, range=UNIT, metavar='F', group='recipe'),
    'teacher': Flag('a frozen teacher, any checkpoint the project reads; repeat for several', metavar='CKPT',
                    group='distill', repeat=True),
    'teacher_config': Flag('the config of each --teacher, in the same order (default: inferred from its file)',
                           metavar='NAME_OR_JSON', group='distill', repeat=True),
    'distill': Flag('soft: T^2 KL(softmax(t/T) || softmax(s/T)) (default); hard: cross-entropy on argmax t',
                    default='soft', choices=('soft', 'hard'), group='distill'),
    'distill_alpha': Flag('loss = (1 - F) * loss on the labels + F * distillation (default 0.5; 0: teachers unused)',
                          float, 0.5, Range(0, 1), metavar='F', group='distill'),  # DeiT's
    'distill_temperature': Flag('soft distillation temperature (default 1)', float, 1.0,
                                Range(0, low_open=True, high_open=True, says='must be a finite number above 0'),
                                metavar='T', group='distill'),
    'teacher_weights': Flag('how the distillation term is split between teachers (default equal; normalised)',
                            metavar='W1,W2,...', group='distill'),
    'remat': Flag('recompute each encoder block in the backward pass, for memory: block keeps only its input, dots '
                  'also its dense layers\' outputs (default: a big_vision --config\'s remat_policy, else none)',
                  choices=REMAT_MODES),
    'eval_every': Flag('evaluate on the test split every N steps (0: only at the end)', int,
                       range=Range(0, says='must be 0 (only at the end) or more'), metavar='N'),
    'seed': Flag('initialisation, data order, augmentation, dropout', cli.seed_int, 0, metavar='N'),
    'checkpoint_every': Flag('write a checkpoint every N steps (default: --eval-every)', int, range=POSITIVE,
                             metavar='N'),
    'keep_checkpoints': Flag('newest checkpoints kept (default 3)', int, 3, POSITIVE, metavar='N'),
    'log_every': Flag('metrics line every N steps (default 10)', int, 10, POSITIVE, metavar='N'),
    'data_dir': Flag('tensorflow-datasets data directory', metavar='DIR'),
    # An output place like --workdir, not a setting: a profiled run is the same run (not in run.json).
    'profile': Flag('write a jax.profiler trace of 3 steps after the first (compiling) one to DIR (process 0; '
                    'open it in TensorBoard\'s profile plugin or Perfetto)', metavar='DIR'),
    'coordinator': Flag('multi-host: address of process 0 (or JAX_COORDINATOR_ADDRESS)', metavar='HOST:PORT'),
    'num_processes': Flag('multi-host: number of processes (or JAX_NUM_PROCESSES)', int, metavar='N'),
    'process_id': Flag('multi-host: this process, 0..N-1 (or JAX_PROCESS_ID)', int, metavar='I'),
}


def add_flags(parser: argparse.ArgumentParser, names: Optional[Iterable[str]] = None) -> None:
    """The declared flags `names` (default: all of `train`'s), in `FLAGS`' order, into `parser` and its groups."""
    wanted = set(FLAGS if names is None else names)
    groups: dict[str, Any] = {}
    for name, flag in FLAGS.items():
        if name not in wanted:
            continue
        where = parser if flag.group is None else groups.get(flag.group)
        if where is None:
            where = groups[flag.group] = parser.add_argument_group(GROUPS[flag.group])
        if flag.switch:
            where.add_argument(Flag.option(name), action='store_true', default=None, help=flag.help)
            continue
        kw = dict(help=flag.help, metavar=flag.metavar, choices=flag.choices, required=flag.required)
        if flag.type is not None:
            kw['type'] = flag.type
        where.add_argument(Flag.option(name), action='append' if flag.repeat else 'store', **kw)


def flag_names() -> tuple[frozenset, frozenset]:
    """The long flags `train` takes, without their dashes, and those of them that repeat."""
    return (frozenset(Flag.option(n)[2:] for n in FLAGS),
            frozenset(Flag.option(n)[2:] for n, f in FLAGS.items() if f.repeat))


def check_ranges(values: Any, names: Optional[Iterable[str]] = None) -> None:
    """Each declared flag in `names` (default: all) that `values` (parsed flags, or settings) holds, within its
    range: else one `UserError` naming the flag, its value and the range."""
    wanted = set(FLAGS if names is None else names)
    for name, flag in FLAGS.items():
        value = getattr(values, name, None)
        if name in wanted and flag.range is not None and value is not None and not flag.range.holds(value):
            raise UserError(f'{Flag.option(name)} {value}: {flag.range.requirement()}')


def given(args, name: str) -> Any:
    """The flag's value if it was given (or set by `--recipe`), else its declared default."""
    value = getattr(args, name)
    return FLAGS[name].default if value is None else value


# --------------------------------------------------------------------------- the settings

def _run(flag: Optional[str] = None, **kw) -> Any:
    """A field that decides what the run computes: a restart must repeat it exactly. With `flag`, its
    default is that flag's declared one."""
    if flag is not None:
        kw['default'] = FLAGS[flag].default
    return dataclasses.field(metadata={'run': True}, **kw)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Every setting of one training run, defaults filled in and checked (`resolve`).

    Built directly (the library's tests, `parity grad`), the fields left out take the declared
    defaults, and the per-dataset ones `DEFAULT_RECIPE`'s.
    """

    config: Optional[ViTConfig] = _run(default=None)  # the model trained, at its training resolution and classes
    dataset: Optional[str] = _run(default=None)  # a name, or the absolute path of an image folder or list
    # An image folder's splits (`parity.data.folders`); None for other datasets, and for a folder's defaults.
    train_split: Optional[str] = _run('train_split')
    test_split: Optional[str] = _run('test_split')
    val_fraction: Optional[float] = _run('val_fraction')
    checkpoint: Optional[str] = _run('checkpoint')  # the absolute path fine-tuned from, or None (from scratch)
    numerics: str = _run('numerics')  # the checkpoints' (`NUMERICS_MODES`); the trained model's are in `config`
    image_size: Optional[int] = _run('image_size')
    steps: int = _run(default=DEFAULT_RECIPE.steps)
    batch_size: int = _run(default=DEFAULT_RECIPE.batch_size)  # global, over every device and process
    accum_steps: int = _run(default=DEFAULT_RECIPE.accum_steps)
    lr: float = _run(default=DEFAULT_RECIPE.lr)
    warmup_steps: int = _run(default=DEFAULT_RECIPE.warmup_steps)
    schedule: str = _run('schedule')
    dtype: str = _run('dtype')
    seed: int = _run('seed')
    # The recipe beside the schedule (`vit_jax.objective`: `make_optimizer`, `Objective`).
    optimizer: str = _run('optimizer')
    weight_decay: float = _run('weight_decay')
    weight_decay_on: str = _run('weight_decay_on')
    b1: float = _run('b1')
    b2: float = _run('b2')
    grad_clip: float = _run('grad_clip')  # global norm; 0: no clipping
    loss: str = _run('loss')
    label_smoothing: float = _run('label_smoothing')
    head_bias_init: Optional[float] = _run('head_bias_init')  # None: the model's zero init
    mixup: float = _run('mixup')
    augment: str = _run(default='')  # `parity.data.augment` spec, resolved (the dataset's default when not given)
    randaug: Optional[tuple[int, int]] = _run(default=None)  # (layers, magnitude)
    # Knowledge distillation: (absolute checkpoint path, config or None) per teacher.
    teachers: tuple[tuple[str, Optional[str]], ...] = _run(default=())
    distill: str = _run('distill')
    distill_alpha: float = _run(default=0.0)  # with no teacher nothing is distilled; with one, the flag's 0.5
    distill_temperature: float = _run('distill_temperature')
    teacher_weights: tuple[float, ...] = _run(default=())  # normalised to sum to 1
    eval_every: int = DEFAULT_RECIPE.eval_every  # 0: only at the end
    checkpoint_every: int = 100
    keep_checkpoints: int = FLAGS['keep_checkpoints'].default
    log_every: int = FLAGS['log_every'].default
    data_dir: Optional[str] = None
    skip_bad_images: bool = False  # not a run field: the files it leaves out are in DIR/skipped.txt
    # The classes in logit order, as the dataset names them (DIR/labels.txt); None when it names none. Checked
    # on a restart by `train_cli` itself, to name the classes added and missing.
    class_names: Optional[tuple[str, ...]] = None
    # Not a run field: the same gradients either way, so a restart may change it (to fit, say).
    remat: str = 'none'  # `--remat`, else the big_vision config's remat_policy (`big_vision_remat`)
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
        return files.record_differences(recorded, mine, RUN_FIELDS, defaults)


RUN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainSettings) if f.metadata.get('run'))
# The record of each default, for run.json files written before a field existed.
DEFAULTS = json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(TrainSettings)}))

# The settings that are their flag's value as given, else the flag's declared default: a new flag the run keeps
# is one `Flag` and a field of the same name, and lands here by itself. The others are worked out in `resolve`.
DIRECT = tuple(f.name for f in dataclasses.fields(TrainSettings) if f.name in FLAGS and f.name not in {
    'config', 'dataset', 'checkpoint', 'image_size', 'checkpoint_every', 'recipe', 'remat', 'augment', 'randaug',
    'teacher_weights', 'distill_alpha', *(r.name for r in dataclasses.fields(Recipe))})


# --------------------------------------------------------------------------- resolving a command line

def recipe_preset(name: Optional[str]) -> dict:
    """The flag values of `--recipe NAME` (None: `official`); an unknown name is one error line."""
    if (name or 'official') not in RECIPE_PRESETS:
        raise UserError(f'--recipe {name!r}: expected one of {", ".join(RECIPE_PRESETS)}')
    return RECIPE_PRESETS[name or 'official']


def apply_recipe(args, num_classes: int):
    """A copy of the parsed flags with `--recipe`'s values filled in where no flag was given, each checked
    against its declared range."""
    preset = recipe_preset(args.recipe)
    out = argparse.Namespace(**vars(args))
    out.recipe = args.recipe or 'official'
    out.from_recipe = set()
    for flag, value in preset.items():
        if getattr(out, flag) is None and not callable(value):
            setattr(out, flag, value)
            out.from_recipe.add(flag)
    if out.head_bias_init is None and callable(preset.get('head_bias_init')):
        out.head_bias_init = preset['head_bias_init'](num_classes)
    if out.lr is None and callable(preset.get('lr')):
        out.lr = preset['lr'](out.batch_size or RECIPES.get(args.dataset, DEFAULT_RECIPE).batch_size)
    check_ranges(out, preset)
    return out


def resolve(args, cfg: ViTConfig) -> TrainSettings:
    """The settings of a `train` command line for model `cfg`: flags, else `--recipe`'s values (`args` is
    `apply_recipe`'s), else the dataset's defaults, else the declared ones; their combinations checked
    (each value's range is checked once, before: the flags' by `check_ranges`, the recipe's by
    `apply_recipe`). `cfg` is at its training resolution."""
    recipe = RECIPES.get(args.dataset, DEFAULT_RECIPE)
    cfg, fields = recipe_settings(args, cfg)
    pick = {f.name: getattr(args, f.name) if getattr(args, f.name) is not None else getattr(recipe, f.name)
            for f in dataclasses.fields(Recipe)}
    s = TrainSettings(
        config=cfg, dataset=dataset_record(args.dataset), checkpoint=remote.absolute(args.checkpoint),
        image_size=cfg.image_size, checkpoint_every=args.checkpoint_every or pick['eval_every'] or pick['steps'],
        recipe=args.recipe or 'official',
        remat=args.remat or (big_vision_remat(args.config) if args.config else None) or 'none',
        **{name: given(args, name) for name in DIRECT}, **pick, **fields)
    if s.warmup_steps < 0 or s.warmup_steps >= s.steps:
        raise UserError(f'--warmup-steps {s.warmup_steps} must be at least 0 and below --steps {s.steps}')
    if s.batch_size % s.accum_steps:
        raise UserError(f'--batch-size {s.batch_size} is not divisible by --accum-steps {s.accum_steps}')
    return s


def dataset_record(name: str) -> str:
    """`--dataset` as run.json keeps it: an image folder or list by its absolute path (a restart from another
    directory is the same run), a dataset name as given."""
    return os.path.abspath(name) if folders.is_folder_dataset(name) else name


def recipe_settings(args, cfg: ViTConfig) -> tuple[ViTConfig, dict]:
    """The model's regularisation (into `cfg`) and the optimizer, loss and distillation fields of a
    `train` command line (their ranges checked by `check_ranges`), checked together."""
    optimizer = given(args, 'optimizer')
    if optimizer == 'sgd' and (args.b1 is not None or args.b2 is not None):
        raise UserError('--b1 and --b2 are Adam\'s moment decays; pass --optimizer adamw or adam, or drop them')
    cfg = cfg.replace(**{k: v for k, v in (('dropout_rate', args.dropout),
                                           ('attention_dropout_rate', args.attention_dropout),
                                           ('stochastic_depth_rate', args.stochastic_depth)) if v is not None})
    try:
        aug = augmentation.parse(args.augment, args.randaug, digits=args.dataset == datasets.DIGITS)
    except UserError as e:
        from_recipe = sorted(set(getattr(args, 'from_recipe', ())) & {'augment', 'randaug'})
        if not from_recipe:
            raise
        raise UserError(f'{e} (set by --recipe {args.recipe}; pass '
                        f'{" and ".join(Flag.option(g) for g in from_recipe)} to override)') from None
    fields = dict(augment=aug.spec(), randaug=aug.randaug)
    teachers = args.teacher or []
    distill_flags = [f for f in ('distill', 'distill_alpha', 'distill_temperature', 'teacher_weights',
                                 'teacher_config') if getattr(args, f) is not None]
    if cfg.has_dist_token and not (teachers and given(args, 'distill_alpha') > 0):
        raise UserError('the token_distilled classifier learns its distillation head from a teacher: pass --teacher '
                        'CKPT (and a --distill-alpha above 0), or train a token classifier')
    if not teachers:
        if distill_flags:
            raise UserError(f'{Flag.option(distill_flags[0])} sets up knowledge distillation, which needs a teacher: '
                            'pass --teacher CKPT (repeatable), or drop it')
        return cfg, fields
    fields.update(teachers=teacher_specs(teachers, args.teacher_config or []),
                  teacher_weights=teacher_weights(args.teacher_weights, len(teachers)),
                  distill_alpha=given(args, 'distill_alpha'))
    return cfg, fields


def teacher_specs(teachers: Sequence[str], configs: Sequence[str]) -> tuple[tuple[str, Optional[str]], ...]:
    """(absolute path, config) per `--teacher`; `--teacher-config` is given for none of them or for each, in order."""
    if configs and len(configs) != len(teachers):
        raise UserError(f'{len(configs)} --teacher-config for {len(teachers)} --teacher: give none (each config '
                        'inferred from its file) or one per teacher, in the same order')
    return tuple((remote.absolute(t), _absolute_config(c)) for t, c in zip(teachers, configs or [None] * len(teachers)))


def teacher_weights(spec: Optional[str], teachers: int) -> tuple[float, ...]:
    """`--teacher-weights W1,W2,...` (None: equal) normalised to sum to 1, one per teacher."""
    weights = [1.0] * teachers
    if spec is not None:
        try:
            weights = [float(w) for w in spec.split(',')]
        except ValueError:
            raise UserError(f'--teacher-weights {spec!r}: expected numbers separated by commas, '
                            'one per teacher') from None
        if len(weights) != teachers:
            raise UserError(f'--teacher-weights {spec}: {len(weights)} weights for {teachers} --teacher; give one '
                            'per teacher, in the same order')
        if not all(math.isfinite(w) and w >= 0 for w in weights) or not sum(weights) > 0:
            raise UserError(f'--teacher-weights {spec}: weights must be 0 or more, not all 0, and finite')
    total = sum(weights)
    return tuple(w / total for w in weights)


def _absolute_config(spec: Optional[str]) -> Optional[str]:
    """A config JSON path made absolute (the run must find it again from elsewhere); names stay names."""
    return os.path.abspath(spec) if spec is not None and os.path.exists(spec) else spec

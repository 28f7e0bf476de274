"""`python -m vit_jax train ...`: the command line, the workdir and the run loop.

The pieces it runs are the library's (`vit_jax.train`: state and steps; `vit_jax.objective`:
optimizer and loss; `vit_jax.checkpoint`: checkpoints); the settings are resolved once into
`vit_jax.settings.TrainSettings`.
The workdir gets metrics.jsonl, run.json (the settings), checkpoints/ (atomic, newest
kept), and at the end final.npz (released layout) and config.json (official layout);
running the same command again resumes from the last checkpoint, data order and random
state included, and ends with bit-identical parameters.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from parity import cli
from parity.cli import remote
from parity.core import files, limits, weights
from parity.core.config import ViTConfig, load_config
from parity.core.errors import UserError
from parity.core.lock import WorkdirLock, describe_holder
from parity.core.weights import configs
from parity.data import class_names, datasets, folders
from vit_jax import checkpoint, objective, runtime, settings, train
from vit_jax.settings import TrainSettings

RUN_JSON = 'run.json'
METRICS = 'metrics.jsonl'
SKIPPED = 'skipped.txt'  # with --skip-bad-images: each file left out, `PATH<TAB>REASON`
PROFILE_STEPS = 3  # traced after the first (compiling) step: enough to see a steady step and the gaps between


# --------------------------------------------------------------------------- the command line

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='python -m vit_jax train', description=main.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='defaults: the official fine-tuning recipe (SGD momentum 0.9, clip 1.0, no weight decay, warm-up '
               'then cosine; batch 512, accumulation 8, lr 0.03; 10k steps on cifar10/100, 20k on imagenet2012, '
               '500 elsewhere; crop 384). --dataset digits trains a small ViT from scratch '
               '(vit_jax/configs/digits.json at 8x8; 1000 steps of 128, lr 0.1, warm-up 50, no accumulation).')
    settings.add_flags(p)
    return p


def _refuse(message: str):
    raise UserError(message)


def check_flags(argv: Sequence[str]) -> None:
    """What `train` refuses in these flags before it reads any data: the flags themselves, their values
    and combinations (`settings.resolve`'s checks), and the files they name. One `UserError` for the
    first problem; `sweep` checks every cell of a grid with it before the first run starts."""
    p = _parser()
    p.error = _refuse  # one error line, not argparse's usage and exit
    args = p.parse_args(list(argv))
    settings.check_ranges(args)
    for flag, path in [('--checkpoint', args.checkpoint), *(('--teacher', t) for t in args.teacher or ())]:
        if path is not None and not os.path.exists(path) and not remote.is_remote(path):
            raise UserError(f'{flag} {path}: no such file')
    if folders.is_folder_dataset(args.dataset) and not os.path.exists(args.dataset):
        raise UserError(f'--dataset {args.dataset}: no such folder or file')
    cfg = load_config(args.config or settings.DIGITS_CONFIG)
    # The model and the dataset are not read here: a stand-in class count, the config at its own size.
    settings.resolve(settings.apply_recipe(args, num_classes=cfg.num_classes or 10), cfg)


def init_distributed(coordinator: Optional[str], num_processes: Optional[int], process_id: Optional[int]) -> None:
    """`jax.distributed.initialize` from the flags or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.

    Nothing set means one process. Values left unset are auto-detected by JAX on the
    clusters it knows (SLURM, Open MPI, ...). On CPU, collectives go through gloo.
    """
    env = os.environ
    coordinator = coordinator or env.get('JAX_COORDINATOR_ADDRESS')
    if num_processes is None and env.get('JAX_NUM_PROCESSES'):
        num_processes = int(env['JAX_NUM_PROCESSES'])
    if process_id is None and env.get('JAX_PROCESS_ID'):
        process_id = int(env['JAX_PROCESS_ID'])
    if coordinator is None and num_processes is None and process_id is None:
        return
    if num_processes is not None and not (num_processes >= 1 and process_id is not None
                                          and 0 <= process_id < num_processes):
        raise UserError(f'--process-id {process_id} with --num-processes {num_processes}: '
                        'each process needs its own id in 0..N-1')
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    except (ValueError, RuntimeError) as e:
        raise UserError(f'cannot join the distributed run at {coordinator} ({str(e).splitlines()[0][:160]}); '
                        'check --coordinator HOST:PORT, --num-processes and --process-id') from None


def load_dataset(args) -> datasets.Dataset:
    """`--dataset` with the image-folder flags (`--train-split`, `--test-split`, `--val-fraction`,
    `--skip-bad-images`)."""
    return datasets.load(args.dataset, args.data_dir, train_split=args.train_split, test_split=args.test_split,
                         val_fraction=args.val_fraction, skip_bad_images=bool(args.skip_bad_images))


def _model(args, dataset: datasets.Dataset, image_size: int) -> tuple[ViTConfig, Optional[dict]]:
    """The config to train, and the fine-tuning params (None: initialise from scratch)."""
    if args.checkpoint is None:
        spec = args.config or (settings.DIGITS_CONFIG if dataset.name == datasets.DIGITS else None)
        if spec is None:
            raise UserError(f'--dataset {dataset.name}: pass --config (an official name or JSON) or --checkpoint '
                            'to fine-tune; only digits has a default model')
        cfg = load_config(spec)
        return cfg.replace(num_classes=dataset.num_classes, image_size=image_size), None
    ckpt = weights.load(remote.resolve(args.checkpoint))
    for note in ckpt.notes:
        cli.say(note)
    # A plain ViT fine-tuned into DeiT's distilled model: read the file as what it is, the surgery adds the token.
    grows = bool(args.config) and load_config(args.config).has_dist_token and 'dist_token' not in ckpt.shapes
    # The checkpoint's own config: the trunk as --config says, its head as the file has it.
    own = configs.with_checkpoint_head(weights.configure(ckpt, None if grows else args.config, fallback_size=image_size,
                                                         numerics=settings.given(args, 'numerics')), ckpt.shapes)
    if grows and not (own.classifier == 'token' and own.same_architecture(load_config(args.config).replace(
            classifier='token'))):
        raise UserError(f'--checkpoint {args.checkpoint}: a token_distilled --config grows a distillation token '
                        f'from a class token, and this checkpoint is {cli.describe_config(own)}, another architecture; '
                        'pass a checkpoint of the same trunk with a class token')
    # Fine-tuning drops the representation layer unless the config asks for one, as the official code does;
    # the model keeps the numerics it computed with.
    cfg = load_config(args.config).with_numerics(own.numerics) if args.config else own.replace(representation_size=None)
    cfg = cfg.replace(num_classes=dataset.num_classes, image_size=image_size)
    if isinstance(dataset, folders.Folder) and ckpt.labels and dataset.class_names \
            and own.num_classes == cfg.num_classes and tuple(ckpt.labels) != tuple(dataset.class_names):
        # The head is kept when the class count matches: its logits must still mean your folder's classes. (A
        # library's names for a published dataset's classes, id2label against tfds' synset ids, are not compared.)
        raise UserError(f'--checkpoint {args.checkpoint} was trained on other classes than --dataset '
                        f'{args.dataset}: {class_names.change(ckpt.labels, dataset.class_names)}; make the dataset\'s '
                        'classes match, or fine-tune a checkpoint without its head')
    cfg.grid_for(image_size)
    # Before the surgery allocates position embeddings for the new grid: one image must fit at all.
    limits.check_compute(limits.training_bytes(cfg, 1), f'training {cli.describe_config(cfg)}')
    return cfg, weights.prepare_for_finetuning(ckpt.params(own), cfg, args.checkpoint)


# --------------------------------------------------------------------------- the workdir and the machine

def check_memory(s: TrainSettings, devices: int, procs: int, teachers: Sequence[ViTConfig] = ()) -> None:
    """Refuses a batch and resolution that cannot fit, before any data is read or anything compiled.

    Each device holds its microbatch's activations and the parameters, gradients and optimizer
    state; the host holds this process's share of the batch twice (the one training, the next
    one loading). On CPU the devices are the host, so both count against its memory.
    """
    cfg, B, A, S = s.config, s.batch_size, s.accum_steps, s.image_size
    state = (5 if s.optimizer != 'sgd' else 4) * 4 * weights.count_params(cfg)  # + gradients, moments, accumulation
    # Teachers run forward only, on the same microbatch: their weights and one inference each.
    state += sum(4 * weights.count_params(t) + limits.inference_bytes(t, max(B // devices // A, 1)) for t in teachers)
    local = B // procs
    host = 2 * 4 * local * S * S * 3
    what = f'training {cli.describe_config(cfg)} with --batch-size {B}' + (f' in {A} microbatches' if A > 1 else '')
    device_bytes, where = runtime.device_memory()
    if device_bytes is None:  # CPU: every local device's share lives in host memory
        activations = limits.training_bytes(cfg, local // A, remat=s.remat)
        limits.check_compute(host + activations + state * (devices // procs), what)
        return
    limits.check_compute(host, f'{what} (the host\'s copy of each batch)')
    limits.check_compute(limits.training_bytes(cfg, B // devices // A, remat=s.remat) + state, f'{what} (per device)',
                         device_bytes, f'one {where}')


def _check_workdir(workdir: str, flag: str = '--workdir') -> None:
    """A directory that is or can be made writable; created only once every other check has passed."""
    path = os.path.abspath(workdir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise UserError(f'{flag} {workdir}: {path} exists and is not a directory; pick another path')
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f'{flag} {workdir}: {path} is not writable; pick a writable path')


def _check_resume(workdir: str, s: TrainSettings) -> None:
    """A workdir with a run in it must hold this run: DIR/run.json repeats the settings (nothing is written here)."""
    path = os.path.join(workdir, RUN_JSON)
    if os.path.exists(path):
        theirs = files.read_json_object(path, f'--workdir {workdir}: {RUN_JSON}', 'the record of a run',
                                        'use a new --workdir')
        recorded = theirs.get('class_names')
        if isinstance(recorded, list) and s.class_names is not None and tuple(recorded) != s.class_names:
            raise UserError(f'--workdir {workdir} holds a run trained on other classes: '
                            f'{class_names.change(recorded, s.class_names)}; restore the dataset\'s classes to '
                            'resume it, or use a new --workdir')
        differ = s.differences(theirs)
        if differ:
            raise UserError(f'--workdir {workdir} holds a run with other settings ({", ".join(differ)}: '
                            f'{", ".join(f"{theirs.get(k)!r} there" for k in differ[:2])}); '
                            'repeat that command to resume it, or use a new --workdir')
    elif checkpoint.list_checkpoints(workdir) or os.path.exists(os.path.join(workdir, 'final.npz')):
        raise UserError(f'--workdir {workdir} holds checkpoints of an unknown run; use a new --workdir')


def _record_run(workdir: str, s: TrainSettings, dataset: datasets.Dataset) -> None:
    """DIR/run.json, DIR/labels.txt and DIR/skipped.txt, once the run has really started (its first step ran): a run
    that never started leaves none."""
    path = os.path.join(workdir, RUN_JSON)
    if not os.path.exists(path):
        files.write_json(path, s.record())
    if s.class_names is not None:
        labels = os.path.join(workdir, weights.checkpoints.RUN_LABELS)  # the name `weights.load` reads it by
        files.write_text(labels, ''.join(f'{name}\n' for name in s.class_names))
    if dataset.skipped:  # a file name that is not UTF-8 is written with its undecodable bytes escaped
        lines = ''.join(f'{p.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")}\t{why}\n'
                        for p, why in dataset.skipped)
        files.write_text(os.path.join(workdir, SKIPPED), lines)


def _step_of(line: str) -> Optional[int]:
    """The step of a metrics line; None for a line cut short when a run was killed mid-write."""
    try:
        return json.loads(line)['step']
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


class MetricsLog:
    """DIR/metrics.jsonl; on restart, lines past the resumed step are dropped (they will be redone)."""

    def __init__(self, path: str, start_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and os.path.exists(path):
            with open(path) as f:
                keep = [line for line in f if _step_of(line) is not None and _step_of(line) <= start_step]
            files.write_text(path, ''.join(keep))

    def write(self, record: dict) -> None:
        if self.enabled:
            try:
                with open(self.path, 'a') as f:
                    f.write(json.dumps(record) + '\n')
            except OSError as e:
                raise files.write_error(self.path, e) from None


# --------------------------------------------------------------------------- the run

class Profile:
    """--profile DIR: a `jax.profiler` trace of `PROFILE_STEPS` steps after the first, which compiles."""

    def __init__(self, directory: Optional[str], say=cli.say, steps: int = PROFILE_STEPS):
        self.directory, self.say, self.steps, self.tracing = directory, say, steps, False

    def after_step(self, done: int, metrics) -> None:
        """Called after the `done`-th step of this run was dispatched."""
        if self.directory is None:
            return
        if done == 1:
            jax.block_until_ready(metrics)  # the compile stays out of the trace
            jax.profiler.start_trace(self.directory)
            self.tracing = True
        elif done == 1 + self.steps:
            self.stop(metrics)

    def stop(self, metrics=None) -> None:
        if self.tracing:
            jax.block_until_ready(metrics)  # the traced steps' device work inside the trace
            jax.profiler.stop_trace()
            self.tracing = False
            self.say(f'vit_jax train: profile trace of up to {self.steps} steps written to {self.directory} '
                     f'(tensorboard --logdir {self.directory}, Profile tab; or its .trace.json.gz in Perfetto)')


@dataclasses.dataclass
class Run:
    """One training run in its workdir: the settings, the data, the compiled steps and the log."""

    settings: TrainSettings
    workdir: str
    dataset: datasets.Dataset
    mesh: jax.sharding.Mesh
    train_step: object
    eval_step: object
    log: MetricsLog
    writer: bool  # this process writes the workdir (process 0)
    profile: Optional[str] = None  # --profile DIR: process 0 traces a few steps there

    def evaluate(self, state) -> dict:
        s = self.settings
        return train.evaluate(self.eval_step, state.params, self.dataset, s.batch_size, s.image_size, self.mesh,
                              len(s.teachers))

    def loop(self, state, start: int):
        """Steps `start + 1 .. steps`, logging, evaluating and checkpointing as the settings say.

        Returns the final state and the last evaluation (None when nothing was left to train).
        """
        s = self.settings
        steps, B, S = s.steps, s.batch_size, s.image_size
        pid, procs = jax.process_index(), jax.process_count()
        batches = train.prefetch(self.dataset.train_batches(B, S, s.seed, start, pid, procs, s.augmentation),
                                 self.mesh, steps - start)
        bar = tqdm(total=steps, initial=start, unit='step', disable=not self.writer, dynamic_ncols=True,
                   file=sys.stderr, desc='train')
        trace = Profile(self.profile if self.writer else None, lambda line: bar.write(line, file=sys.stderr))
        pending: list[tuple[int, dict]] = []
        found = checkpoint.list_checkpoints(self.workdir)
        last_good = found[-1][1] if found else None
        tick, ticked = time.perf_counter(), start
        self.trained_seconds, self.trained_images = 0.0, 0  # after the compiling first step; eval, checkpoints out
        ev = None
        try:
            for step in range(start + 1, steps + 1):
                state, metrics = self.train_step(state, next(batches))
                trace.after_step(step - start, metrics)
                pending.append((step, metrics))
                bar.update(1)
                if step == start + 1:  # the first step compiles: leave it out of the throughput
                    jax.block_until_ready(metrics)
                    tick, ticked = time.perf_counter(), step
                    if self.writer:  # the config, the data and the compile all worked: the run has started
                        _record_run(self.workdir, s, self.dataset)
                due_eval = s.eval_every and step % s.eval_every == 0 or step == steps
                due_ckpt = step % s.checkpoint_every == 0 or step == steps
                if step % s.log_every and not (due_eval or due_ckpt):
                    continue
                # One device-to-host transfer per log interval; NaN is caught before any checkpoint is written.
                host = jax.device_get([m for _, m in pending])
                bad = next((st for (st, _), m in zip(pending, host)
                            if not (np.isfinite(m['loss']) and np.isfinite(m['grad_norm']))), None)
                if bad is not None:
                    bar.close()
                    where = f'the last good checkpoint is {last_good}' if last_good else 'no checkpoint was written yet'
                    raise UserError(f'loss is not finite at step {bad}; stopped, {where}; '
                                    'lower --lr or raise --warmup-steps')
                now = time.perf_counter()
                self.trained_seconds += now - tick
                self.trained_images += B * (step - ticked)
                rate = B * (step - ticked) / max(now - tick, 1e-9) if step > ticked else 0.0
                record = {'step': step, 'split': 'train',
                          'loss': float(np.mean([m['loss'] for m in host])),
                          'accuracy': float(np.mean([m['accuracy'] for m in host])),
                          'learning_rate': float(host[-1]['learning_rate']), 'img_per_sec': round(rate, 2),
                          'grad_norm': float(host[-1]['grad_norm'])}
                if 'distill_loss' in host[-1]:
                    record['distill_loss'] = float(np.mean([m['distill_loss'] for m in host]))
                self.log.write(record)
                bar.set_postfix(loss=f'{record["loss"]:.4f}', img_s=f'{rate:.0f}', refresh=False)
                pending = []
                if due_eval:
                    t0 = time.perf_counter()
                    ev = self.evaluate(state)
                    test = self.dataset.preset.test
                    self.log.write({'step': step, 'split': test, **ev,
                                    'img_per_sec': round(ev['examples'] / (time.perf_counter() - t0), 2)})
                    if self.writer:
                        agree = ''.join(f', agrees with teacher {i + 1} on {a:.2%}'
                                        for i, a in enumerate(ev.get('teacher_agreement', ())))
                        bar.write(f'step {step}: {test} accuracy {ev["accuracy"]:.2%} '
                                  f'({ev["examples"]} images), loss {ev["loss"]:.4f}{agree}', file=sys.stderr)
                if due_ckpt and self.writer:
                    try:
                        last_good = checkpoint.save_checkpoint(self.workdir, state, s.keep_checkpoints)
                    except UserError as e:
                        where = f'the last good checkpoint is {last_good}' if last_good else 'no checkpoint was kept'
                        raise UserError(f'{e}; stopped at step {step}, {where}; run the same command again '
                                        'to resume from it') from None
                tick, ticked = time.perf_counter(), step
        finally:
            trace.stop()
            bar.close()
        return state, ev

    def finish(self, state, ev: dict, seconds: float) -> int:
        """Writes final.npz and config.json (process 0) and prints the summary line (every process)."""
        ev = dict(ev, split=self.dataset.preset.test, seconds=round(seconds, 1),
                  img_per_sec=round(self.trained_images / self.trained_seconds, 1) if self.trained_seconds else None)
        params = train.canonical_params(state)
        digest = train.params_digest(params)
        if jax.process_count() > 1:
            digests = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(digest), np.uint8))
            if not (digests == digests[0]).all():
                raise RuntimeError('processes ended with different parameters: a data-parallel bug')
        final, config_path = (os.path.join(self.workdir, name) for name in ('final.npz', 'config.json'))
        if self.writer:
            # The released layout where the official model can express the config; big_vision's where not (map,
            # first, sincos2d): `weights.load` reads either.
            try:
                weights.save(final, params, self.settings.config, 'npz' if self.settings.config.fits_released_npz
                             else 'big_vision')
                files.write_json(config_path, self.settings.config.to_official_dict())
            except UserError as e:
                raise UserError(f'{e}; training finished and its last checkpoint is kept: run the same command '
                                'again to write the final files') from None
        print(json.dumps({'step': self.settings.steps, **ev, 'final': final, 'config': config_path,
                          'process': jax.process_index(), 'params_sha256': digest}))
        return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Fine-tune an official checkpoint, or train from scratch, on one dataset through XLA.

    Data-parallel over every device of every process. DIR gets metrics.jsonl, run.json,
    checkpoints/ (atomic, newest kept), and at the end final.npz (released layout) and
    config.json (official layout). Running the same command again resumes from the last
    checkpoint, data order and random state included.
    """
    args = _parser().parse_args(argv)
    if args.offline:  # names and URLs from the download cache only, for this run and the processes it starts
        os.environ[remote.OFFLINE_ENV] = '1'
    settings.check_ranges(args)  # before anything is read or created
    _check_workdir(args.workdir)
    if args.profile is not None:
        _check_workdir(args.profile, '--profile')
    init_distributed(args.coordinator, args.num_processes, args.process_id)
    writer = jax.process_index() == 0  # process 0 writes the workdir and holds its lock
    if not writer:
        return _train(args, writer)
    created = files.make_dirs(args.workdir, '--workdir')
    try:
        with WorkdirLock(args.workdir) as held:
            if held.took_over:
                cli.say(f'note: --workdir {args.workdir} was locked by {describe_holder(held.took_over)}, which is '
                        'no longer running; taken over')
            return _train(args, writer)
    except BaseException:
        # A run that never started (its first step did not run) leaves nothing behind.
        if created and not os.path.exists(os.path.join(args.workdir, RUN_JSON)):
            shutil.rmtree(args.workdir, ignore_errors=True)
        raise


def _train(args: argparse.Namespace, writer: bool) -> int:
    """The run itself, the workdir held (by process 0)."""
    settings.recipe_preset(args.recipe)  # an unknown --recipe fails before anything is read
    dataset = load_dataset(args)
    if isinstance(dataset, folders.Folder):  # the split it evaluates on must exist before it trains, not after
        dataset.num_examples(dataset.preset.test)
    args = settings.apply_recipe(args, dataset.num_classes)  # its resolution decides the model's grid
    cfg, finetune = _model(args, dataset, args.image_size or dataset.preset.image_size)
    s = dataclasses.replace(settings.resolve(args, cfg), class_names=dataset.class_names)
    B, A = s.batch_size, s.accum_steps
    devices, procs = jax.device_count(), jax.process_count()
    if B % devices or (B // devices) % A:
        raise UserError(f'--batch-size {B} does not split over {devices} devices with --accum-steps {A}; '
                        f'pick a multiple of {devices * A}')
    teachers = train.load_teachers(s.teachers, dataset.num_classes, dataset.name, numerics=s.numerics,
                                   class_names=dataset.class_names if isinstance(dataset, folders.Folder) else None)
    check_memory(s, devices, procs, [t.cfg for t in teachers])
    _check_resume(args.workdir, s)
    if writer:
        removed = checkpoint.remove_temporaries(args.workdir)
        if removed:
            cli.say(f'note: removed {len(removed)} half-written files a killed run left in {args.workdir} '
                    f'({", ".join(removed[:3])}{", ..." if len(removed) > 3 else ""})')

    mesh = train.make_mesh()
    cfg = s.config  # with the regularisation flags
    tx, lr_fn = objective.make_optimizer(s)
    found = checkpoint.list_checkpoints(args.workdir)
    if found:
        state = checkpoint.restore_checkpoint(found[-1][1], train.abstract_train_state(cfg, tx), mesh)
    else:
        params = finetune if finetune is not None else train.init_params(cfg, s.seed)
        if s.head_bias_init is not None and cfg.num_classes:
            params = dict(params, **{'head/bias': np.full(cfg.num_classes, s.head_bias_init, np.float32)})
        state = train.create_train_state(cfg, params, tx, s.seed, mesh)
    start = int(train.to_host(state.step))
    if procs > 1:
        starts = multihost_utils.process_allgather(np.int64(start))
        if not (starts == start).all():
            raise UserError(f'--workdir {args.workdir}: the processes found checkpoints of different steps '
                            f'({", ".join(map(str, starts))}); the workdir must be one directory every process sees')
    if start > s.steps:
        raise UserError(f'--workdir {args.workdir} is at step {start}, past --steps {s.steps}; use a new --workdir')

    # The fast path (fused attention, ordered dense backward, patch matmul): the same function, proven
    # equal to the by-hand path in tests/test_fast_paths.py; it falls back by itself under attention dropout.
    run = Run(s, args.workdir, dataset, mesh,
              train.make_train_step(cfg, tx, lr_fn, mesh=mesh, accum_steps=A, dtype=s.dtype, fast=True,
                                    objective=objective.Objective.from_settings(s), teachers=teachers,
                                    remat=s.remat),
              train.make_eval_step(cfg, mesh=mesh, dtype=s.dtype, fast=True, teachers=teachers),
              MetricsLog(os.path.join(args.workdir, METRICS), start, writer), writer, args.profile)
    if writer:
        if isinstance(dataset, folders.Folder):  # the scan's counts, said once before training
            listed = f' (listed in {os.path.join(args.workdir, SKIPPED)})' if dataset.skipped else ''
            cli.say(f'vit_jax train: {dataset.summary()}{listed}')
        cli.say(f'vit_jax train: {cli.describe_config(cfg)}, {weights.count_params(cfg):,} params, on {args.dataset} '
                f'({dataset.num_examples(dataset.preset.train):,} train images); {devices} device(s) in {procs} '
                f'process(es); batch {B}' + (f' in {A} microbatches' if A > 1 else '')
                + (f'; {len(teachers)} teacher(s), {s.distill} distillation, alpha {s.distill_alpha:g}'
                   if teachers else '')
                + (f'; resuming at step {start}' if start else ''))
    t_start = time.perf_counter()
    state, ev = run.loop(state, start)
    if ev is None:  # resumed a finished run: score it again for the summary
        ev = run.evaluate(state)
    return run.finish(state, ev, time.perf_counter() - t_start)

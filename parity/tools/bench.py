"""`python -m parity bench`: speed and peak memory of each ViT implementation, side by side.

One process, one device (CUDA when PyTorch sees it, else the CPU), the same random batch
and the same weights for vit_jax and vit_torch. For every model and mode each
implementation is built and warmed up first (compilation excluded from the timings), then
the timed runs go round-robin over the implementations (each round starting one further
on), so a neighbour's load on a shared machine lands on all of them alike; the median
run gives images per second, and `ratio_to_reference` divides it by timm's for the same
model, mode and precision.

Implementations (`impl`):
    vit_jax             the whole step under `jax.jit`, on the fast path (`fast`, `vit_jax.fast`: fused
                        attention; on the CPU also the ordered dense backward and the patch matmul);
                        training is `vit_jax.train`'s jitted step (official recipe: clip to
                        global norm 1, SGD momentum 0.9, donated state)
    vit_torch           eager PyTorch, attention on the fast path (`fast`, `vit_torch.fast`)
    vit_torch_compiled  the same model under `torch.compile` (a failure is reported, not raised)
    timm                timm's VisionTransformer for the same config with tanh GELU: the same
                        function, the PyTorch reference (when timm is installed)
Modes: `infer` is a forward pass without gradients; `train` is forward, cross-entropy,
backward and an SGD (momentum 0.9) update. Precisions: `fp32` is true float32 (TF32 off,
JAX's highest matmul precision), `bf16` computes in bfloat16 on float32 weights (Flax
`dtype=bfloat16`, `torch.autocast`).

Peak memory (`peak_mem_bytes`), measured while the implementation is built, compiled,
warmed up and run once more: on CUDA the allocator's peak above what was allocated
before (`torch.cuda.max_memory_allocated`; JAX's `peak_bytes_in_use`, which cannot be
reset, so a row that did not raise the process's peak reads as an upper bound); on the
CPU the peak resident set above the resident set before (Linux VmHWM, reset through
/proc/self/clear_refs, after handing freed heap back with malloc_trim): the
implementation's own copy of the weights, activations, gradients, optimizer state and
compilation, everything the process held for it at its peak. null where not measurable.

Input: each timed step puts the host batch (NumPy) on the device first, as a training loop
without prefetching does (`jax.device_put` / `shard_batch`, `tensor.to(device)`; on the CPU
the host is the device and PyTorch's copy is none). `--device-resident` keeps the batch on
the device from the start: the step alone. The JSON says which (`device_resident`).
`--profile DIR` then runs `PROFILE_STEPS` more steps of every row under `jax.profiler`
(vit_jax) or `torch.profiler` (the PyTorch rows), one trace folder per row under DIR.

`--data-only --dataset NAME` times the input pipeline alone instead, on the host, no model:
the training stream `vit_jax train` reads (`Dataset.train_batches`: files decoded, augmented
(`--augment`, `--randaug`; default the dataset's), resized to `--image-size` (default the
dataset's) and batched by `--batch-size`). After `--warmup` untimed batches, each of
`--repeats` runs takes `DATA_BATCHES` batches; the median run gives images per second, the
figure to set beside a training step's (one `data` row, `impl` data, `model` the dataset).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import functools
import gc
import os
import platform
import statistics
import time
from typing import Callable, Optional, Sequence

import numpy as np

from parity import cli
from parity.core import files, jax_memory, limits
from parity.core.config import OFFICIAL_CONFIGS, ViTConfig
from parity.core.errors import UserError
from parity.data import augment as augmentation, datasets, folders

IMPLS = ('vit_jax', 'vit_torch', 'vit_torch_compiled', 'timm')
MODES = ('infer', 'train')
PRECISIONS = ('fp32', 'bf16')
REFERENCE = 'timm'
LEARNING_RATE = 0.01
MOMENTUM = 0.9
# Before each timed run: the worker threads of the runtime that ran last (XLA's pool,
# PyTorch's OpenMP team) spin-wait a while after their work; on a small machine they
# would steal cycles from the next implementation's run.
PAUSE = 0.05
PROFILE_STEPS = 3
DATA_BATCHES = 10  # batches per timed run of --data-only: several, so the prefetch buffer cannot hide a run
FIELDS = ('model', 'impl', 'mode', 'precision', 'batch_size', 'img_per_s', 'peak_mem_bytes', 'ratio_to_reference')


@dataclasses.dataclass
class Result:
    """One row of the table and of the JSON (`error` only when the implementation failed)."""

    model: str
    impl: str
    mode: str
    precision: str
    batch_size: int
    img_per_s: Optional[float] = None
    peak_mem_bytes: Optional[int] = None
    ratio_to_reference: Optional[float] = None
    error: Optional[str] = None

    def to_json(self) -> dict:
        row = {k: getattr(self, k) for k in FIELDS}
        if self.error is not None:
            row['error'] = self.error
        return row


# --------------------------------------------------------------------------- arguments

def _csv(allowed: Sequence[str], what: str):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(',') if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f'{what} {", ".join(bad) or "(none)"}: choose from {", ".join(allowed)}')
        return items
    return parse


def model_config(name: str) -> ViTConfig:
    """An official config by its name or its short name (`B_16` for `ViT-B_16`)."""
    for candidate in (name, f'ViT-{name}'):
        if candidate in OFFICIAL_CONFIGS:
            return OFFICIAL_CONFIGS[candidate]
    short = [n[len('ViT-'):] for n in OFFICIAL_CONFIGS if n.startswith('ViT-')]
    raise UserError(f'--models {name}: no such config; use an official name or a short one '
                    f'({", ".join(short[:8])}, ..., testing)')


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m parity bench', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', default='Ti_16,S_16,B_16', metavar='A,B,...',
                        help='official configs, short names allowed (default: Ti_16,S_16,B_16)')
    parser.add_argument('--batch-size', type=int, default=8, metavar='N', help='images per step (default: 8)')
    parser.add_argument('--precision', choices=PRECISIONS, default='fp32', help='default: fp32')
    parser.add_argument('--mode', type=_csv(MODES, 'mode'), default=list(MODES), metavar='infer,train',
                        help='what to time (default: infer,train)')
    parser.add_argument('--impls', type=_csv(IMPLS, 'implementation'), default=list(IMPLS), metavar='A,B,...',
                        help=f'implementations to time (default: all: {",".join(IMPLS)})')
    parser.add_argument('--repeats', type=int, default=5, metavar='R', help='timed runs per row (default: 5)')
    parser.add_argument('--warmup', type=int, default=2, metavar='W',
                        help='untimed runs per row first, compilation included (default: 2)')
    parser.add_argument('--json', metavar='OUT.json', help='also write the results as JSON')
    parser.add_argument('--device-resident', action='store_true',
                        help='keep the batch on the device: time the step alone, without putting a host batch there')
    parser.add_argument('--profile', metavar='DIR',
                        help=f'after the timings, trace {PROFILE_STEPS} steps of each row into DIR/MODEL-MODE-'
                             'PRECISION-IMPL (jax.profiler, torch.profiler; TensorBoard or Perfetto)')
    data = parser.add_argument_group('input pipeline (--data-only)')
    data.add_argument('--data-only', action='store_true',
                      help="time the training input pipeline of --dataset alone (images/s, no model)")
    data.add_argument('--dataset', metavar='NAME', help=folders.DATASET_HELP)
    data.add_argument('--image-size', type=int, metavar='S', help="training resolution (default: the dataset's)")
    data.add_argument('--augment', metavar='LIST', help="training transforms, as train's --augment (default: the "
                                                        "dataset's)")
    data.add_argument('--randaug', metavar='N,M', help="RandAugment, as train's --randaug")
    data.add_argument('--data-dir', metavar='DIR', help='tensorflow-datasets data directory')
    data.add_argument('--val-fraction', type=float, metavar='F', help=folders.VAL_FRACTION_HELP)
    data.add_argument('--skip-bad-images', action='store_true', help=folders.SKIP_BAD_IMAGES_HELP)
    return parser


# --------------------------------------------------------------------------- devices and memory

def check_memory(configs: Sequence[ViTConfig], modes: Sequence[str], batch: int, device: str) -> None:
    """Refuses up front a --batch-size no row could run with, rather than failing every row after its warm-up."""
    import torch

    budget, where = None, 'this machine'
    if device != 'cpu':
        budget, where = torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
    estimate = limits.training_bytes if 'train' in modes else limits.inference_bytes
    for cfg in configs:
        limits.check_compute(estimate(cfg, batch), f'{cfg.name} at --batch-size {batch}', budget, where)


def describe_device(device: str) -> str:
    """What the runs ran on, in words."""
    import jax
    import torch

    if device == 'cuda':
        name = f'cuda ({torch.cuda.get_device_name(0)})'
    else:
        cpu = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            with open('/proc/cpuinfo') as f:
                cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
        name = f'cpu ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)'
    backend = jax.default_backend()
    if (backend == 'gpu') != (device == 'cuda'):
        name += f'; vit_jax on {backend}'
    return name


@functools.lru_cache(maxsize=None)
def _libc() -> ctypes.CDLL:
    """glibc, for its allocator controls (OSError where there is none)."""
    return ctypes.CDLL('libc.so.6')


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


def reuse_freed_memory() -> None:
    """Keep freed memory in the process for the next step, alike for every implementation (glibc).

    XLA:CPU takes an execution's temporaries as one block (1 GB for a ViT-S/16 training
    step at batch 8). glibc serves a block that large with a fresh mmap and unmaps it when
    it is freed, so every step faults all of it back in, page by page; that kernel time grows
    with what else the process has touched (a third of a ViT-B/16 step after timm's step
    had run). PyTorch's tensors, smaller, mostly come back from the heap. One arena, no
    mmap and no automatic trimming give every implementation its freed memory back
    instead. Called before the runtimes start their threads (a thread keeps the arena
    it first got); `_trim_heap` still hands memory back between rows.
    """
    with contextlib.suppress(OSError, AttributeError):
        for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)):  # -1: never
            _libc().mallopt(param, value)


def _trim_heap() -> None:
    """Freed memory back to the system (glibc keeps it otherwise), so the next row starts clean."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        _libc().malloc_trim(0)


def _status_kb(field: str) -> Optional[int]:
    with contextlib.suppress(OSError):
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    return None


class PeakMemory:
    """Peak memory of one implementation, above what was in use before it (see the module docstring)."""

    def __init__(self, device: str, impl: str):
        self.device, self.jax = device, impl == 'vit_jax'

    def __enter__(self):
        _trim_heap()
        self.base = None
        if self.device == 'cuda' and self.jax:
            stats = self._jax_stats()
            self.base = stats and stats.get('bytes_in_use')
        elif self.device == 'cuda':
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with contextlib.suppress(OSError):
                with open('/proc/self/clear_refs', 'w') as f:
                    f.write('5')  # resets VmHWM to the current resident set
                self.base = _status_kb('VmRSS')
        return self

    def __exit__(self, *exc) -> None:
        self.peak = None
        if self.base is None:
            return
        if self.device == 'cuda' and self.jax:
            self.peak = self._jax_stats()['peak_bytes_in_use'] - self.base
        elif self.device == 'cuda':
            import torch

            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            hwm = _status_kb('VmHWM')
            self.peak = None if hwm is None else max(hwm - self.base, 0) * 1024

    @staticmethod
    def _jax_stats() -> Optional[dict]:
        import jax

        return jax.local_devices()[0].memory_stats()


# --------------------------------------------------------------------------- implementations

@dataclasses.dataclass
class Inputs:
    """What every implementation of one model gets: weights, a batch (NHWC and NCHW) and labels."""

    cfg: ViTConfig
    params: dict
    images: np.ndarray  # (B, S, S, 3) float32 in [-1, 1]
    labels: np.ndarray  # (B,) int32

    @classmethod
    def random(cls, cfg: ViTConfig, batch_size: int, seed: int = 0) -> 'Inputs':
        import torch

        from vit_torch.model import VisionTransformer
        from vit_torch.params import params_from_state_dict

        torch.manual_seed(seed)
        params = params_from_state_dict(VisionTransformer(cfg).state_dict(), cfg)  # the official initialisers
        rng = np.random.default_rng(seed)
        S = cfg.image_size
        images = rng.uniform(-1, 1, (batch_size, S, S, 3)).astype(np.float32)
        labels = rng.integers(0, max(cfg.num_classes, 1), batch_size).astype(np.int32)
        return cls(cfg, params, images, labels)


def timm_model(cfg: ViTConfig):
    """timm's VisionTransformer computing the same function as `cfg`'s official model, or a reason why none does."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from parity.core.weights.formats import timm as timm_format

    if timm_format.expressible(cfg) or cfg.patch_size[0] != cfg.patch_size[1]:
        return None
    pool, class_token = timm_format.POOLS[cfg.classifier]
    return TimmViT(img_size=cfg.image_size, patch_size=cfg.patch_size[0], embed_dim=cfg.hidden_size,
                   depth=cfg.num_layers, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_dim / cfg.hidden_size,
                   num_classes=cfg.num_classes, class_token=class_token,
                   global_pool=pool, fc_norm=False, act_layer=timm_format.WRITTEN_ACTIVATION[cfg.gelu],
                   drop_rate=cfg.dropout_rate, pos_drop_rate=cfg.dropout_rate, proj_drop_rate=cfg.dropout_rate,
                   attn_drop_rate=cfg.attention_dropout_rate)


def jax_step(inputs: Inputs, mode: str, precision: str, device_resident: bool = False) -> Callable[[], None]:
    """One synchronised vit_jax step, compiled on first call; the host batch put on the device in each step
    unless `device_resident`."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if precision == 'bf16' else jnp.float32
    if mode == 'infer':
        from vit_jax.model import VisionTransformer
        from vit_jax.params import variables_from_params

        apply = jax.jit(functools.partial(VisionTransformer(inputs.cfg, dtype=dtype, fast=True).apply, train=False))
        variables = jax.device_put(variables_from_params(inputs.params))
        images = jax.device_put(inputs.images)
        if device_resident:
            return lambda: apply(variables, images).block_until_ready()
        return lambda: apply(variables, jax.device_put(inputs.images)).block_until_ready()

    from vit_jax import objective, train
    from vit_jax.settings import TrainSettings

    mesh = train.make_mesh()
    tx, _ = objective.make_optimizer(TrainSettings(lr=LEARNING_RATE, steps=10 ** 6, warmup_steps=0))
    step_fn = train.make_train_step(inputs.cfg, tx, mesh=mesh, dtype=jnp.dtype(dtype).name, fast=True)
    state = train.create_train_state(inputs.cfg, inputs.params, tx, mesh=mesh)
    host = {'image': inputs.images, 'label': inputs.labels}
    resident = train.shard_batch(host, mesh)

    def step():
        nonlocal state
        batch = resident if device_resident else train.shard_batch(host, mesh)
        state, metrics = step_fn(state, batch)  # the state is donated: its buffers are reused
        jax.block_until_ready((state, metrics))
    return step


def torch_step(model, inputs: Inputs, mode: str, precision: str, device: str,
               device_resident: bool = False) -> Callable[[], None]:
    """One synchronised step of a PyTorch model (vit_torch, compiled or not, or timm); the host batch put on
    the device in each step unless `device_resident`."""
    import torch
    import torch.nn.functional as F

    # The layout change is the data pipeline's, not the step's: done once on the host either way.
    host_images = torch.from_numpy(inputs.images).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    host_labels = torch.from_numpy(inputs.labels).long()
    resident = host_images.to(device), host_labels.to(device)

    def batch():
        return resident if device_resident else (host_images.to(device), host_labels.to(device))
    autocast = functools.partial(torch.autocast, device, dtype=torch.bfloat16, enabled=precision == 'bf16')
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    if mode == 'infer':
        model.eval()

        def step():
            images, _ = batch()
            with torch.inference_mode(), autocast():
                model(images)
            sync()
        return step

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LEARNING_RATE, momentum=MOMENTUM)

    def step():
        images, labels = batch()
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        sync()
    return step


def make_step(impl: str, inputs: Inputs, mode: str, precision: str, device: str,
              device_resident: bool = False) -> Optional[Callable[[], None]]:
    """The step of `impl`, or None when the implementation has no model for this config."""
    if impl == 'vit_jax':
        return jax_step(inputs, mode, precision, device_resident)
    import torch

    if impl == 'timm':
        model = timm_model(inputs.cfg)
        if model is None:
            return None
        model = model.to(device)
    else:
        from vit_torch.params import build_model

        model = build_model(inputs.cfg, inputs.params, fast=True).to(device)
        if impl == 'vit_torch_compiled':
            model = torch.compile(model)
    return torch_step(model, inputs, mode, precision, device, device_resident)


def profile_step(impl: str, step: Callable[[], None], directory: str, device: str, steps: int = PROFILE_STEPS) -> None:
    """`steps` runs of a warmed-up `step` traced into `directory`: jax.profiler for vit_jax, torch.profiler
    (a TensorBoard `*.pt.trace.json`, which Perfetto also opens) for the PyTorch rows."""
    if impl == 'vit_jax':
        import jax

        with jax.profiler.trace(directory):
            for _ in range(steps):
                step()
        return
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == 'cuda':
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities,
                                on_trace_ready=torch.profiler.tensorboard_trace_handler(directory)):
        for _ in range(steps):
            step()


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f'{type(e).__name__}: {text[0] if text else ""}'[:300]


# --------------------------------------------------------------------------- the benchmark

def bench_model(cfg: ViTConfig, modes: Sequence[str], impls: Sequence[str], precision: str, batch_size: int,
                device: str, warmup: int, repeats: int, log: Callable[[str], None] = cli.say,
                device_resident: bool = False, profile: Optional[str] = None) -> list[Result]:
    """Every (mode, impl) row for one model: build and warm up each, then time them round-robin."""
    inputs = Inputs.random(cfg, batch_size)
    rows = []
    for mode in modes:
        steps, results = {}, {}
        for impl in impls:
            result = Result(cfg.name, impl, mode, precision, batch_size)
            log(f'bench: {cfg.name} {mode} {impl}: building and warming up')
            try:
                with PeakMemory(device, impl) as mem:
                    step = make_step(impl, inputs, mode, precision, device, device_resident)
                    if step is not None:
                        for _ in range(max(warmup, 1) + 1):  # the extra run: a steady step inside the peak
                            step()
            except Exception as e:  # a compiler or backend failure is a result, not a crash
                result.error = _reason(e)
                log(f'bench: {cfg.name} {mode} {impl}: failed: {result.error}')
                results[impl] = result
                continue
            if step is None:
                continue  # no model of this config in that implementation: no row
            result.peak_mem_bytes = mem.peak
            steps[impl], results[impl] = step, result
        times = {impl: [] for impl in steps}
        order = list(steps)
        for r in range(repeats):
            for impl in order[r % len(order):] + order[:r % len(order)]:  # each takes every place in turn
                time.sleep(PAUSE)
                start = time.perf_counter()
                steps[impl]()
                times[impl].append(time.perf_counter() - start)
        for impl, ts in times.items():
            results[impl].img_per_s = batch_size / statistics.median(ts)
        if profile is not None:  # after the timings, so that tracing cannot slow them
            for impl, step in steps.items():
                profile_step(impl, step, os.path.join(profile, f'{cfg.name}-{mode}-{precision}-{impl}'), device)
        reference = results.get(REFERENCE)
        for result in results.values():
            if reference is not None and reference.img_per_s and result.img_per_s:
                result.ratio_to_reference = result.img_per_s / reference.img_per_s
        rows += [results[impl] for impl in impls if impl in results]
        del steps
        _trim_heap()
    return rows


def format_table(device: str, rows: Sequence[Result]) -> str:
    """The results for people: one line per row, ratios against timm."""
    lines = [f'device: {device}',
             f'{"model":<11}{"impl":<20}{"mode":<7}{"precision":<11}{"batch":>5}{"img/s":>10}{"peak mem":>11}'
             f'{"vs timm":>9}']
    for r in rows:
        if r.error is not None:
            lines.append(f'{r.model:<11}{r.impl:<20}{r.mode:<7}{r.precision:<11}{r.batch_size:>5}  failed: {r.error}')
            continue
        mem = f'{r.peak_mem_bytes / 2 ** 20:,.0f} MiB' if r.peak_mem_bytes is not None else '-'
        ratio = f'{r.ratio_to_reference:.2f}x' if r.ratio_to_reference is not None else '-'
        lines.append(f'{r.model:<11}{r.impl:<20}{r.mode:<7}{r.precision:<11}{r.batch_size:>5}'
                     f'{r.img_per_s:>10.2f}{mem:>11}{ratio:>9}')
    return '\n'.join(lines)


def describe_host() -> str:
    """The CPU the input pipeline runs on, in words."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open('/proc/cpuinfo') as f:
            cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
    return f'cpu ({cpu}, {os.cpu_count()} cores)'


def bench_data(args: argparse.Namespace, log: Callable[[str], None] = cli.say) -> dict:
    """`--data-only`: images per second of the dataset's training stream, one JSON row."""
    dataset = datasets.load(args.dataset, args.data_dir, val_fraction=args.val_fraction,
                            skip_bad_images=args.skip_bad_images)
    if isinstance(dataset, folders.Folder):
        log(f'bench: {dataset.summary()}')
    aug = augmentation.parse(args.augment, args.randaug, digits=dataset.name == datasets.DIGITS)
    size = args.image_size or dataset.preset.image_size
    log(f'bench: {args.dataset} train stream, batch {args.batch_size}, {size}x{size}, augment {aug.spec()}'
        + (f', randaug {args.randaug}' if args.randaug else ''))
    stream = dataset.train_batches(args.batch_size, size, seed=0, augment=aug)
    for _ in range(args.warmup):
        next(stream)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(DATA_BATCHES):
            next(stream)
        times.append(time.perf_counter() - start)
    stream.close()
    return {'model': args.dataset, 'impl': 'data', 'mode': 'train', 'precision': None, 'batch_size': args.batch_size,
            'image_size': size, 'augment': aug.spec(), 'randaug': args.randaug,
            'img_per_s': DATA_BATCHES * args.batch_size / statistics.median(times)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Times inference and training of each implementation; prints a table, optionally writes JSON."""
    args = _parser().parse_args(argv)
    for flag, value in (('--batch-size', args.batch_size), ('--repeats', args.repeats)):
        if value < 1:
            raise UserError(f'{flag} {value}: must be at least 1')
    if args.warmup < 0:
        raise UserError(f'--warmup {args.warmup}: must be 0 or more')
    if args.data_only:
        return _main_data(args)
    data_flags = [flag for flag in ('dataset', 'image_size', 'augment', 'randaug', 'data_dir', 'val_fraction')
                  if getattr(args, flag) is not None] + (['skip_bad_images'] if args.skip_bad_images else [])
    if data_flags:
        raise UserError(f'--{data_flags[0].replace("_", "-")}: times the input pipeline, with --data-only only')
    configs = [model_config(name) for name in args.models.split(',') if name.strip()]
    if not configs:
        raise UserError('--models: name at least one config')
    if args.json:
        files.check_outputs({'--json': args.json})
    if args.profile is not None:
        files.make_dirs(args.profile, '--profile')
    reuse_freed_memory()  # before timm, torch or jax start a thread
    jax_memory.share_gpu_with_torch()  # for a caller that skipped `python -m parity`, if jax is not yet imported
    impls = list(args.impls)
    if REFERENCE in impls:
        try:
            import timm  # noqa: F401  (the reference is optional)
        except ImportError:
            cli.say('bench: timm is not installed: no reference rows, ratio_to_reference is null')
            impls.remove(REFERENCE)

    from vit_jax import runtime as jax_runtime
    from vit_torch import runtime as torch_runtime

    # fp32 means true float32 in both frameworks, as in every parity command; bf16 is bf16 compute either way.
    if args.precision == 'fp32':
        jax_runtime.strict_float32()
    torch_runtime.strict_float32()
    device = torch_runtime.device()
    described = describe_device(device)
    cli.say(f'bench: {described}')
    check_memory(configs, args.mode, args.batch_size, device)
    rows = []
    for cfg in configs:
        rows += bench_model(cfg, args.mode, impls, args.precision, args.batch_size, device, args.warmup,
                            args.repeats, device_resident=args.device_resident, profile=args.profile)
    if args.profile is not None:
        cli.say(f'bench: profile traces of {PROFILE_STEPS} steps per row written to {args.profile}/MODEL-MODE-'
                f'PRECISION-IMPL (tensorboard --logdir {args.profile}, Profile tab; or Perfetto)')
    print(format_table(described, rows))
    if args.json:
        report = {'device': described, 'device_resident': args.device_resident, 'jax_memory': jax_memory.in_force(),
                  'results': [r.to_json() for r in rows]}
        files.write_json(args.json, report, '--json')
    return 0


def _main_data(args: argparse.Namespace) -> int:
    """`bench --data-only`: the input pipeline's row, as a table and optionally JSON."""
    if args.dataset is None:
        raise UserError('--data-only: pass --dataset NAME (a folder, a .csv/.jsonl list, digits or a tfds name)')
    if args.image_size is not None and args.image_size < 1:
        raise UserError(f'--image-size {args.image_size}: must be at least 1')
    if args.json:
        files.check_outputs({'--json': args.json})
    described = describe_host()
    cli.say(f'bench: {described}')
    row = bench_data(args)
    print(f'device: {described}\n{"dataset":<30}{"impl":<6}{"mode":<7}{"batch":>6}{"size":>6}{"img/s":>11}\n'
          f'{row["model"][-30:]:<30}{"data":<6}{"train":<7}{row["batch_size"]:>6}{row["image_size"]:>6}'
          f'{row["img_per_s"]:>11.1f}')
    if args.json:
        files.write_json(args.json, {'device': described, 'data_only': True, 'results': [row]}, '--json')
    return 0

"""`python -m vit_jax|vit_torch eval CKPT --config NAME_OR_JSON --dataset NAME [--split S] [--json OUT]`.

NAME may be a folder of images or a .csv/.jsonl list of them (`parity.data.folders`), with
`--train-split`, `--test-split`, `--val-fraction F` (then `--split val` scores the held-out
part) and `--skip-bad-images` as `vit_jax train` takes them.

Framework-neutral: the arguments, the batches, the counting and the printed JSON are
decided here once, so both frameworks score the same batches the same way; each only
hands in its forward pass (`Forward`, NHWC float32 batch -> logits).
"""

from __future__ import annotations

import argparse
import json
from typing import Callable, Optional, Sequence

import numpy as np

from parity import cli
from parity.core import files
from parity.core.config import ViTConfig
from parity.core.errors import UserError
from parity.data import class_names, datasets, folders

DESCRIPTION = ('Accuracy of a checkpoint on a dataset split, in true float32 (JAX at the highest matmul '
               'precision, PyTorch with TF32 off). Prints one JSON line (accuracy, examples, correct, ...); '
               'vit_jax eval and vit_torch eval take the same arguments and agree on every prediction.')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`eval CKPT --config NAME_OR_JSON --dataset NAME [--split S] [--json OUT]` and a few extras."""
    cli.add_checkpoint_argument(parser)
    cli.add_config_argument(parser)
    parser.add_argument('--dataset', required=True, metavar='NAME', help=folders.DATASET_HELP)
    parser.add_argument('--split', metavar='S', help="split to score (default: the dataset's test split)")
    parser.add_argument('--json', metavar='OUT', help='also write the result JSON here')
    parser.add_argument('--image-size', type=cli.positive_int, metavar='N',
                        help="evaluate at NxN (default: the checkpoint's own resolution)")
    parser.add_argument('--batch-size', type=cli.positive_int, default=256, metavar='N',
                        help='images per batch (default 256)')
    parser.add_argument('--data-dir', metavar='DIR', help='tensorflow-datasets data directory')
    parser.add_argument('--logits', metavar='OUT.npy', help='also save every float32 logit, in dataset order')
    parser.add_argument('--train-split', metavar='NAME', help=folders.TRAIN_SPLIT_HELP)
    parser.add_argument('--test-split', metavar='NAME', help=folders.TEST_SPLIT_HELP)
    parser.add_argument('--val-fraction', type=cli.positive_float, metavar='F', help=folders.VAL_FRACTION_HELP)
    parser.add_argument('--skip-bad-images', action='store_true', help=folders.SKIP_BAD_IMAGES_HELP)


def run_eval(args: argparse.Namespace, framework: str, forward: cli.Forward, cfg: ViTConfig,
             labels: Optional[Sequence[str]] = None) -> dict:
    """Scores `forward` (NHWC batch -> logits) on the dataset; prints and writes the result JSON. `labels`: the
    checkpoint's own class names, which must be the dataset's where both have them."""
    cli.check_inference(cfg, args.batch_size)
    dataset = datasets.load(args.dataset, args.data_dir, train_split=args.train_split, test_split=args.test_split,
                            val_fraction=args.val_fraction, skip_bad_images=args.skip_bad_images)
    if isinstance(dataset, folders.Folder):
        cli.say(f'{framework} eval: {dataset.summary()}')
    if cfg.num_classes != dataset.num_classes:
        raise UserError(f'{args.checkpoint} has {cfg.num_classes} classes but {args.dataset} has '
                        f'{dataset.num_classes}; evaluate a checkpoint trained on {args.dataset}')
    # Your own folder names its classes as you do: a model that names others would be scored against the wrong
    # labels. (A library's names of a published dataset's classes, such as id2label against tensorflow-datasets'
    # ImageNet synset ids, are other words for the same classes: not compared.)
    if isinstance(dataset, folders.Folder) and labels and dataset.class_names \
            and tuple(labels) != tuple(dataset.class_names):
        raise UserError(f'{args.checkpoint} was trained on other classes than {args.dataset}: '
                        f'{class_names.change(labels, dataset.class_names)}; its logits would be scored against '
                        'the wrong labels')
    split = args.split or dataset.preset.test
    correct, total, logits, nonfinite = 0, 0, [], 0
    for batch in dataset.eval_batches(split, args.batch_size, cfg.image_size):
        y = forward(batch['image'])[batch['mask']]
        correct += int((y.argmax(-1) == batch['label'][batch['mask']]).sum())
        total += len(y)
        nonfinite += int((~np.isfinite(y)).any(-1).sum())
        if args.logits:
            logits.append(y)
    result = {'framework': framework, 'checkpoint': args.checkpoint, 'dataset': args.dataset, 'split': split,
              'image_size': cfg.image_size, 'examples': total, 'correct': correct, 'accuracy': correct / max(total, 1)}
    if nonfinite:
        cli.say(f'warning: {nonfinite} of {total} examples have NaN or Inf logits; their predictions are '
                'arbitrary and the accuracy does not mean what it says')
    if args.logits:
        cli.save_output(args.logits, np.concatenate(logits))
    if args.json:
        files.write_json(args.json, result, '--json')
    print(json.dumps(result))
    return result


def main(framework: str, make_forward: Callable[[ViTConfig, dict], cli.Forward],
         argv: Optional[Sequence[str]] = None) -> int:
    """`python -m FRAMEWORK eval ...`: `make_forward` builds the framework's model, set up for true float32."""
    parser = argparse.ArgumentParser(prog=f'python -m {framework} eval', description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    cli.check_outputs({'--json': args.json, '--logits': args.logits}, [args.checkpoint], [args.config])
    model = cli.load_model(args.checkpoint, args.config, args.image_size, numerics=args.numerics)
    run_eval(args, framework, make_forward(model.cfg, model.params), model.cfg, model.checkpoint.labels)
    return 0

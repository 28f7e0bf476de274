"""`python -m vit_jax models` (and vit_torch's): the catalogue of Google's checkpoints, AugReg's index, the cache.

    models [FILTER] [--json]        the catalogue (parity.core.catalogue), rows whose name, architecture,
                                    data or filename contain FILTER
    models --augreg [--name B/16] [--ds i21k] [--aug ...] [--wd ...] [--sd ...] [--do ...]
           [--adapt-ds cifar100] [--adapt-resolution 384] [--best upstream|adapt]
                                    AugReg's index.csv (downloaded once into the cache), filtered on its
                                    columns and ranked as the official code ranks it
    models --cached / --prune       what the download cache holds / delete its partial downloads
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from parity.cli import remote
from parity.cli.contract import say
from parity.core import catalogue
from parity.core.errors import UserError

EPILOG = """\
Names: CONFIG@DATA, e.g. ViT-B_16@imagenet21k, ViT-B_16-224@imagenet21k+imagenet2012, ViT-B_16@sam,
ViT-B_16@augreg-i21k (AugReg's recommended pre-training) and ViT-B_16@augreg-i21k+imagenet2012 (its ImageNet
fine-tune). Every command that reads a checkpoint takes a name, an AugReg filename (--augreg lists them), a
gs://vit_models/... or https:// URL, hf-hub:ORG/NAME[@REVISION] or timm/NAME.

--augreg ranking, as the official code: without --adapt-ds/--adapt-resolution, the pre-training files by
final_val (upstream validation accuracy), best first; with them, the fine-tunes by adapt_final_val. --best upstream
prints the file vit_jax's augreg config picks (ds i21k unless --ds says, the best final_val); --best adapt the best
fine-tune (by adapt_final_val) of each model's recommended pre-training (the AugReg colab's best_filenames).

The cache is $VIT_MIRROR_CACHE (default ~/.cache/vit-mirror); downloads come from $VIT_MIRROR_GCS_URL (default
https://storage.googleapis.com)."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The catalogue, AugReg's index or the cache, as a table (or JSON with --json) on stdout."""
    p = argparse.ArgumentParser(prog='models', description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument('filter', nargs='?', metavar='FILTER', help='only rows whose name, architecture, data or filename '
                   'contain this (case-insensitive)')
    p.add_argument('--json', action='store_true', help='JSON on stdout, for scripts')
    p.add_argument('--cached', action='store_true', help='list the files in the download cache')
    p.add_argument('--prune', action='store_true', help='delete the partial downloads (.part) in the cache')
    remote.add_offline_argument(p)
    a = p.add_argument_group('AugReg\'s index.csv (--augreg)')
    a.add_argument('--augreg', action='store_true', help='list AugReg\'s pre-trainings and fine-tunes from index.csv')
    a.add_argument('--name', help='model, as index.csv writes it: Ti/16, S/16, B/16, R26+S/32, ...')
    a.add_argument('--ds', help='pre-training data: i1k, i21k, i21k_30')
    a.add_argument('--aug', help='augmentation: none, light1, light2, medium1, medium2, strong1, strong2')
    a.add_argument('--wd', type=float, help='pre-training weight decay')
    a.add_argument('--sd', type=float, help='pre-training stochastic depth')
    a.add_argument('--do', type=float, help='pre-training dropout')
    a.add_argument('--adapt-ds', help='fine-tuning data: imagenet2012, cifar100, oxford_iiit_pet, ...')
    a.add_argument('--adapt-resolution', type=int, help='fine-tuning resolution: 224 or 384')
    a.add_argument('--best', choices=('upstream', 'adapt'), help='print only the best filename (see below)')
    args = p.parse_args(argv)
    augreg_flags = [f for f in ('name', 'ds', 'aug', 'wd', 'sd', 'do', 'adapt_ds', 'adapt_resolution', 'best')
                    if getattr(args, f) is not None]
    if augreg_flags and not args.augreg:
        raise UserError(f'--{augreg_flags[0].replace("_", "-")} filters AugReg\'s index: add --augreg')
    if args.best == 'adapt' and args.adapt_ds is None:
        raise UserError('--best adapt ranks fine-tunes of one dataset: add --adapt-ds (imagenet2012, cifar100, '
                        'oxford_iiit_pet, ...)')
    if args.prune:
        removed = remote.prune()
        for name in removed:
            print(name)
        say(f'removed {len(removed)} partial download{"s" if len(removed) != 1 else ""} from {remote.cache_dir()}')
        return 0
    if args.cached:
        return _cached(args)
    if args.augreg:
        return _augreg(args)
    rows = catalogue.matching(args.filter)
    if args.json:
        print(json.dumps([catalogue.as_dict(r) for r in rows], indent=1))
        return 0
    if not rows:
        raise UserError(f'no catalogue row matches {args.filter!r}; `models` alone lists them all')
    _table(['name', 'architecture', 'fine-tuned on', 'res', 'top-1', 'MiB'],
           [[r.name, r.architecture, r.finetune or '-', _s(r.resolution), _s(r.top1, '{:.2f}'),
             _s(r.size_mib, '{:.0f}')] for r in rows])
    say(f'{len(rows)} checkpoints; --json for the URLs and the sources of the numbers')
    return 0


def _s(value, fmt: str = '{}') -> str:
    return '-' if value is None else fmt.format(value)


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(x) for x in column) for column in zip(header, *rows)]
    for line in [header, *rows]:
        print('  '.join(x.ljust(w) for x, w in zip(line, widths)).rstrip())


def _cached(args) -> int:
    files = [(path, size) for path, size in remote.cached() if not args.filter or args.filter.lower() in path.lower()]
    if args.json:
        print(json.dumps([{'path': os.path.join(remote.cache_dir(), p), 'bytes': s} for p, s in files], indent=1))
        return 0
    for path, size in files:
        print(f'{size / 2**20:10.1f} MiB  {path}')
    say(f'{len(files)} files in {remote.cache_dir()}')
    return 0


def augreg_index() -> list[dict]:
    """index.csv's rows, downloaded into the cache the first time."""
    key = catalogue.AUGREG_INDEX
    path = remote.fetch(f'{remote.gcs_base()}/{key}', os.path.join('gs', key))
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
        return catalogue.read_augreg_index(text, path)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f'{path}: cannot read AugReg\'s index ({e}); delete it and run again') from None


def _augreg(args) -> int:
    rows = augreg_index()
    adapt = args.adapt_ds is not None or args.adapt_resolution is not None or args.best == 'adapt'
    wanted = dict(name=args.name, aug=args.aug, wd=args.wd, sd=args.sd, do=args.do, adapt_ds=args.adapt_ds,
                  adapt_resolution=args.adapt_resolution)
    if args.best:
        # The official picks are among i21k pre-trainings unless --ds says otherwise.
        pool = catalogue.filter_augreg(rows, ds=args.ds or 'i21k', **{k: v for k, v in wanted.items()
                                                                       if not k.startswith('adapt')})
        if args.best == 'upstream':
            ranked = catalogue.rank_upstream(pool)
            best = ranked[0]['filename'] if ranked else None
        else:
            recommended = catalogue.recommended_upstream(pool)
            chosen = [r for r in catalogue.filter_augreg(rows, **wanted, ds=args.ds or 'i21k')
                      if r['filename'] in recommended]
            ranked = catalogue.rank_adapt(chosen)
            best = ranked[0]['adapt_filename'] if ranked else None
        if best is None:
            raise UserError('no AugReg checkpoint matches these filters; drop one (`models --augreg` lists them)')
        print(best)
        return 0
    found = catalogue.filter_augreg(rows, ds=args.ds, **wanted)
    if args.filter:
        found = [r for r in found if args.filter.lower() in (r['adapt_filename'] if adapt else r['filename']).lower()]
    ranked = catalogue.rank_adapt(found) if adapt else catalogue.rank_upstream(found)
    if args.json:
        print(json.dumps(ranked, indent=1))
        return 0
    if not ranked:
        raise UserError('no AugReg checkpoint matches these filters; drop one (`models --augreg` lists them)')
    if adapt:
        _table(['adapt_final_val', 'adapt_final_test', 'adapt_ds', 'res', 'adapt_filename'],
               [[r['adapt_final_val'], r['adapt_final_test'], r['adapt_ds'], r['adapt_resolution'],
                 r['adapt_filename']] for r in ranked])
    else:
        _table(['final_val', 'final_test', 'name', 'ds', 'filename'],
               [[r['final_val'], r['final_test'], r['name'], r['ds'], r['filename']] for r in ranked])
    say(f'{len(ranked)} {"fine-tunes" if adapt else "pre-trainings"}, best first; each name works as a checkpoint')
    sys.stdout.flush()
    return 0

"""Class names of the heads `predict` and `explain` print: the bundled lists, or a file of the user's.

The bundled lists ship in `parity/data/labels/` (see the README there): ImageNet-2012 for
a 1000-class head and ImageNet-21k for a 21843-class head, in the official heads' order.
"""

from __future__ import annotations

import os
from importlib import resources
from typing import Optional, Sequence

from parity.core.errors import UserError
from parity.core.limits import check_text

# Which bundled list names a head of this size.
BUNDLED = {1000: 'imagenet2012', 21843: 'imagenet21k'}


def bundled_labels(name: str) -> list[str]:
    """One of the class-name lists that ship with the package (`imagenet2012`, `imagenet21k`)."""
    if name not in BUNDLED.values():
        raise UserError(f'--labels {name}: no such file, nor a bundled list ({", ".join(BUNDLED.values())})')
    return _read_names(resources.files('parity.data').joinpath('labels', f'{name}.txt').read_text('utf-8'))


def _read_names(text: str) -> list[str]:
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:  # a trailing blank line is not a class
        names.pop()
    return names


def labels_for(num_classes: int, spec: Optional[str] = None) -> tuple[list[str], str]:
    """Class names for a head of `num_classes`, and where they came from.

    `spec` is a text file (one name per line) or a bundled list's name. Without it the
    head size picks: 1000 -> imagenet2012, 21843 -> imagenet21k, otherwise class indices.
    """
    if spec is None:
        if num_classes in BUNDLED:
            return bundled_labels(BUNDLED[num_classes]), BUNDLED[num_classes]
        return [f'class {i}' for i in range(num_classes)], 'class indices (pass --labels FILE for names)'
    if os.path.isfile(spec):
        check_text(spec, f'--labels {spec}')
        try:
            with open(spec, encoding='utf-8') as f:
                names = _read_names(f.read())
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f'--labels {spec}: cannot read it as UTF-8 text ({e})') from None
        source = spec
    else:
        names, source = bundled_labels(spec), spec
    if len(names) != num_classes:
        raise UserError(f'--labels {spec}: {len(names)} names for a head of {num_classes} classes; '
                        'pass a list with one name per line for every class, in logit order')
    return names, source


def change(before: Sequence[str], now: Sequence[str]) -> str:
    """The classes added and missing between two lists of names, in words (or that only their order moved)."""
    added, missing = [c for c in now if c not in set(before)], [c for c in before if c not in set(now)]
    if not added and not missing:
        return 'the same classes in another order, so every logit would mean another class'

    def some(names):
        return ', '.join(names[:5]) + (f' and {len(names) - 5} more' if len(names) > 5 else '')

    return '; '.join(part for part in (f'added {some(added)}' if added else '',
                                       f'missing {some(missing)}' if missing else '') if part)

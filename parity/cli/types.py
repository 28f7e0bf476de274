"""The argparse types of every command: a bad value is argparse's usage error, naming the flag and the range."""

from __future__ import annotations

import argparse
import math
from typing import Callable


def _finite(text: str, ok: Callable[[float], bool], what: str) -> float:
    """`text` as a finite number for which `ok` holds; else argparse's error, `what` saying the range."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f'{text}: must be a finite number {what}')
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0 (a learning rate, a timeout)."""
    return _finite(text, lambda v: v > 0, 'above 0')


def _whole(text: str) -> int:
    """`text` as a whole number; else argparse's error."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a whole number') from None


def seed_int(text: str) -> int:
    """An argparse type: a random seed, a whole number in 0 .. 2**32 - 1 (what every generator takes)."""
    value = _whole(text)
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f'{value}: a seed is a whole number from 0 to {2 ** 32 - 1}')
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'{value}: must be at least 1')
    return value

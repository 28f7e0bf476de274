"""The tolerance policy: when two tensors count as the same, written down once and used everywhere.

fp32 (float32, JAX `highest` matmul precision, TF32 off in PyTorch): every tensor agrees
to within 1e-5 times max(1, max |reference|), the max-abs difference of the whole tensor
against that bound. A faithful implementation lands near 1e-6; the factor 10 is headroom
for summation order, not for different numerics (tanh vs erf GELU alone costs ~1e-4).

tf32 and bf16 round every matmul operand to 10 and 7 mantissa bits, so no element-wise
bound can tell a bug from rounding; there the verdict rests on top-1 agreement. Each
tensor is still held to a looser bound (below, as the same multiple of
max(1, max |reference|)), so a gross error cannot pass on a lucky argmax, and every
image's top-1 class must agree -- unless the reference's own margin between the two
classes is within the logit bound, which is a tie, not a disagreement.

Gradients sum over every token and image of the batch, so their rounding grows with
the batch; they get 1e-4 (float32) instead of 1e-5. Parameters after an update step
are activations again: 1e-5.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class Policy:
    """How closely a candidate must follow the reference at one precision."""

    name: str
    rtol: float  # max-abs bound as a multiple of max(1, max |reference|)
    grad_rtol: float  # the same for gradients
    top1_verdict: bool  # the verdict rests on top-1 agreement (reduced precision)
    what: str  # one line for people


POLICIES = {
    'fp32': Policy('fp32', 1e-5, 1e-4, False,
                   'float32, highest matmul precision, TF32 off: within 1e-5 x max(1, max |reference|) per tensor'),
    'tf32': Policy('tf32', 1e-2, 1e-1, True,
                   'TF32 matmuls: within 1e-2 x max(1, max |reference|) per tensor, and top-1 agreement'),
    'bf16': Policy('bf16', 1e-1, 1.0, True,
                   'bfloat16 compute: within 1e-1 x max(1, max |reference|) per tensor, and top-1 agreement'),
}
PRECISIONS = tuple(POLICIES)

# Preprocessed pixels (the `pixels` row): the same resize and normalisation in float32 differ only by
# float32 rounding (~1e-7); one uint8 level apart is ~8e-3 in [-1, 1], so 1e-6 separates the two cleanly.
PIXELS_RTOL = 1e-6


def policy(precision: str = 'fp32') -> Policy:
    """The policy of one precision: 'fp32', 'tf32' or 'bf16'."""
    return POLICIES[precision]


def scale(reference) -> float:
    """max(1, max |reference|): what every bound is a multiple of."""
    ref = np.asarray(reference, dtype=np.float64)
    return max(1.0, float(np.abs(ref).max())) if ref.size else 1.0


def bound(reference, precision: str = 'fp32') -> float:
    """The largest max-abs difference from `reference` that counts as agreement."""
    return POLICIES[precision].rtol * scale(reference)


def grad_bound(reference, precision: str = 'fp32') -> float:
    """The same for a gradient."""
    return POLICIES[precision].grad_rtol * scale(reference)


def within(reference, candidate, precision: str = 'fp32') -> bool:
    """True when `candidate` agrees with `reference` under the policy (shapes must match)."""
    ref, got = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if ref.shape != got.shape or not np.isfinite(got).all():
        return False
    return float(np.abs(ref - got).max(initial=0.0)) <= bound(ref, precision)


def measure(name: str, reference, candidate, rtol: float) -> dict:
    """One row of a comparison: the JSON fields, plus the bound and whether it holds.

    `rel_diff` is max_abs_diff / max(1, max |reference|): the quantity `rtol` bounds.
    A candidate of another shape, or holding NaN/inf, fails with nulls for the numbers.
    """
    ref = np.asarray(reference, np.float64)
    got = np.asarray(candidate, np.float64)
    row = {'name': name, 'shape': list(ref.shape), 'max_abs_diff': None, 'rel_diff': None, 'cosine': None,
           'bound': rtol * scale(ref), 'ok': False}
    if got.shape != ref.shape:
        row['candidate_shape'] = list(got.shape)
        return row
    if not np.isfinite(got).all():
        row['note'] = 'candidate holds NaN or inf'
        return row
    diff = float(np.abs(ref - got).max(initial=0.0))
    row.update(max_abs_diff=diff, rel_diff=diff / scale(ref), cosine=cosine(ref, got), ok=diff <= row['bound'])
    return row


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of the flattened tensors (1.0 for two zero tensors)."""
    a, b = a.ravel(), b.ravel()
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))


def topk_agreement(reference: np.ndarray, candidate: np.ndarray, k: int) -> Optional[float]:
    """Fraction of rows whose top-k class sets agree (order ignored); None without classes."""
    ref, got = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if ref.shape != got.shape or ref.ndim < 2 or ref.shape[-1] < 1 or not np.isfinite(got).all():
        return None
    k = min(k, ref.shape[-1])
    ref, got = ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1])
    a = np.sort(np.argsort(-ref, axis=-1, kind='stable')[:, :k], axis=-1)
    b = np.sort(np.argsort(-got, axis=-1, kind='stable')[:, :k], axis=-1)
    return float((a == b).all(axis=-1).mean())


def top1_disagreements(reference: np.ndarray, candidate: np.ndarray, precision: str = 'fp32') -> int:
    """Rows whose top-1 classes differ, not counting ties.

    A tie: the reference's own logits of the two classes are within the logit bound of
    each other, so either pick is right at this precision.
    """
    ref, got = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if ref.shape != got.shape or ref.ndim < 2 or not np.isfinite(got).all():
        return max(1, ref.size // max(ref.shape[-1], 1))
    ref, got = ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1])
    rows = np.arange(len(ref))
    mine, theirs = ref.argmax(-1), got.argmax(-1)
    margin = ref[rows, mine] - ref[rows, theirs]
    return int(((mine != theirs) & (margin > bound(ref, precision))).sum())

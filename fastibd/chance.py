"""Chance accuracy with its sampling noise: the accuracy below which a classifier cannot be
told from one that guesses."""

from __future__ import annotations

import math

import torch

FALSE_ALARM = 1e-6  # chance of flagging a guesser's lucky run as "above chance"
CHANCE_FACTOR = 1.5  # never call anything below 1.5x chance "above chance"


def chance_bound(n: int, num_classes: int, false_alarm: float = FALSE_ALARM) -> float:
    """Accuracy on `n` examples that guessing among `num_classes` classes exceeds with
    probability at most `false_alarm` (the upper quantile of Binomial(n, 1/num_classes), as a
    fraction of n), and at least 1.5x chance: a large set then still flags a model barely
    above guessing (a wrong normalization often lands there)."""
    p = 1 / num_classes
    if n < 1 or num_classes < 2:
        return CHANCE_FACTOR * p
    above = int((_log_tail(n, p) > math.log(false_alarm)).sum())  # smallest k, tail <= alarm
    return max(above / n, CHANCE_FACTOR * p)


def sign_test(more: int, fewer: int) -> float:
    """One-sided sign test: P(X >= more) for X ~ Binomial(more + fewer, 1/2), i.e. how often
    two equally strong procedures that disagree on more + fewer examples split them at least
    this unevenly."""
    if more <= 0:
        return 1.0
    return math.exp(float(_log_tail(more + fewer, 0.5)[more]))


def _log_tail(n: int, p: float) -> torch.Tensor:
    """log P(X >= k) for k = 0..n, X ~ Binomial(n, p) (in log space: n may be thousands)."""
    k = torch.arange(n + 1, dtype=torch.float64)
    log_pmf = (math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
               + k * math.log(p) + (n - k) * math.log1p(-p))
    return torch.logcumsumexp(log_pmf.flip(0), 0).flip(0)

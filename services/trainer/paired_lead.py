"""How far the student is ahead of another trained model on the same held-out answers, and how sure that
is: the difference of a per-token figure (KL, top-1 agreement), with a paired bootstrap interval that
resamples whole answers, since the tokens of one answer are not independent of each other."""

from __future__ import annotations

import numpy as np
from scipy.stats import bootstrap

from stillhouse.trainer.run_config import PairedLead

CONFIDENCE = 0.95
RESAMPLES = 9_999
# Resamples drawn at once: bounds the memory to about this many times the answers, in floats.
RESAMPLE_BATCH = 200


def per_token_lead(
    student: np.ndarray, other: np.ndarray, tokens: np.ndarray, *, seed: int = 0
) -> PairedLead | None:
    """The lead of sum(student) / sum(tokens) over sum(other) / sum(tokens), where each array holds one
    value per answer (a figure summed over that answer's tokens, and its token count). None with fewer
    than two answers or no token: nothing to resample."""
    if len(tokens) < 2 or tokens.sum() == 0:
        return None

    def difference(student: np.ndarray, other: np.ndarray, tokens: np.ndarray, axis: int = -1) -> np.ndarray:
        return (student.sum(axis=axis) - other.sum(axis=axis)) / np.maximum(tokens.sum(axis=axis), 1)

    result = bootstrap(
        (student, other, tokens),
        difference,
        paired=True,
        vectorized=True,
        n_resamples=RESAMPLES,
        batch=RESAMPLE_BATCH,
        confidence_level=CONFIDENCE,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    interval = result.confidence_interval
    return PairedLead(
        difference=float(difference(student, other, tokens)),
        low=float(interval.low),
        high=float(interval.high),
    )

"""Per-clip motion diagnostics: L1 diversity, frame-to-frame change, jumps at window boundaries."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from gesture.layout import PARTS, SUB_SLICES
from gesture.metrics.beats import EPS

# Per-part velocity ratios. "global" is the global rotation only: foot contact is a 0/1 label, not a motion.
VELOCITY_PARTS: dict[str, slice] = {"body": PARTS["body"], "hand": PARTS["hand"], "face": PARTS["face"],
                                    "global": SUB_SLICES["global_rot"]}
# Dims whose frame-to-frame change measures a jump (everything but the contact labels).
MOTION_DIMS = np.concatenate([np.arange(s.start, s.stop) for s in VELOCITY_PARTS.values()])


def l1_diversity_sum(x: np.ndarray) -> float:
    """EMAGE's L1div numerator for one clip: ``x [T, D] -> sum_t sum_d |x - mean_t x|`` (divide by frames)."""
    x = np.asarray(x, np.float64)
    return float(np.abs(x - x.mean(axis=0, keepdims=True)).sum())


def l1_diversity(x: np.ndarray) -> float:
    """L1div of one clip: mean over frames of the summed absolute deviation from the temporal mean."""
    return l1_diversity_sum(x) / np.asarray(x).shape[0]


def frame_change(x: np.ndarray) -> np.ndarray:
    """``x [T, D] -> [T]``: mean |x_t - x_{t-1}| over dims, entry t is the change INTO frame t (entry 0 is NaN)."""
    x = np.asarray(x, np.float64)
    return np.concatenate([[math.nan], np.abs(np.diff(x, axis=0)).mean(axis=1)])


def boundary_jumps(x: np.ndarray, boundaries: Sequence[int]) -> np.ndarray:
    """Change into each boundary frame relative to the median change elsewhere: ``x [T, D] -> [len(boundaries)]``.

    ``boundaries`` are frame indices ``1 <= b < T`` where a new generated window takes over; about 1 = seamless,
    a generator that wrote its windows back into the ground truth in place shows as large values every window.
    """
    change = frame_change(x)
    t = change.shape[0]
    idx = np.asarray(sorted({int(b) for b in boundaries}), dtype=np.int64)
    if idx.size and (idx.min() < 1 or idx.max() >= t):
        raise ValueError(f"boundary_jumps: boundaries must lie in [1, {t}), got {idx.tolist()}")
    rest = np.ones(t, dtype=bool)
    rest[0] = False
    rest[idx] = False
    ref = float(np.median(change[rest])) if rest.any() else math.nan
    if not ref > EPS:
        return np.full(idx.size, math.nan)
    return change[idx] / ref

"""MambaTalk's training masks: the seed-only pass and the random value masks with their ratio schedule."""

from __future__ import annotations

import torch

from gesture.layout import POSE_DIM


def mask_ratio(progress: float, start: float = 0.05, end: float = 1.0) -> float:
    """MambaTalk's random-mask ratio: linear from ``start`` to ``end`` over training (``progress`` in [0, 1])."""
    return start + (end - start) * min(max(progress, 0.0), 1.0)


def seed_mask(b: int, t: int, pre_frames: int, device=None) -> torch.Tensor:
    """Mask of the seed-only pass: everything after the first ``pre_frames`` frames -> ``[b, t, 320]`` bool."""
    mask = torch.ones(b, t, POSE_DIM, dtype=torch.bool, device=device)
    mask[:, :pre_frames] = False
    return mask


def random_mask(b: int, t: int, ratio: float, device=None, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Each value masked with probability ``ratio`` (MambaTalk masks values, not frames) -> ``[b, t, 320]``."""
    return torch.rand(b, t, POSE_DIM, device=device, generator=generator) < ratio

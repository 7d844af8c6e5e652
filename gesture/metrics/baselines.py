"""The reference motions a model must beat (ground truth, another clip of the same speaker, the mean pose,
spectrum-matched noise), scored with the model's metrics, and their side-by-side text table."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gesture.layout import SUB_SLICES
from gesture.metrics.collection import (
    GestureMetrics,
)
from gesture.metrics.motion import (
    EPS,
)

log = logging.getLogger(__name__)


BASELINES: tuple[str, ...] = ("gt", "same_speaker", "mean_pose", "random")


@dataclass(frozen=True)
class EvalClip:
    """One whole test clip for ``evaluate_baselines``: raw ``motion [T, 320]`` and its audio (wave or onsets)."""

    name: str
    motion: np.ndarray
    speaker: int
    wave: np.ndarray | None = None
    sr: int = 16000
    onsets: np.ndarray | None = None
    fps: float = 30.0


def _fit_length(x: np.ndarray, t: int, rng: np.random.Generator) -> np.ndarray:
    """Random crop of ``x [T', D]`` to ``t`` frames, or ``x`` repeated until it is long enough."""
    if x.shape[0] >= t:
        start = int(rng.integers(0, x.shape[0] - t + 1))
        return x[start:start + t].copy()
    reps = -(-t // x.shape[0])
    return np.concatenate([x] * reps)[:t]


def baseline_motion(kind: str, clip: EvalClip, pool: Sequence[EvalClip], mean: np.ndarray, std: np.ndarray,
                    rng: np.random.Generator) -> np.ndarray:
    """A reference "prediction" for ``clip`` -> ``[T, 320]``.

    ``gt``: the clip itself (FGD 0, ratios 1; its BC is the data's own). ``same_speaker``: another real clip of the
    same speaker from ``pool`` (any other clip if it has none), cropped / repeated to length: real motion, wrong
    audio. ``mean_pose``: the training mean every frame.
    ``random``: smooth random motion with no relation to the audio: per dim, Gaussian noise low-passed in time
    (Gaussian kernel), around the training ``mean`` with the clip's own std; per group (body, each hand,
    expression, jaw, global rotation) the kernel width is found by bisection so that the group's mean
    frame-to-frame change equals the clip's (velocity ratios ~1). Same size and smoothness as the real motion,
    random timing. Foot contact: low-passed noise thresholded to the training contact rate. (i.i.d. frames would
    be a degenerate reference for beat consistency: a speed minimum every few frames puts one near every onset.)
    ``std`` (the training std) is not used by any kind; it stays for the callers' signature.
    """
    t = clip.motion.shape[0]
    if kind == "gt":
        return np.array(clip.motion, np.float64)
    if kind == "same_speaker":
        others = [c for c in pool if c.name != clip.name and c.speaker == clip.speaker]
        if not others:
            others = [c for c in pool if c.name != clip.name]
            log.info("baseline same_speaker: %s has no other clip of speaker %s; using another speaker",
                     clip.name, clip.speaker)
        if not others:
            raise ValueError("baseline same_speaker needs at least two clips")
        other = others[int(rng.integers(0, len(others)))]
        return _fit_length(np.asarray(other.motion, np.float64), t, rng)
    mean = np.asarray(mean, np.float64)
    if kind == "mean_pose":
        return np.repeat(mean[None], t, axis=0)
    if kind != "random":
        raise ValueError(f"unknown baseline {kind!r}; choose from {BASELINES}")

    gt = np.asarray(clip.motion, np.float64)
    span = 2 * t  # noise on twice the length, circularly filtered, then cut: no wrap-around inside the clip
    white = rng.standard_normal((span, mean.shape[0]))
    freq = np.fft.rfftfreq(span)  # cycles per frame

    def unit_noise(spectrum: np.ndarray, width: float) -> np.ndarray:
        """White-noise ``spectrum`` -> Gaussian low-pass of ``width`` frames, first ``t`` frames, zero mean, unit
        std per dim."""
        z = np.fft.irfft(spectrum * np.exp(-0.5 * (2 * np.pi * freq[:, None] * width) ** 2), n=span, axis=0)[:t]
        z = z - z.mean(axis=0)
        return z / np.maximum(z.std(axis=0), EPS)

    def change_per_frame(x: np.ndarray) -> float:  # mean over frames of sum_d |x_t - x_{t-1}|
        return float(np.abs(np.diff(x, axis=0)).sum(axis=1).mean()) if x.shape[0] > 1 else 0.0

    def matched_noise(spectrum: np.ndarray, amp: np.ndarray, target: float) -> np.ndarray:
        """Low-passed noise of std ``amp [d]`` whose change per frame is ``target``: bisection on the log kernel
        width (the change falls as the width grows); the sharpest kernel if even that changes too slowly."""
        lo, hi = math.log(0.3), math.log(span)
        if change_per_frame(unit_noise(spectrum, math.exp(lo)) * amp) > target:
            for _ in range(20):
                mid = (lo + hi) / 2
                too_fast = change_per_frame(unit_noise(spectrum, math.exp(mid)) * amp) > target
                lo, hi = (mid, hi) if too_fast else (lo, mid)
        return unit_noise(spectrum, math.exp(lo)) * amp

    out = np.repeat(mean[None], t, axis=0)
    for group in ("body", "hand_left", "hand_right", "expr", "jaw", "global_rot"):
        s = SUB_SLICES[group]
        target = change_per_frame(gt[:, s])
        if target > EPS:
            out[:, s] += matched_noise(np.fft.rfft(white[:, s], axis=0), gt[:, s].std(axis=0), target)
    contact = SUB_SLICES["contact"]
    ranks = unit_noise(np.fft.rfft(white[:, contact], axis=0), 3.0).argsort(axis=0).argsort(axis=0)
    out[:, contact] = (ranks < np.round(np.clip(mean[contact], 0.0, 1.0) * t)).astype(np.float64)
    return out


def evaluate_baselines(
    clips: Sequence[EvalClip],
    mean: np.ndarray,
    std: np.ndarray,
    make_metrics: Callable[[], GestureMetrics],
    kinds: Iterable[str] = BASELINES,
    pool: Sequence[EvalClip] | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Score each baseline of ``kinds`` against every clip's ground truth -> ``{kind: metrics}``.

    ``mean``, ``std`` ``[320]``: raw training statistics. ``make_metrics`` builds a fresh ``GestureMetrics`` (same
    settings as the model's). ``pool``: where ``same_speaker`` draws real motion (e.g. the training clips;
    default ``clips``). Runs on one process (no DDP gather).
    """
    results = {}
    for kind in kinds:
        rng = np.random.default_rng(seed)
        metrics = make_metrics()
        for clip in clips:
            pred = baseline_motion(kind, clip, clips if pool is None else pool, mean, std, rng)
            metrics.update(pred, clip.motion, wave=clip.wave, sr=clip.sr, onsets=clip.onsets, fps=clip.fps,
                           names=clip.name)
        results[kind] = metrics.compute(sync=False)
    return results


def format_comparison(columns: Mapping[str, Mapping[str, float]]) -> str:
    """A plain-text table, metrics as rows and ``columns`` (e.g. ``{"model": ..., **baselines}``) side by side."""
    keys = sorted({k for metrics in columns.values() for k in metrics})
    names = list(columns)
    width = max([len(k) for k in keys] + [6]) + 2
    lines = ["metric".ljust(width) + "".join(n.rjust(14) for n in names)]
    for k in keys:
        cells = "".join((f"{columns[n][k]:.4g}" if k in columns[n] else "-").rjust(14) for n in names)
        lines.append(k.ljust(width) + cells)
    return "\n".join(lines)

"""Beat consistency (EMAGE's definition): audio onsets, motion beats as speed minima, their alignment."""

from __future__ import annotations

import math
from collections.abc import Mapping

import librosa
import numpy as np
from scipy.signal import argrelextrema

from gesture.layout import SUB_SLICES

EPS = 1e-12
# Speed groups for beat consistency and the dims of L1 diversity when no skeleton is configured.
BC_PARAM_GROUPS: dict[str, slice] = {k: SUB_SLICES[k] for k in ("body", "hand_left", "hand_right")}


def audio_onsets(wave: np.ndarray, sr: int, hop_length: int = 512) -> np.ndarray:
    """Onset times in seconds ``wave [S] -> [K]`` (librosa, EMAGE's hop of 512 samples)."""
    y = np.asarray(wave, dtype=np.float32).reshape(-1)
    return librosa.onset.onset_detect(y=y, sr=sr, hop_length=hop_length, units="time").astype(np.float64)


def group_speed(x: np.ndarray, fps: float, groups: Mapping[str, slice] | None = None) -> np.ndarray:
    """Speed per group, ``x [T, D]`` with ``groups`` (param slices) or joints ``x [T, J, 3]`` -> ``[T, G]``.

    Velocity as EMAGE: central differences inside, one-sided at the ends (``np.gradient``), in units per second.
    """
    x = np.asarray(x, np.float64)
    if x.shape[0] < 2:
        raise ValueError(f"group_speed: need at least 2 frames, got shape {x.shape}")
    vel = np.gradient(x, axis=0) * fps
    if groups is None:
        if x.ndim != 3 or x.shape[-1] != 3:
            raise ValueError(f"group_speed: joints must be [T, J, 3], got {x.shape} (or pass param groups)")
        return np.linalg.norm(vel, axis=-1)
    if x.ndim != 2:
        raise ValueError(f"group_speed: params must be [T, D], got {x.shape}")
    return np.stack([np.linalg.norm(vel[:, s], axis=-1) for s in groups.values()], axis=1)


def motion_beats(speed: np.ndarray, scale: np.ndarray, order: int = 7, threshold: float = 0.3, skip: int = 60
                 ) -> list[np.ndarray]:
    """Motion beats per group: local minima of the normalised speed, ``speed [T, G], scale [G]`` -> G x frames.

    A beat is a frame of ``[skip, T - skip)`` that is a strict local minimum over ``order`` frames each side
    (``scipy.signal.argrelextrema``) while the normalised speed ``speed / scale`` is still above ``threshold``
    (a still body has no beats). EMAGE tested the threshold mask with absolute indices against minima indices
    relative to the crop; here both use absolute frames.
    """
    speed = np.asarray(speed, np.float64)
    scale = np.asarray(scale, np.float64)
    if speed.ndim != 2 or scale.shape != (speed.shape[1],):
        raise ValueError(f"motion_beats: speed [T, G] and scale [G], got {speed.shape} and {scale.shape}")
    norm = speed / np.maximum(scale, EPS)
    stop = speed.shape[0] - skip
    beats = []
    for g in range(speed.shape[1]):
        if stop - skip < 3:
            beats.append(np.zeros(0, dtype=np.int64))
            continue
        minima = argrelextrema(norm[skip:stop, g], np.less, order=order)[0] + skip
        beats.append(minima[norm[minima, g] > threshold].astype(np.int64))
    return beats


def alignment_score(motion_times: np.ndarray, onset_times: np.ndarray, sigma: float = 0.3) -> float:
    """EMAGE's ``GAHR``: mean over audio onsets of ``exp(-d^2 / (2 sigma^2))``, ``d`` = seconds to the nearest
    motion beat (0 for an onset with no beat at all); NaN when there is no onset."""
    onsets = np.asarray(onset_times, np.float64).reshape(-1)
    beats = np.asarray(motion_times, np.float64).reshape(-1)
    if onsets.size == 0:
        return math.nan
    if beats.size == 0:
        return 0.0
    d = np.abs(onsets[:, None] - beats[None, :]).min(axis=1)
    return float(np.exp(-(d**2) / (2 * sigma**2)).mean())


def beat_consistency(
    x: np.ndarray,
    onsets: np.ndarray,
    fps: float,
    groups: Mapping[str, slice] | None = BC_PARAM_GROUPS,
    scale: np.ndarray | None = None,
    sigma: float = 0.3,
    order: int = 7,
    threshold: float = 0.3,
    skip: int = 60,
) -> float:
    """BC of one clip: ``x [T, 320]`` params (``groups``) or joints ``[T, J, 3]`` (``groups=None``), onsets in
    seconds -> mean over speed groups of ``alignment_score``; NaN if no onset lies in ``[skip, T - skip)`` frames.

    ``scale [G]`` normalises each group's speed (EMAGE: the training set's mean joint speed); ``None`` uses this
    clip's own mean speed. Onsets and beats outside the ``skip`` margins are ignored (EMAGE: 60 frames).
    """
    speed = group_speed(x, fps, groups)
    scale = speed.mean(axis=0) if scale is None else np.asarray(scale, np.float64)
    t = speed.shape[0]
    onsets = np.asarray(onsets, np.float64).reshape(-1)
    onsets = onsets[(onsets >= skip / fps) & (onsets < (t - skip) / fps)]
    if onsets.size == 0:
        return math.nan
    beats = motion_beats(speed, scale, order=order, threshold=threshold, skip=skip)
    return float(np.mean([alignment_score(b / fps, onsets, sigma) for b in beats]))

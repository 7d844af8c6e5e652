"""Co-speech gesture metrics on the 320-d MHR layout: FGD (Fréchet distance of motion-encoder features), beat
consistency (EMAGE's definition), L1 diversity, face errors and the seed-002 diagnostics (per-part velocity ratios,
global rotation spread, jumps at window boundaries). ``GestureMetrics`` accumulates clips and gathers them over
DDP ranks; ``evaluate_baselines`` scores the reference motions a model must beat. numpy float64; no training code.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import librosa
import numpy as np
import torch
import torch.distributed as dist
from scipy.signal import argrelextrema

from gesture.feature_encoder import EncoderLoadError, MotionEncoder, load_motion_encoder
from gesture.layout import PARTS, POSE_DIM, SUB_SLICES

log = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor
JointsFn = Callable[[np.ndarray], np.ndarray]  # motion [T, 320] raw -> joints [T, J, 3]

# Speed groups for beat consistency and the dims of L1 diversity when no skeleton is configured.
BC_PARAM_GROUPS: dict[str, slice] = {k: SUB_SLICES[k] for k in ("body", "hand_left", "hand_right")}
# Per-part velocity ratios. "global" is the global rotation only: foot contact is a 0/1 label, not a motion.
VELOCITY_PARTS: dict[str, slice] = {"body": PARTS["body"], "hand": PARTS["hand"], "face": PARTS["face"],
                                    "global": SUB_SLICES["global_rot"]}
# Dims whose frame-to-frame change measures a jump (everything but the contact labels).
MOTION_DIMS = np.concatenate([np.arange(s.start, s.stop) for s in VELOCITY_PARTS.values()])
EPS = 1e-12


# ---------------------------------------------------------------------------------------------------- Fréchet
def _sym(m: np.ndarray) -> np.ndarray:
    return (m + m.T) / 2


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; tiny negative eigenvalues (round-off) count as 0."""
    w, v = np.linalg.eigh(_sym(m))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2): ``mu [F], sigma [F, F] -> float >= 0``.

    ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)`` in float64. The trace term comes from the
    eigenvalues of the symmetric PSD matrix ``S1^1/2 S2 S1^1/2`` (clamped at 0), not from ``scipy.linalg.sqrtm`` of
    the non-symmetric ``S1 S2``, which returned complex / negative results on near-singular covariances.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    f = mu1.shape[-1] if mu1.ndim else 1
    if mu1.shape != mu2.shape or s1.shape != (f, f) or s2.shape != (f, f):
        raise ValueError(f"frechet_distance: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape} "
                         f"do not describe two {f}-d Gaussians")
    sqrt_s1 = _psd_sqrt(s1)
    inner = _sym(sqrt_s1 @ _sym(s2) @ sqrt_s1)
    trace_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0.0, None)).sum())
    diff = (mu1 - mu2).reshape(-1)
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)
    return max(value, 0.0)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``features [n, F] -> (mu [F], sigma [F, F])`` in float64 (unbiased covariance, n >= 2)."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"feature_statistics: need features [n >= 2, F], got shape {x.shape}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance_features(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to ``a [n, F]`` and ``b [m, F]``."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


# ------------------------------------------------------------------------------------------ beat consistency
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


# --------------------------------------------------------------------------------------- per-clip diagnostics
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


# ------------------------------------------------------------------------------------------ GestureMetrics
@dataclass
class ClipStats:
    """Everything ``GestureMetrics.compute`` needs from one clip (small; gathered over DDP ranks)."""

    name: str | None  # None: anonymous, never merged with another clip
    frames: int
    fgd_pred: np.ndarray | None = None  # [n_windows, F]
    fgd_gt: np.ndarray | None = None
    bc_pred: float = math.nan
    bc_gt: float = math.nan
    bc_weight: int = 0
    l1div_pred: float = 0.0  # sum over frames and dims
    l1div_gt: float = 0.0
    face_sq: float = 0.0
    face_vel_abs: float = 0.0
    face_count: int = 0
    face_vel_count: int = 0
    vel_pred: dict[str, float] = field(default_factory=dict)  # sum of |x_t - x_{t-1}| per part
    vel_gt: dict[str, float] = field(default_factory=dict)
    rot_std_pred: float = 0.0  # mean over the 3 dims of the std over time
    rot_std_gt: float = 0.0
    jumps_pred: np.ndarray = field(default_factory=lambda: np.zeros(0))
    jumps_gt: np.ndarray = field(default_factory=lambda: np.zeros(0))


_WARNED: set[tuple[str, str]] = set()


def _warn_once(key: tuple[str, str], message: str) -> None:
    """One warning per (checkpoint, reason) and process: validation runs every epoch and must not repeat it."""
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message)


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _per_item(value, b: int, name: str) -> list:
    """``None`` / one value for a single clip / a sequence (or leading dim) of ``b`` values -> list of ``b``."""
    if value is None:
        return [None] * b
    if isinstance(value, np.ndarray | torch.Tensor):
        if b == 1 and (value.ndim == 1 or value.shape[0] != 1):
            return [value.reshape(-1)]
        if value.shape[0] != b:
            raise ValueError(f"GestureMetrics.update: {name} has leading size {value.shape[0]}, batch has {b}")
        return list(value)
    if isinstance(value, str):
        value = [value]
    value = list(value)
    if len(value) != b:
        raise ValueError(f"GestureMetrics.update: {len(value)} {name} for a batch of {b}")
    return value


class GestureMetrics:
    """Accumulates (pred, gt, audio) per clip; ``compute()`` -> ``dict[str, float]``.

    Args:
        encoder_ckpt: the FGD motion encoder (``make train-fgd``). ``None`` = no FGD; a missing, unreadable or
            mismatched (other frame size) checkpoint skips FGD with one warning and never raises.
        fps: motion frame rate (default for ``update``).
        bc_sigma, bc_order, bc_threshold, bc_skip: beat consistency (EMAGE: 0.3 s, 7 frames, 0.3, 60 frames;
            use a small ``bc_skip`` on short windows).
        bc_speed_scale: per speed-group normaliser (EMAGE: mean training speed); ``None`` = the gt clip's mean
            speed, the same for pred and gt.
        onset_hop: librosa hop length for onsets from a waveform.
        joints_fn: ``motion [T, 320] raw -> joints [T, J, 3]`` (e.g. MHR forward kinematics). With it, BC uses
            joint speeds and L1div joint positions; without it, the body + left / right hand parameters.
        bc_joints: joint indices for BC when ``joints_fn`` is set (e.g. upper body); ``None`` = all joints.
        fgd_stride: hop between FGD windows (``None`` = the encoder window, non-overlapping).
        device: where the encoder runs.

    ``update`` takes raw (denormalised) motion. Keys of ``compute`` (each only when defined for the data seen):
    ``fgd``, ``bc``, ``bc/gt``, ``l1div``, ``l1div/gt``, ``face_mse``, ``face_vel_err``, ``vel_ratio/{body,hand,face,
    global}`` (pred / gt mean frame-to-frame change; ~1 is right: jitter shows well above 1, frozen motion well below),
    ``global_rot_std_ratio``, ``boundary_jump``, ``boundary_jump/gt``. Under DDP every rank must call ``compute``
    (it gathers the clips with ``all_gather_object``); clips seen twice (padded samplers) count once by name.
    """

    def __init__(
        self,
        encoder_ckpt: str | Path | None = None,
        fps: float = 30.0,
        bc_sigma: float = 0.3,
        bc_order: int = 7,
        bc_threshold: float = 0.3,
        bc_skip: int = 60,
        bc_speed_scale: Sequence[float] | None = None,
        onset_hop: int = 512,
        joints_fn: JointsFn | None = None,
        bc_joints: Sequence[int] | None = None,
        fgd_stride: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.encoder_ckpt = None if encoder_ckpt is None else Path(encoder_ckpt)
        self.fps = fps
        self.bc = dict(sigma=bc_sigma, order=bc_order, threshold=bc_threshold, skip=bc_skip)
        self.bc_speed_scale = None if bc_speed_scale is None else np.asarray(bc_speed_scale, np.float64)
        self.onset_hop = onset_hop
        self.joints_fn = joints_fn
        self.bc_joints = None if bc_joints is None else list(bc_joints)
        self.fgd_stride = fgd_stride
        self.device = torch.device(device)
        self._encoder: MotionEncoder | None = None
        self._fgd_state = "unloaded" if self.encoder_ckpt is not None else "off"
        self._clips: list[ClipStats] = []
        self.skipped: list[str] = []

    # ----------------------------------------------------------------------------------------- FGD encoder
    @property
    def fgd_enabled(self) -> bool:
        return self._fgd_state in ("unloaded", "ready")

    def _disable_fgd(self, reason: str, message: str) -> None:
        self._fgd_state, self._encoder = "off", None
        _warn_once((str(self.encoder_ckpt), reason), f"FGD skipped: {message}; the other metrics go on")

    def encoder(self, pose_dim: int) -> MotionEncoder | None:
        """The FGD encoder for frames of ``pose_dim``, loaded on first use; ``None`` once FGD is off."""
        if self._fgd_state == "unloaded":
            try:
                self._encoder = load_motion_encoder(self.encoder_ckpt).to(self.device)
                self._fgd_state = "ready"
            except EncoderLoadError as err:
                self._disable_fgd("load", str(err))
        if self._encoder is not None and self._encoder.pose_dim != pose_dim:
            self._disable_fgd("dims", f"{self.encoder_ckpt} encodes {self._encoder.pose_dim}-d frames, the motion "
                                      f"has {pose_dim} (retrain with `make train-fgd`)")
        return self._encoder

    def window_features(self, motion: np.ndarray) -> np.ndarray | None:
        """``motion [T, D]`` raw -> encoder features of its windows ``[n, F]`` (n may be 0); None if FGD is off."""
        encoder = self.encoder(motion.shape[-1])
        if encoder is None:
            return None
        window, stride = encoder.window, self.fgd_stride or encoder.window
        starts = range(0, motion.shape[0] - window + 1, stride)
        if not starts:
            return np.zeros((0, encoder.feature_dim))
        windows = np.stack([motion[s:s + window] for s in starts])
        try:
            with torch.inference_mode():
                feats = encoder.features(torch.as_tensor(windows, dtype=torch.float32, device=self.device))
        except Exception as err:  # noqa: BLE001 - a broken encoder must not stop training
            self._disable_fgd("forward", f"encoder {self.encoder_ckpt} failed ({type(err).__name__}: {err})")
            return None
        return feats.to("cpu", torch.float64).numpy()

    # ----------------------------------------------------------------------------------------------- update
    def reset(self) -> None:
        self._clips = []
        self.skipped = []

    @property
    def num_clips(self) -> int:
        return len(self._clips)

    def update(
        self,
        pred: ArrayLike,
        gt: ArrayLike,
        wave: ArrayLike | Sequence[ArrayLike] | None = None,
        sr: int = 16000,
        onsets: np.ndarray | Sequence[np.ndarray] | None = None,
        fps: float | None = None,
        boundaries: Sequence[int] = (),
        names: str | Sequence[str] | None = None,
    ) -> None:
        """Add clips: ``pred, gt [T, 320]`` or ``[b, T, 320]`` raw motion (same shape); per clip optionally
        ``wave [S]`` (or ``[b, S]`` / a list) at ``sr`` or ready ``onsets`` in seconds (a list for a batch),
        ``boundaries`` (frame indices where a new generated window starts: ``gesture.generate.Generation.
        boundaries``) and ``names``.

        ``names`` must identify a clip (or window: ``f"{clip}@{start}"``) uniquely: clips of the same name count
        once (a DDP sampler pads its last batch with repeats). Anonymous clips are never merged.
        """
        pred_np, gt_np = _to_numpy(pred), _to_numpy(gt)
        if pred_np.shape != gt_np.shape:
            raise ValueError(f"GestureMetrics.update: pred {pred_np.shape} and gt {gt_np.shape} differ")
        if pred_np.ndim == 2:
            pred_np, gt_np = pred_np[None], gt_np[None]
        if pred_np.ndim != 3 or pred_np.shape[1] < 2 or pred_np.shape[2] != POSE_DIM:
            raise ValueError(f"GestureMetrics.update: expected [T >= 2, {POSE_DIM}] or [b, T, {POSE_DIM}] raw "
                             f"motion, got {pred_np.shape}")
        b = pred_np.shape[0]
        waves, onset_list = _per_item(wave, b, "waves"), _per_item(onsets, b, "onsets")
        name_list = _per_item(names, b, "names")
        for i in range(b):
            name = None if name_list[i] is None else str(name_list[i])
            if not (np.isfinite(pred_np[i]).all() and np.isfinite(gt_np[i]).all()):
                self.skipped.append(name or f"#{len(self._clips) + len(self.skipped)}")
                log.warning("GestureMetrics: clip %s has non-finite values in pred or gt; skipped (%d so far)",
                            self.skipped[-1], len(self.skipped))
                continue
            clip_onsets = onset_list[i]
            if clip_onsets is None and waves[i] is not None:
                clip_onsets = audio_onsets(_to_numpy(waves[i]), sr, self.onset_hop)
            self._clips.append(self._clip_stats(pred_np[i], gt_np[i], clip_onsets, fps or self.fps, boundaries,
                                                name))

    def _clip_stats(self, pred: np.ndarray, gt: np.ndarray, onsets, fps: float, boundaries: Sequence[int],
                    name: str) -> ClipStats:
        t = pred.shape[0]
        stats = ClipStats(name=name, frames=t)
        if self.fgd_enabled:
            stats.fgd_pred, stats.fgd_gt = self.window_features(pred), self.window_features(gt)
        if self.joints_fn is not None:
            jp, jg = np.asarray(self.joints_fn(pred), np.float64), np.asarray(self.joints_fn(gt), np.float64)
            if self.bc_joints is not None:
                jp, jg = jp[:, self.bc_joints], jg[:, self.bc_joints]
            bc_pred_x, bc_gt_x, groups = jp, jg, None
            div_pred, div_gt = jp.reshape(t, -1), jg.reshape(t, -1)
        else:
            bc_pred_x, bc_gt_x, groups = pred, gt, BC_PARAM_GROUPS
            dims = np.concatenate([np.arange(s.start, s.stop) for s in BC_PARAM_GROUPS.values()])
            div_pred, div_gt = pred[:, dims], gt[:, dims]
        stats.l1div_pred, stats.l1div_gt = l1_diversity_sum(div_pred), l1_diversity_sum(div_gt)
        if onsets is not None:
            scale = self.bc_speed_scale
            if scale is None:
                scale = group_speed(bc_gt_x, fps, groups).mean(axis=0)
            stats.bc_pred = beat_consistency(bc_pred_x, onsets, fps, groups, scale, **self.bc)
            stats.bc_gt = beat_consistency(bc_gt_x, onsets, fps, groups, scale, **self.bc)
            stats.bc_weight = max(t - 2 * self.bc["skip"], 0)
        face = PARTS["face"]
        stats.face_sq = float(((pred[:, face] - gt[:, face]) ** 2).sum())
        stats.face_count = pred[:, face].size
        vel_diff = np.diff(pred[:, face], axis=0) - np.diff(gt[:, face], axis=0)
        stats.face_vel_abs, stats.face_vel_count = float(np.abs(vel_diff).sum()), vel_diff.size
        for part, s in VELOCITY_PARTS.items():
            stats.vel_pred[part] = float(np.abs(np.diff(pred[:, s], axis=0)).sum())
            stats.vel_gt[part] = float(np.abs(np.diff(gt[:, s], axis=0)).sum())
        rot = SUB_SLICES["global_rot"]
        stats.rot_std_pred, stats.rot_std_gt = float(pred[:, rot].std(axis=0).mean()), float(gt[:, rot].std(axis=0).mean())
        valid = [int(bd) for bd in boundaries if 1 <= int(bd) < t]
        if valid:
            stats.jumps_pred = boundary_jumps(pred[:, MOTION_DIMS], valid)
            stats.jumps_gt = boundary_jumps(gt[:, MOTION_DIMS], valid)
        return stats

    # ---------------------------------------------------------------------------------------------- compute
    def _gathered(self, sync: bool) -> list[ClipStats]:
        clips = self._clips
        if sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list[list[ClipStats] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, clips)
            clips = [c for part in parts for c in (part or [])]
        named: dict[str, ClipStats] = {}
        for c in clips:
            if c.name is not None:
                named.setdefault(c.name, c)
        unique = list(named.values()) + [c for c in clips if c.name is None]
        if len(unique) < len(clips):
            log.debug("GestureMetrics: %d repeated clips (padded sampler) counted once", len(clips) - len(unique))
        return unique

    def compute(self, sync: bool = True) -> dict[str, float]:
        """Aggregate over all clips (all ranks when ``sync``) -> ``{metric: float}``; only finite values."""
        clips = self._gathered(sync)
        out: dict[str, float] = {}
        if not clips:
            return out
        feats_pred = [c.fgd_pred for c in clips if c.fgd_pred is not None and len(c.fgd_pred)]
        feats_gt = [c.fgd_gt for c in clips if c.fgd_gt is not None and len(c.fgd_gt)]
        if self.fgd_enabled and feats_pred and feats_gt:
            a, b = np.concatenate(feats_pred), np.concatenate(feats_gt)
            if len(a) >= 2 and len(b) >= 2:
                out["fgd"] = frechet_distance_features(a, b)
            else:
                log.info("FGD needs >= 2 windows of each kind, have %d / %d", len(a), len(b))
        bc = [c for c in clips if c.bc_weight > 0 and math.isfinite(c.bc_pred)]
        if bc:
            w = np.array([c.bc_weight for c in bc], np.float64)
            out["bc"] = float(np.dot(w, [c.bc_pred for c in bc]) / w.sum())
            out["bc/gt"] = float(np.dot(w, [c.bc_gt for c in bc]) / w.sum())
        frames = sum(c.frames for c in clips)
        out["l1div"] = sum(c.l1div_pred for c in clips) / frames
        out["l1div/gt"] = sum(c.l1div_gt for c in clips) / frames
        out["face_mse"] = sum(c.face_sq for c in clips) / max(sum(c.face_count for c in clips), 1)
        out["face_vel_err"] = sum(c.face_vel_abs for c in clips) / max(sum(c.face_vel_count for c in clips), 1)
        for part in VELOCITY_PARTS:
            num, den = sum(c.vel_pred[part] for c in clips), sum(c.vel_gt[part] for c in clips)
            if den > EPS:
                out[f"vel_ratio/{part}"] = num / den
        rot_gt = sum(c.rot_std_gt * c.frames for c in clips)
        if rot_gt > EPS:
            out["global_rot_std_ratio"] = sum(c.rot_std_pred * c.frames for c in clips) / rot_gt
        for key, attr in (("boundary_jump", "jumps_pred"), ("boundary_jump/gt", "jumps_gt")):
            jumps = np.concatenate([getattr(c, attr) for c in clips])
            jumps = jumps[np.isfinite(jumps)]
            if jumps.size:
                out[key] = float(jumps.mean())
        return {k: float(v) for k, v in out.items() if math.isfinite(v)}


# ------------------------------------------------------------------------------------------------ baselines
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

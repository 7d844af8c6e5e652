"""``GestureMetrics``: accumulates clips (model and ground truth), gathers them over DDP ranks and computes
FGD, beat consistency, L1 diversity, face errors, per-part velocity ratios, global rotation spread and
boundary jumps."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from gesture.layout import PARTS, POSE_DIM, SUB_SLICES
from gesture.metrics.beats import (
    BC_PARAM_GROUPS,
    audio_onsets,
    beat_consistency,
    group_speed,
)
from gesture.metrics.frechet import (
    frechet_distance_features,
)
from gesture.metrics.motion import (
    EPS,
    MOTION_DIMS,
    VELOCITY_PARTS,
    boundary_jumps,
    l1_diversity_sum,
)
from gesture.models.motion_encoder import EncoderLoadError, MotionEncoder, load_motion_encoder

log = logging.getLogger(__name__)


ArrayLike = np.ndarray | torch.Tensor
JointsFn = Callable[[np.ndarray], np.ndarray]  # motion [T, 320] raw -> joints [T, J, 3]


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

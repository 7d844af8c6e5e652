"""Synthetic hand sequences in the on-disk format: procedural MANO, smooth random motion, rendered JPEGs.

``python -m handpose.data.synthetic --out DIR [--seed S] [--num-seqs N] [--workers W] [--overwrite]`` writes
DIR/splits.json and one folder per sequence (an existing set is kept unless ``--overwrite``); the output is a function of the arguments only (per-sequence
random streams).
Motion is 30 fps with random frame drops (irregular timestamps); some frames are partly occluded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy.interpolate import PchipInterpolator
from scipy.spatial.transform import Rotation, RotationSpline

from common.data.staging import staged_folder
from common.geometry import project
from common.mano import (
    FINGERTIP_NAMES,
    JOINT_NAMES_21,
    MANO_NATIVE_JOINTS,
    MIRROR_AXIS_ANGLE_SIGNS,
    ManoLayer,
)
from handpose.data.format import LEFT, RIGHT, SPLITS_FILE, write_sequence, write_splits
from handpose.data.raster import draw_occluder, random_background, render_mesh

log = logging.getLogger(__name__)

CONFIG_FILE = "synthetic_config.json"  # the SyntheticConfig a set was made with, next to splits.json

# Per finger: its three joints in MANO's native pose order, and its first joint in the 21-joint order.
NATIVE_FINGER_JOINTS = {f: tuple(MANO_NATIVE_JOINTS.index(f"{f}{k}") for k in (1, 2, 3)) for f in FINGERTIP_NAMES}
OPENPOSE_FINGER_BASE = {f: JOINT_NAMES_21.index(f"{f}_{'cmc' if f == 'thumb' else 'mcp'}") for f in FINGERTIP_NAMES}
# Joint limits (radians) of the low-dimensional pose parameters, for a right hand.
FINGER_MCP, FINGER_PIP, FINGER_DIP = (-0.25, 1.45), (0.0, 1.7), (0.0, 1.2)
SPREAD = (-0.12, 0.3)  # fan-out of the fingers about the palm normal (per step away from the middle finger)
THUMB_OPPOSE, THUMB_CMC, THUMB_MCP, THUMB_IP = (0.0, 0.9), (-0.2, 0.5), (0.0, 0.8), (-0.2, 1.1)
HAND_NAMES = ("index", "middle", "ring", "pinky")


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything that determines the generated set (together with the sequence index)."""

    seed: int = 0
    num_seqs: int = 280  # split into train / val / test as total - 2 k / k / k with k = max(1, round(n / 7))
    # A training split of its own instead of the first total - 2 k: this many sequences (indices num_seqs, ...:
    # random streams of their own, val / test unchanged) of train_min_frames to train_max_frames frames. More,
    # shorter sequences: more scenes, hands and poses for the same number of frames.
    train_seqs: int | None = None
    train_min_frames: int | None = None  # None: min_frames
    train_max_frames: int | None = None  # None: max_frames
    # With a training split of its own: also write the base set's first n - 2 k sequences (20-40 frames) as the
    # split "heldout", which the per-frame network never trains on. Stage 2 trains there: on Stage 1's own
    # training frames its tokens are near-perfect, so a temporal model trained on them learns to trust the last
    # frame.
    heldout: bool = False
    image_size: int = 256
    min_frames: int = 20
    max_frames: int = 40
    fps: float = 30.0
    drop_prob: float = 0.1  # per frame, plus occasional bursts
    left_prob: float = 0.5  # fraction of left-hand sequences
    occlusion_prob: float = 0.5  # per sequence: an occluder crosses the hand for a few frames
    # The occluder: radius uniform in occluder_size (x the hand box's longest side), its centre offset from the
    # box centre by up to occluder_offset and drifting by up to occluder_drift per frame (box sides).
    occluder_size: tuple[float, float] = (0.3, 0.55)
    occluder_offset: float = 0.2
    occluder_drift: float = 0.02
    invalid_prob: float = 0.03  # per frame: annotation marked unreliable (besides hands mostly out of view)
    # Global orientation: any roll in the image plane, out-of-plane tilt ~ N(0, view_tilt_deg) away from the
    # palm facing the camera (fingers up), then a smooth random walk of orientation_step_deg per keyframe.
    # As in real footage, views cluster; a uniform SO(3) orientation (view_tilt_deg = null) made articulation
    # unlearnable for the CPU-sized model in its budget (its val PA-MPJPE stayed at the mean pose's).
    view_tilt_deg: float | None = 35.0
    orientation_step_deg: float = 15.0
    jpeg_quality: int = 92

    def split_indices(self) -> dict[str, list[int]]:
        """Sequence indices per split (sequence ``i`` is ``seq_{i:04d}``, made from the random stream (seed, i))."""
        n = self.num_seqs
        k = max(1, round(n / 7)) if n >= 3 else 0
        base = list(range(n - 2 * k))
        train = base if self.train_seqs is None else list(range(n, n + self.train_seqs))
        splits = {"train": train, "val": list(range(n - 2 * k, n - k)), "test": list(range(n - k, n))}
        if self.heldout and self.train_seqs is not None:
            splits["heldout"] = base
        return splits

    def split_names(self) -> dict[str, list[str]]:
        return {split: [f"seq_{i:04d}" for i in indices] for split, indices in self.split_indices().items()}

    def indices(self) -> list[int]:
        """Every sequence the set holds."""
        return sorted(i for indices in self.split_indices().values() for i in indices)

    def __post_init__(self) -> None:  # a list from a config file or JSON: the same setting
        object.__setattr__(self, "occluder_size", tuple(float(v) for v in self.occluder_size))

    def frame_range(self, index: int) -> tuple[int, int]:
        """(min, max) frames of sequence ``index``."""
        if index >= self.num_seqs:  # a sequence of the training split of its own
            return (self.train_min_frames or self.min_frames, self.train_max_frames or self.max_frames)
        return self.min_frames, self.max_frames


_LAYERS: dict[str, torch.nn.Module] = {}


def _mano(side: str) -> torch.nn.Module:
    """Procedural MANO layer of one side, flat-hand-mean convention (one per process)."""
    if side not in _LAYERS:
        _LAYERS[side] = ManoLayer(None, side=side, flat_hand_mean=True).eval()
    return _LAYERS[side]


class PoseSpace:
    """Maps low-dimensional, limit-bounded hand parameters to right-hand MANO finger axis-angles ``[45]``.

    Rotation axes come from the rest-pose joints, so they fit whatever template the MANO layer has: finger
    flexion turns each bone towards the palm, spread turns it about the palm normal.
    """

    num_params = 4 * 3 + 1 + 4  # per finger (mcp, pip, dip), spread, thumb (oppose, cmc, mcp, ip)
    lows = np.array([*[FINGER_MCP[0], FINGER_PIP[0], FINGER_DIP[0]] * 4, SPREAD[0],
                     THUMB_OPPOSE[0], THUMB_CMC[0], THUMB_MCP[0], THUMB_IP[0]])
    highs = np.array([*[FINGER_MCP[1], FINGER_PIP[1], FINGER_DIP[1]] * 4, SPREAD[1],
                      THUMB_OPPOSE[1], THUMB_CMC[1], THUMB_MCP[1], THUMB_IP[1]])

    def __init__(self, rest_joints: np.ndarray) -> None:
        j = np.asarray(rest_joints, np.float64)  # [21, 3] OpenPose order
        b = OPENPOSE_FINGER_BASE
        across = j[b["index"]] - j[b["pinky"]]  # towards the thumb side
        up = j[b["middle"]] - j[0]
        palm = np.cross(across, up)  # palm normal of a right hand, pointing out of the palm
        palm /= np.linalg.norm(palm)
        self.palm = palm
        self.flex_axes, self.spread_axes = {}, {}
        for name in HAND_NAMES:
            bone = j[b[name] + 3] - j[b[name]]
            self.flex_axes[name] = _unit(np.cross(bone, palm))
            away = j[b[name]] - j[b["middle"]]
            sign = 0.0 if name == "middle" else np.sign(np.cross(palm, bone) @ away)
            steps = {"index": 1.0, "middle": 0.0, "ring": 1.0, "pinky": 2.0}[name]
            self.spread_axes[name] = sign * steps * palm
        thumb = j[b["thumb"] + 3] - j[b["thumb"]]
        self.thumb_oppose_axis = _unit(np.cross(thumb, palm))
        self.thumb_flex_axis = _unit(np.cross(thumb, _unit(-across) + palm))

    def to_axis_angle(self, params: np.ndarray) -> np.ndarray:
        """``params [n, num_params] -> finger pose [n, 45]`` (right hand, flat-hand-mean convention)."""
        n = params.shape[0]
        pose = np.zeros((n, 16, 3))
        spread = params[:, 12:13]
        for k, name in enumerate(HAND_NAMES):
            mcp, pip, dip = (params[:, 3 * k + i: 3 * k + i + 1] for i in range(3))
            joints = NATIVE_FINGER_JOINTS[name]
            pose[:, joints[0]] = mcp * self.flex_axes[name] + spread * self.spread_axes[name]
            pose[:, joints[1]] = pip * self.flex_axes[name]
            pose[:, joints[2]] = dip * self.flex_axes[name]
        oppose, cmc, tmcp, tip = (params[:, 13 + i: 14 + i] for i in range(4))
        thumb = NATIVE_FINGER_JOINTS["thumb"]
        pose[:, thumb[0]] = oppose * self.thumb_oppose_axis + cmc * self.thumb_flex_axis
        pose[:, thumb[1]] = tmcp * self.thumb_flex_axis
        pose[:, thumb[2]] = tip * self.thumb_flex_axis
        return pose[:, 1:].reshape(n, 45)

    def sample_keyframes(self, rng: np.random.Generator, k: int) -> np.ndarray:
        """``k`` random parameter vectors within the limits, fingers curling together more often than not."""
        grip = rng.uniform(0, 1, (k, 1))
        curl = np.clip(grip + rng.normal(0, 0.3, (k, 4)), 0, 1)  # per finger
        per_joint = np.clip(np.repeat(curl, 3, axis=1) + rng.normal(0, 0.12, (k, 12)), 0, 1)
        thumb = np.clip(grip + rng.normal(0, 0.35, (k, 4)), 0, 1)
        u = np.concatenate([per_joint, rng.uniform(0, 1, (k, 1)), thumb], 1)
        return self.lows + u * (self.highs - self.lows)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _timeline(rng: np.random.Generator, cfg: SyntheticConfig, index: int) -> np.ndarray:
    """Timestamps (s) of the kept frames: 30 fps with single and burst drops; ``[n]``, n in [min, max]."""
    lo, hi = cfg.frame_range(index)
    n_keep = int(rng.integers(lo, hi + 1))
    keep: list[int] = []
    i = 0
    while len(keep) < n_keep:
        if keep and rng.random() < cfg.drop_prob:
            i += 1 + (int(rng.integers(1, 4)) if rng.random() < 0.2 else 0)  # drop one, sometimes a burst
            continue
        keep.append(i)
        i += 1
    return np.asarray(keep, np.float64) / cfg.fps


def _smooth_track(rng: np.random.Generator, times: np.ndarray, keys: np.ndarray, key_dt: float) -> np.ndarray:
    """PCHIP through ``keys [k, d]`` placed every ``key_dt`` s from before ``times[0]``; evaluated at ``times``."""
    key_times = times[0] - rng.uniform(0, key_dt) + key_dt * np.arange(len(keys))
    return PchipInterpolator(key_times, keys, axis=0)(times)


def make_sequence(out_dir: Path, index: int, cfg: SyntheticConfig) -> Path:
    """Generate sequence ``index`` (random stream ``(seed, index)``) into ``out_dir/seq_{index:04d}``."""
    rng = np.random.default_rng([cfg.seed, index])
    size = cfg.image_size
    side = LEFT if is_left(index, cfg) else RIGHT
    layer = _mano("left" if side == LEFT else "right")
    times = _timeline(rng, cfg, index)
    n = len(times)
    key_dt = rng.uniform(0.35, 0.8)
    num_keys = int(np.ceil((times[-1] - times[0]) / key_dt)) + 3

    shape = np.clip(rng.normal(0, 1.0, 10), -2.5, 2.5).astype(np.float32)
    zero = torch.zeros(1, 48)
    with torch.no_grad():
        rest = _mano("right")(zero, torch.as_tensor(shape)[None], None).joints[0].numpy()
    space = PoseSpace(rest)
    fingers = space.to_axis_angle(_smooth_track(rng, times, space.sample_keyframes(rng, num_keys), key_dt))
    # Global orientation: a random walk of keyframe rotations through a C2 rotation spline.
    start = _start_orientation(rng, rest, space.palm, cfg.view_tilt_deg)
    steps = Rotation.from_rotvec(rng.normal(0, np.deg2rad(cfg.orientation_step_deg), (num_keys - 1, 3)))
    keys = [start]
    for step in steps:
        keys.append(step * keys[-1])
    key_times = times[0] - rng.uniform(0, key_dt) + key_dt * np.arange(num_keys)
    orient = RotationSpline(key_times, Rotation.concatenate(keys))(times).as_rotvec()
    pose_right = np.concatenate([orient, fingers], 1)
    mirror = np.tile(MIRROR_AXIS_ANGLE_SIGNS, 16)
    pose = (pose_right * mirror if side == LEFT else pose_right).astype(np.float32)

    # Camera: the hand spans roughly 30-60 % of the image at its mean depth.
    hand_len = float(np.linalg.norm(rest[OPENPOSE_FINGER_BASE["middle"] + 3] - rest[0]))
    depth = rng.uniform(0.3, 0.85)
    f = rng.uniform(0.3, 0.6) * size * depth / hand_len
    focal = (f * (1 + rng.uniform(-0.03, 0.03, 2))).astype(np.float32)
    princpt = (size / 2 + rng.uniform(-0.05, 0.05, 2) * size).astype(np.float32)
    uvz_keys = np.stack([rng.uniform(0.3, 0.7, num_keys) * size, rng.uniform(0.3, 0.7, num_keys) * size,
                         np.clip(depth * np.exp(rng.normal(0, 0.15, num_keys)), 0.25, 1.0)], 1)
    uvz = _smooth_track(rng, times, uvz_keys, key_dt)
    root = np.stack([(uvz[:, 0] - princpt[0]) / focal[0] * uvz[:, 2],
                     (uvz[:, 1] - princpt[1]) / focal[1] * uvz[:, 2], uvz[:, 2]], 1)
    with torch.no_grad():
        j0 = layer(zero, torch.as_tensor(shape)[None], None).joints[0, 0].numpy()
        trans = (root - j0).astype(np.float32)
        out = layer(torch.as_tensor(pose), torch.as_tensor(shape).expand(n, 10), torch.as_tensor(trans))
    verts, joints = out.vertices.numpy().astype(np.float64), out.joints.numpy().astype(np.float32)
    faces = layer.faces.cpu().numpy().astype(np.int64)

    uv = project(verts, focal, princpt)  # [n, 778, 2]
    lo, hi = uv.min(1), uv.max(1)
    bbox = np.concatenate([np.clip(lo, 0, size), np.clip(hi, 0, size)], 1).astype(np.float32)
    seen = np.prod(bbox[:, 2:] - bbox[:, :2], 1) / np.prod(hi - lo, 1)
    valid = (seen > 0.5) & (rng.random(n) >= cfg.invalid_prob)

    background = random_background(rng, size, size)
    albedo = _skin(rng)
    light = _unit(np.array([rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0.3, 1.5)]))
    ambient = rng.uniform(0.25, 0.5)
    occluded = np.zeros(n, bool)
    if rng.random() < cfg.occlusion_prob:
        first, length = int(rng.integers(0, n)), int(rng.integers(4, 13))
        occluded[first: first + length] = True
    first = int(np.argmax(occluded))  # the occlusion's first frame (0 when none)
    occluder_seed, occluder_offset = int(rng.integers(2**31)), rng.uniform(-1, 1, 2) * cfg.occluder_offset
    occluder_drift, occluder_size = rng.uniform(-1, 1, 2) * cfg.occluder_drift, rng.uniform(*cfg.occluder_size)

    def frames():
        for i in range(n):
            img, _ = render_mesh(background, verts[i], faces, focal, princpt, albedo, light, ambient)
            if occluded[i]:
                box_size = float(np.max(hi[i] - lo[i]))
                centre = (lo[i] + hi[i]) / 2 + (occluder_offset + occluder_drift * (i - first)) * box_size
                img = draw_occluder(img, np.random.default_rng(occluder_seed), centre, occluder_size * box_size)
            yield img

    arrays = {
        "timestamp": times, "mano_pose": pose, "mano_shape": np.tile(shape, (n, 1)), "mano_trans": trans,
        "joints_cam": joints, "focal": np.tile(focal, (n, 1)), "princpt": np.tile(princpt, (n, 1)),
        "bbox": bbox, "hand_side": np.full(n, side, np.int8), "valid": valid, "occluded": occluded,
    }
    folder = out_dir / f"seq_{index:04d}"
    write_sequence(folder, frames(), arrays, fps=cfg.fps, flat_hand_mean=True, mano_model="procedural",
                   source="synthetic", extra={"seed": cfg.seed, "index": index, "occluded": occluded.tolist()},
                   jpeg_quality=cfg.jpeg_quality, overwrite=True)
    return folder


def _start_orientation(rng: np.random.Generator, rest_joints: np.ndarray, palm: np.ndarray,
                       view_tilt_deg: float | None) -> Rotation:
    """First orientation of a right hand: roll uniform in the image plane, tilt ~ N(0, view_tilt_deg) out of it,
    around the view with the palm towards the camera and the fingers up (OpenCV camera: -z towards the camera,
    -y up); ``view_tilt_deg=None``: uniform over SO(3)."""
    if view_tilt_deg is None:
        return Rotation.random(random_state=rng)
    up = _unit(rest_joints[OPENPOSE_FINGER_BASE["middle"]] - rest_joints[0])
    towards = _unit(palm - (palm @ up) * up)
    hand_frame = np.stack([up, towards, np.cross(up, towards)], axis=1)
    camera_frame = np.stack([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]], axis=1)
    facing = Rotation.from_matrix(camera_frame @ hand_frame.T)
    tilt = Rotation.from_rotvec(np.r_[rng.normal(0, np.deg2rad(view_tilt_deg), 2), 0.0])
    roll = Rotation.from_rotvec([0.0, 0.0, rng.uniform(-np.pi, np.pi)])
    return roll * tilt * facing


def is_left(index: int, cfg: SyntheticConfig) -> bool:
    """Whether sequence ``index`` shows a left hand: round(n * left_prob) of the n sequences of the base set, and
    of the training split of its own, at seeded places."""
    if index < cfg.num_seqs:
        order, offset, n = np.random.default_rng([cfg.seed, 2**31]).permutation(cfg.num_seqs), 0, cfg.num_seqs
    else:
        n = cfg.train_seqs or 0
        order, offset = np.random.default_rng([cfg.seed, 2**31 + 1]).permutation(n), cfg.num_seqs
    return bool(order[index - offset] < round(n * cfg.left_prob))


def _skin(rng: np.random.Generator) -> np.ndarray:
    """An albedo in [0, 1] (BGR): mostly skin tones, sometimes a glove colour."""
    if rng.random() < 0.15:
        return rng.uniform(0.15, 0.95, 3)
    r = rng.uniform(0.45, 0.95)
    g = r * rng.uniform(0.65, 0.85)
    b = g * rng.uniform(0.7, 0.9)
    return np.array([b, g, r])


def generate_dataset(out: str | Path, cfg: SyntheticConfig = SyntheticConfig(), workers: int | None = None,
                     overwrite: bool = False) -> Path:
    """Write the whole set into ``out`` atomically (a temporary sibling folder renamed at the end)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True to regenerate)")
    splits = cfg.split_names()
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    t0 = time.perf_counter()
    # replace=overwrite: without it, a set another process (e.g. a second node) finished meanwhile is kept
    with staged_folder(out, replace=overwrite) as tmp:
        indices = cfg.indices()
        if workers <= 1:
            for i in indices:
                make_sequence(tmp, i, cfg)
        else:
            # one thread per worker process, as in DataLoader workers (also keeps forked children safe)
            with ProcessPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                list(pool.map(make_sequence, [tmp] * len(indices), indices, [cfg] * len(indices), chunksize=4))
        write_splits(tmp, splits)
        (tmp / CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=1))
    log.info("generated %d synthetic sequences in %s (%.1f s)", len(cfg.indices()), out, time.perf_counter() - t0)
    return out


SHIPPED_DATA_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "data" / "hand_synthetic.yaml"


def shipped_config() -> SyntheticConfig:
    """The set ``data=hand_synthetic`` generates (its ``synthetic`` block), so that ``make data-hand`` writes
    exactly what a training run would; SyntheticConfig's own defaults where that file is absent."""
    if not SHIPPED_DATA_CONFIG.exists():
        return SyntheticConfig()
    from omegaconf import OmegaConf

    return SyntheticConfig(**OmegaConf.to_container(OmegaConf.load(SHIPPED_DATA_CONFIG).synthetic))


def main(argv: list[str] | None = None) -> None:
    defaults = shipped_config()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog=f"defaults: the synthetic block of {SHIPPED_DATA_CONFIG}")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--num-seqs", type=int, default=defaults.num_seqs, help="the base set (train / val / test)")
    p.add_argument("--image-size", type=int, default=defaults.image_size)
    p.add_argument("--min-frames", type=int, default=defaults.min_frames)
    p.add_argument("--max-frames", type=int, default=defaults.max_frames)
    p.add_argument("--train-seqs", type=int, default=defaults.train_seqs,
                   help="a training split of its own of this many sequences (0: the base set's)")
    p.add_argument("--train-min-frames", type=int, default=defaults.train_min_frames)
    p.add_argument("--train-max-frames", type=int, default=defaults.train_max_frames)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="regenerate an existing set (default: keep it)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if (args.out / SPLITS_FILE).exists() and not args.overwrite:
        log.info("%s exists: kept (--overwrite regenerates it)", args.out)
        return
    if args.out.exists() and not args.overwrite:
        p.error(f"{args.out} exists but has no {SPLITS_FILE} (an interrupted or foreign folder): pass --overwrite "
                "to replace it")
    cfg = replace(defaults, seed=args.seed, num_seqs=args.num_seqs, image_size=args.image_size,
                  min_frames=args.min_frames, max_frames=args.max_frames, train_seqs=args.train_seqs or None,
                  train_min_frames=args.train_min_frames, train_max_frames=args.train_max_frames)
    generate_dataset(args.out, cfg, args.workers, args.overwrite)


if __name__ == "__main__":
    main()

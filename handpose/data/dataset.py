"""Windows of hand frames from the on-disk format (``handpose.data.format``) as training samples.

A sample is ``num_frame`` consecutive frames ending at a valid frame, cropped around each frame's bbox, left
hands mirrored to right, optionally augmented. Geometry conventions (all exact, checked by the tests):

- Mirroring (left hands): the image is flipped (``u -> W - 1 - u``), camera-space x is negated (joints, trans),
  every axis-angle is mirrored ``(x, y, z) -> (x, -y, -z)``, ``cx -> W - 1 - cx``; shape is unchanged. This
  assumes the left MANO model is the mirror image of the right one (true for the procedural model; for the
  official files true up to their small asymmetry, and ``hands_mean`` is mirrored the same way).
- In-plane rotation (augmentation) is a rotation ``R = Rz(angle)`` of the camera about its optical axis: the
  camera-space GT is rotated (joints, global orientation, and trans about the root joint), and the image is
  warped by ``K R K^-1`` (about the principal point). The crop is then an axis-aligned square box in that
  rotated full-resolution view, so ``focal = orig_focal * s`` and ``princpt = (orig_princpt - bbox[:2]) * s``
  with ``s = img_size / (bbox[2] - bbox[0])``, and ``joints_2d`` = projection of ``joints_cam`` by the crop
  intrinsics. ``bbox``, ``orig_focal`` and ``orig_princpt`` describe that (mirrored, rotated) view.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
import torch
from scipy.spatial.transform import Rotation
from torch.utils.data import Dataset

from common.data.windows import WindowIndex
from common.mano import MIRROR_AXIS_ANGLE_SIGNS, load_mano_arrays
from handpose.data.format import LEFT, HandSequence, SequenceFormatError, read_sequence, read_splits

log = logging.getLogger(__name__)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # RGB
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
MIRROR_AXIS_ANGLE = np.array(MIRROR_AXIS_ANGLE_SIGNS, np.float32)  # (x, y, z) -> (x, -y, -z), every joint
MIRROR_POINT = np.array([-1.0, 1.0, 1.0], np.float32)  # camera-space x -> -x
# (pixel - mean) * scale per channel, BGR -> RGB, HWC uint8 -> NCHW float32 in one OpenCV call.
_BLOB_PARAMS = cv2.dnn.Image2BlobParams(
    scalefactor=tuple((1.0 / (255.0 * IMAGENET_STD)).tolist()), mean=tuple((255.0 * IMAGENET_MEAN).tolist()), swapRB=True,
    ddepth=cv2.CV_32F,
)


def sample_spec(num_frame: int, img_size: int, token_dim: int | None = None) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of every key (the batch adds a leading ``b``); the model codes against these.

    ``token_dim``: samples of a dataset with precomputed frame tokens (:meth:`HandWindowDataset.use_frame_tokens`)
    carry ``tokens [t, token_dim]`` (float32) instead of ``img``.

    All float32 except ``valid`` (bool), ``hand_side`` (int64, the original side: 0 right,
    1 left), and ``seq_index`` / ``frame_index`` (int64: the sequence's position in the split and the frame's
    in the sequence, so that evaluation can put consecutive predictions of a sequence together).
    """
    t = num_frame
    return {
        **({"img": (t, 3, img_size, img_size)} if token_dim is None else {"tokens": (t, token_dim)}),
        "bbox": (t, 4),
        "focal": (t, 2),
        "princpt": (t, 2),
        "orig_focal": (t, 2),
        "orig_princpt": (t, 2),
        "timestamp": (t,),
        "mano_pose": (t, 48),
        "mano_shape": (t, 10),
        "mano_trans": (t, 3),
        "joints_cam": (t, 21, 3),
        "joints_2d": (t, 21, 2),
        "valid": (t,),
        "hand_side": (t,),
        "seq_index": (t,),
        "frame_index": (t,),
    }


@dataclass(frozen=True)
class Augment:
    """Training-time jitter, sampled once per window (the same for all its frames).

    ``scale``: crop size x U(1 - scale, 1 + scale); ``rotation_deg``: in-plane rotation U(-r, r) applied with
    probability ``rotation_prob``; ``shift``: crop centre moved by U(-shift, shift) x crop size per axis;
    ``color``: brightness, contrast and saturation factors U(1 - color, 1 + color).
    """

    scale: float = 0.2
    rotation_deg: float = 30.0
    rotation_prob: float = 0.5
    shift: float = 0.1
    color: float = 0.3


@dataclass(frozen=True)
class _Jitter:
    scale: float = 1.0
    angle: float = 0.0  # radians
    shift: tuple[float, float] = (0.0, 0.0)  # fraction of the crop size
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0


class RootJoint:
    """Rest-pose root joint ``J0(shape) = j0 + dirs @ shape`` of the right MANO model and its ``hands_mean``.

    Needed to rotate MANO's translation (the global orientation turns the hand about J0, not the origin)
    and to convert between the flat-hand-mean conventions.
    """

    def __init__(self, mano_model_path: str | Path | None = None) -> None:
        arrays = load_mano_arrays(mano_model_path, side="right")
        root_row = arrays["J_regressor"][0]  # [778]
        self.j0 = root_row @ arrays["v_template"]  # [3]
        self.dirs = np.einsum("v,vcs->cs", root_row, arrays["shapedirs"])  # [3, 10]
        self.hands_mean = np.asarray(arrays["hands_mean"], np.float32).reshape(45)

    def __call__(self, shape: np.ndarray) -> np.ndarray:
        """``shape [n, 10] -> J0 [n, 3]``."""
        return self.j0 + shape.astype(np.float64) @ self.dirs.T


class SkippedWindows:
    """Which windows could not be loaded, shared by the DataLoader workers (one shared byte per window): a
    window is counted once however often it is asked for, and a bad frame counts every window it lies in."""

    def __init__(self, num_windows: int) -> None:
        self._flags = mp.Array("b", max(num_windows, 1))

    def mark(self, window: int) -> None:
        self._flags[window] = 1  # one byte, written by one process at a time: no lock needed

    @property
    def value(self) -> int:
        return int(np.frombuffer(self._flags.get_obj(), np.int8).sum())


def read_frame(path: Path, image_size: tuple[int, int]) -> np.ndarray | None:
    """BGR uint8 ``[H, W, 3]``, or None when the file is missing, not a JPEG, truncated, corrupt or of the wrong
    size.

    Decoded by libjpeg-turbo through simplejpeg in strict mode: OpenCV's decoder turns a truncated file into grey
    fill and damaged scan data into garbage with only a message on stderr ("Corrupt JPEG data: ..."); the strict
    decoder raises for both, so such a frame becomes a counted, logged skip (same pixels as OpenCV otherwise).
    """
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        img = simplejpeg.decode_jpeg(data, colorspace="BGR", strict=True)
    except ValueError:
        return None
    if (img.shape[1], img.shape[0]) != tuple(image_size):
        return None
    return img


def crop_transform(
    bbox: np.ndarray, focal: np.ndarray, princpt: np.ndarray, image_width: int, mirror: bool,
    img_size: int, bbox_scale: float, jitter: _Jitter,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Where one frame's crop lies. Returns ``(M [3, 3], R [3, 3], crop_box [4], orig_princpt [2], s)``.

    ``M`` maps original pixels to crop pixels (mirror, then rotation ``K R K^-1``, then the square crop);
    ``R`` rotates camera-space points; ``orig_princpt`` is the (mirrored) principal point.
    """
    fx, fy = (float(v) for v in focal)
    cx, cy = float(princpt[0]), float(princpt[1])
    x0, y0, x1, y1 = (float(v) for v in bbox)
    flip = np.eye(3)
    if mirror:
        flip = np.array([[-1.0, 0.0, image_width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        cx = image_width - 1.0 - cx
        x0, x1 = image_width - 1.0 - x1, image_width - 1.0 - x0
    K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    c, s_ = np.cos(jitter.angle), np.sin(jitter.angle)
    R = np.array([[c, -s_, 0.0], [s_, c, 0.0], [0.0, 0.0, 1.0]])
    rot = K @ R @ np.linalg.inv(K)
    centre = rot @ np.array([(x0 + x1) / 2, (y0 + y1) / 2, 1.0])
    size = max(x1 - x0, y1 - y0) * bbox_scale * jitter.scale
    centre = centre[:2] + np.asarray(jitter.shift) * size
    corner = centre - size / 2
    scale = img_size / size
    crop = np.array([[scale, 0.0, -scale * corner[0]], [0.0, scale, -scale * corner[1]], [0.0, 0.0, 1.0]])
    box = np.array([corner[0], corner[1], corner[0] + size, corner[1] + size])
    return crop @ rot @ flip, R, box, np.array([cx, cy]), scale


def rotate_camera(pose: np.ndarray, trans: np.ndarray, root_rest: np.ndarray, R: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """MANO ``pose [..., 48]`` and ``trans [..., 3]`` seen from a camera rotated by ``R`` (new arrays): the global
    orientation becomes ``R @ R_g`` and ``trans`` becomes ``R @ (J0 + t) - J0``, ``root_rest [..., 3]`` being the
    rest-pose root joint ``J0`` of the shape (MANO rotates about it); finger poses are local and stay."""
    global_orient = (Rotation.from_matrix(R) * Rotation.from_rotvec(np.asarray(pose[..., :3], np.float64))).as_rotvec()
    return np.concatenate([global_orient, pose[..., 3:]], axis=-1), (root_rest + trans) @ R.T - root_rest


def to_right_camera(
    pose: np.ndarray, shape: np.ndarray, trans: np.ndarray, joints: np.ndarray, mirror: bool, R: np.ndarray,
    root_joint: RootJoint,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mirror a left hand to a right one, then rotate the camera by ``R``; new arrays, inputs untouched.

    ``pose [48], shape [10], trans [3], joints [21, 3] -> (pose [48], trans [3], joints [21, 3])``. The
    global orientation and the root joint ``J0(shape) + trans`` turn with the camera; finger poses are local.
    """
    if mirror:
        pose = (pose.reshape(16, 3) * MIRROR_AXIS_ANGLE).reshape(48)
        trans, joints = trans * MIRROR_POINT, joints * MIRROR_POINT
    if np.allclose(R, np.eye(3)):
        return pose, trans, joints
    pose, trans = rotate_camera(pose, trans, root_joint(shape[None])[0], R)
    return pose, trans, joints.astype(np.float64) @ R.T


class HandWindowDataset(Dataset):
    """Windows of ``num_frame`` frames from the sequences of one split; a sample is a dict of ``[t, ...]`` arrays.

    Every sequence is read and validated when the dataset is built (errors name the sequence and field).
    A window with an unreadable frame (found only when loading) is skipped: the nearest loadable window is
    returned instead, the skip is logged and counted in :attr:`num_skipped` (shared across workers).
    ``timestamp`` is in seconds relative to the window's first frame. ``mano_pose`` follows
    ``flat_hand_mean`` (converted from each sequence's convention). ``window_ends``: ``sequence -> bool mask [N]`` of
    the frames windows end at (default: the valid frames; e.g. every frame, to predict a benchmark's test split);
    sequences shorter than the window are then skipped instead of refused.
    """

    max_skip_search = 64

    def __init__(
        self,
        root: str | Path,
        split: str,
        num_frame: int = 1,
        img_size: int = 224,
        stride: int = 1,
        bbox_scale: float = 1.4,
        augment: Augment | Mapping | None = None,
        flat_hand_mean: bool = False,
        mano_model_path: str | Path | None = None,
        limit_sequences: int | None = None,
        window_ends: Callable[[HandSequence], np.ndarray] | None = None,
    ) -> None:
        self.root = Path(root)
        splits = read_splits(self.root)
        if split not in splits:
            raise SequenceFormatError(f"{self.root}/splits.json has no split {split!r} (has {sorted(splits)})")
        names = splits[split][:limit_sequences] if limit_sequences else splits[split]
        if not names:
            raise SequenceFormatError(f"{self.root}/splits.json: split {split!r} is empty")
        self.split, self.num_frame, self.img_size, self.bbox_scale = split, num_frame, img_size, bbox_scale
        self.augment = Augment(**augment) if isinstance(augment, Mapping) else augment
        self.flat_hand_mean, self.mano_model_path = flat_hand_mean, mano_model_path
        self.sequences: list[HandSequence] = [read_sequence(self.root / name) for name in names]
        models = {s.mano_model for s in self.sequences}
        if "official" in models and mano_model_path is None:
            raise SequenceFormatError(
                f"split {split!r} of {self.root} is annotated with the official MANO model: set mano_model_path"
            )
        independent = [s.name for s in self.sequences if s.extra.get("independent_frames")]
        if independent and num_frame > 1:
            raise SequenceFormatError(
                f"split {split!r} of {self.root}: sequence {independent[0]} (and {len(independent) - 1} more) holds "
                f"independent frames (e.g. FreiHAND samples grouped in one folder); windows of {num_frame} frames "
                "over them would be no temporal context at all: use num_frame=1 (Stage 1)")
        self.root_joint = RootJoint(mano_model_path if "official" in models else None)
        ends = [s["valid"] if window_ends is None else window_ends(s) for s in self.sequences]
        self.index = WindowIndex(
            [len(s) for s in self.sequences], num_frame, stride, valid=ends,
            names=[f"sequence {s.folder}" for s in self.sequences], short="error" if window_ends is None else "skip",
        )
        if len(self.index) == 0 and window_ends is None:
            raise SequenceFormatError(f"{self.root} split {split!r}: no window ends at a valid frame")
        self.skips = SkippedWindows(len(self.index))
        self.bad_frames: set[Path] = set()  # known unreadable frames (per process)
        self.frame_tokens: list[np.ndarray] | None = None  # use_frame_tokens: per sequence [n_frames, d]

    @property
    def token_dim(self) -> int | None:
        """Width of the precomputed frame tokens the samples carry instead of images, or None (images)."""
        return None if self.frame_tokens is None else int(self.frame_tokens[0].shape[1])

    def use_frame_tokens(self, tokens: Sequence[np.ndarray]) -> None:
        """From now on samples carry ``tokens [t, d]`` (one row per frame of each sequence, in split order: what
        a frozen per-frame encoder makes of the un-augmented crops) instead of ``img``; no image is read. Only
        without augmentation: the tokens were made from the crops the sample's intrinsics describe."""
        if self.augment is not None:
            raise ValueError(f"{self.root} split {self.split!r}: precomputed frame tokens need an un-augmented "
                             "dataset (the crops they were made from); set data.augment=null")
        if len(tokens) != len(self.sequences):
            raise ValueError(f"{self.root} split {self.split!r}: {len(tokens)} token arrays for "
                             f"{len(self.sequences)} sequences")
        for seq, array in zip(self.sequences, tokens):
            if array.ndim != 2 or array.shape[0] != len(seq) or array.shape[1] != tokens[0].shape[1]:
                raise ValueError(f"sequence {seq.folder}: frame tokens of shape {tuple(array.shape)}, expected "
                                 f"[{len(seq)}, {tokens[0].shape[1]}]")
        self.frame_tokens = [np.ascontiguousarray(a, dtype=np.float32) for a in tokens]

    def __len__(self) -> int:
        return len(self.index)

    @property
    def num_skipped(self) -> int:
        """Distinct windows found unloadable so far because a frame could not be read (all workers; another
        window is returned in their place)."""
        return self.skips.value

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        for attempt in range(self.max_skip_search):
            j = (i + (attempt + 1) // 2 * (1 if attempt % 2 else -1)) % len(self)  # i, i+1, i-1, i+2, ...
            sample = self._load(j)
            if sample is not None:
                return sample
            self.skips.mark(j)
        raise RuntimeError(
            f"{self.root} split {self.split!r}: no loadable window within {self.max_skip_search} of window {i}"
        )

    def _sample_jitter(self) -> _Jitter:
        aug = self.augment
        if aug is None:
            return _Jitter()
        # torch's RNG: seeded per DataLoader worker (and by seed_everything), unlike a fresh numpy generator
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,))))
        angle = np.deg2rad(rng.uniform(-aug.rotation_deg, aug.rotation_deg)) if rng.random() < aug.rotation_prob else 0.0
        return _Jitter(
            scale=rng.uniform(1 - aug.scale, 1 + aug.scale), angle=float(angle),
            shift=tuple(rng.uniform(-aug.shift, aug.shift, 2)),
            brightness=rng.uniform(1 - aug.color, 1 + aug.color), contrast=rng.uniform(1 - aug.color, 1 + aug.color),
            saturation=rng.uniform(1 - aug.color, 1 + aug.color),
        )

    def _load(self, j: int) -> dict[str, np.ndarray] | None:
        seq_id, start, stop = self.index[j]
        seq = self.sequences[seq_id]
        jitter = self._sample_jitter()
        if self.frame_tokens is not None:
            return self._load_tokens(seq_id, start, stop, jitter)
        frames = []
        for f in range(start, stop):
            path = seq.frame_path(f)
            img = None if path in self.bad_frames else read_frame(path, seq.image_size)
            if img is None:
                if path not in self.bad_frames:
                    self.bad_frames.add(path)
                    log.warning("%s: unreadable frame %s (every window with it is skipped; %d window(s) so far)",
                                f"sequence {seq.folder}", path, self.num_skipped + 1)
                return None
            frames.append(img)
        out = {k: [] for k in sample_spec(1, 1) if k != "timestamp"}
        for f, img in zip(range(start, stop), frames):
            for key, value in self._frame(seq, f, img, jitter).items():
                out[key].append(value)
        sample = {k: np.stack(v) for k, v in out.items() if k not in ("seq_index", "frame_index")}
        return _with_window_keys(sample, seq, seq_id, start, stop)

    def _load_tokens(self, seq_id: int, start: int, stop: int, jitter: _Jitter) -> dict[str, np.ndarray] | None:
        """A window's sample with the precomputed tokens in place of the images (None: a frame had no token)."""
        seq, tokens = self.sequences[seq_id], self.frame_tokens[seq_id][start:stop]
        if not np.isfinite(tokens).all():  # a frame the token pass could not read
            return None
        rows = [self._geometry(seq, f, jitter)[0] for f in range(start, stop)]
        sample = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        sample["tokens"] = tokens.copy()
        return _with_window_keys(sample, seq, seq_id, start, stop)

    def annotations(self) -> dict[str, np.ndarray]:
        """The last frame of every window as the samples carry it (mirrored, converted; no augmentation), without
        reading an image: ``{key: [n, ...]}`` for every key of :func:`sample_spec` but ``img`` and ``timestamp``."""
        rows = []
        for j in range(len(self)):
            seq_id, _, stop = self.index[j]
            row = self._geometry(self.sequences[seq_id], stop - 1, _Jitter())[0]
            rows.append({**row, "seq_index": np.int64(seq_id), "frame_index": np.int64(stop - 1)})
        return _to_float32({k: np.stack([r[k] for r in rows]) for k in rows[0]})

    def sample_annotations(self, n: int) -> dict[str, np.ndarray]:
        """``n`` random windows' last frames, each with its own augmentation jitter, without reading an image:
        ``{key: [n, ...]}`` as :meth:`annotations` (only windows ending at a valid frame exist). Uses torch's RNG,
        like the augmentation (seeded per worker, restored on resume)."""
        rows = []
        for j in torch.randint(0, len(self), (n,)).tolist():
            seq_id, _, stop = self.index[j]
            rows.append(self._geometry(self.sequences[seq_id], stop - 1, self._sample_jitter())[0])
        return _to_float32({k: np.stack([r[k] for r in rows]) for k in rows[0]})

    def _frame(self, seq: HandSequence, f: int, img: np.ndarray, jitter: _Jitter) -> dict[str, np.ndarray]:
        out, M = self._geometry(seq, f, jitter)
        crop = cv2.warpAffine(img, M[:2], (self.img_size, self.img_size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
        return {"img": self._normalise(crop, jitter), **out}

    def _geometry(self, seq: HandSequence, f: int, jitter: _Jitter) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Everything of frame ``f`` but its pixels, and the image-to-crop map ``M [3, 3]``."""
        mirror = int(seq["hand_side"][f]) == LEFT
        M, R, box, orig_princpt, s = crop_transform(
            seq["bbox"][f], seq["focal"][f], seq["princpt"][f], seq.image_size[0], mirror,
            self.img_size, self.bbox_scale, jitter,
        )
        # 2D target through the image path (the warp), 3D target through the camera path (rotation R).
        uv = seq["joints_cam"][f, :, :2] / seq["joints_cam"][f, :, 2:] * seq["focal"][f] + seq["princpt"][f]
        joints_2d = uv.astype(np.float64) @ M[:2, :2].T + M[:2, 2]

        pose, trans, joints = to_right_camera(
            seq["mano_pose"][f], seq["mano_shape"][f], seq["mano_trans"][f], seq["joints_cam"][f], mirror, R,
            self.root_joint,
        )
        mean = self.root_joint.hands_mean
        fingers_effective = pose[3:] if seq.flat_hand_mean else pose[3:] + mean
        fingers = fingers_effective if self.flat_hand_mean else fingers_effective - mean
        return {
            "bbox": box,
            "focal": seq["focal"][f] * s,
            "princpt": (orig_princpt - box[:2]) * s,
            "orig_focal": seq["focal"][f],
            "orig_princpt": orig_princpt,
            "mano_pose": np.concatenate([pose[:3], fingers]),
            "mano_shape": seq["mano_shape"][f],
            "mano_trans": trans,
            "joints_cam": joints,
            "joints_2d": joints_2d,
            "valid": seq["valid"][f],
            "hand_side": seq["hand_side"][f].astype(np.int64),
        }, M

    def _normalise(self, bgr: np.ndarray, jitter: _Jitter) -> np.ndarray:
        """``[H, W, 3]`` BGR uint8 -> ``[3, H, W]`` RGB float32, colour-jittered, ImageNet-normalised."""
        if self.augment is not None:  # uint8 OpenCV arithmetic (saturating): a fraction of numpy's cost
            img = cv2.convertScaleAbs(bgr, alpha=jitter.brightness)
            mean = float(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).mean())
            img = cv2.addWeighted(img, jitter.contrast, img, 0.0, (1.0 - jitter.contrast) * mean)
            gray = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
            bgr = cv2.addWeighted(img, jitter.saturation, gray, 1.0 - jitter.saturation, 0.0)
        return cv2.dnn.blobFromImageWithParams(bgr, _BLOB_PARAMS)[0]


def annotation_batch(dataset: HandWindowDataset) -> dict[str, torch.Tensor]:
    """A dataset's last-frame annotations (:meth:`HandWindowDataset.annotations`, no image read) as one batch of
    ``[n, 1, ...]`` tensors, the layout the metrics' batch functions take."""
    return {k: torch.from_numpy(v)[:, None] for k, v in dataset.annotations().items()}


def _with_window_keys(sample: Mapping[str, np.ndarray], seq: HandSequence, seq_id: int, start: int,
                      stop: int) -> dict[str, np.ndarray]:
    """A window's per-frame arrays plus its timestamps (relative to its first frame), sequence and frame indices,
    floats as float32."""
    return _to_float32({
        **sample, "timestamp": seq["timestamp"][start:stop] - seq["timestamp"][start],
        "seq_index": np.full(stop - start, seq_id, np.int64), "frame_index": np.arange(start, stop, dtype=np.int64),
    })


def _to_float32(sample: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cast float arrays to float32 (the batch dtype), leaving bool/int arrays alone."""
    return {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v for k, v in sample.items()}


def denormalise(img: np.ndarray | torch.Tensor) -> np.ndarray:
    """``[..., 3, H, W]`` normalised RGB -> ``[..., H, W, 3]`` uint8 RGB (for logging and tests)."""
    x = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    x = np.moveaxis(x, -3, -1) * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)

"""On-disk format of hand pose sequences (synthetic and converted real data): read, write, validate.

The layout below is the contract that converters (HO3D, DexYCB, InterHand2.6M, ...) target; the dataset only
ever reads this format. Nothing here crops, mirrors or augments (see ``handpose.data.dataset``).

Layout::

    ROOT/
      splits.json                 {"train": [names], "val": [names], "test": [names]}  (test/val optional)
      <name>/                     one folder per sequence: one hand of one camera, frames in time order
        meta.json
        annotations.npz
        frames/000000.jpg         frame i of the arrays is frames/{i:06d}.jpg (i = 0 .. N-1, no gaps)
        frames/000001.jpg ...

``splits.json`` maps a split name to sequence folder names relative to ROOT; a sequence is in one split only.

``meta.json`` (one JSON object)::

    format_version  1
    num_frames      N (int), the number of frames and the length of every array
    image_size      [W, H] of every JPEG of the sequence (pixels)
    fps             nominal capture rate (float > 0); the true time of each frame is its timestamp
    flat_hand_mean  convention of mano_pose[:, 3:]: true = pose is relative to the flat hand (HO3D),
                    false = relative to MANO's mean hand pose `hands_mean` (DexYCB, InterHand2.6M, FreiHAND,
                    smplx's default); the global orientation mano_pose[:, :3] is the same in both
    mano_model      "procedural" (``common.mano.load_mano_arrays(None)``, the synthetic set) or "official"
                    (MANO_RIGHT/LEFT files); the MANO parameters only reproduce joints_cam with that model
    source          free text: "synthetic", "ho3d_v3", "dexycb", ... (optional "extra": any JSON object)

``annotations.npz`` (``np.savez``, no pickles), N frames, every value finite, per frame::

    timestamp   [N]        float64  seconds, strictly increasing; gaps mean dropped frames
    mano_pose   [N, 48]    float32  axis-angle: global orientation (3) then 15 finger joints x 3 in MANO's
                                    native order (index 1-3, middle, pinky, ring, thumb), camera space
    mano_shape  [N, 10]    float32  MANO betas
    mano_trans  [N, 3]     float32  metres, camera space: vertices = MANO(pose, shape) + trans, where the
                                    global orientation rotates about the (shape-dependent) root joint
    joints_cam  [N, 21, 3] float32  metres, camera space, OpenPose/FreiHAND order (common.mano.JOINT_NAMES_21),
                                    z > 0; this is the reference GT, the MANO fit must reproduce it
    focal       [N, 2]     float32  fx, fy in pixels (> 0)
    princpt     [N, 2]     float32  cx, cy in pixels
    bbox        [N, 4]     float32  x0, y0, x1, y1: tight box of the hand, clipped to the image
                                    (0 <= x0 < x1 <= W, 0 <= y0 < y1 <= H)
    hand_side   [N]        int8     0 = right, 1 = left (annotation in the MANO model of that side)
    valid       [N]        bool     false = do not supervise this frame (annotation unreliable or missing);
                                    the frame is still used as temporal context, so all of its fields must
                                    hold usable values (converters copy the nearest valid frame's values)

Optional, per frame (all false when absent):

occluded    [N]        bool     the hand is partly hidden by another object (evaluation reports this subset)

Other keys in the npz are allowed and ignored. Camera space is OpenCV's: x right, y down, z forward;
pixel coordinates have integer values at pixel centres, so a camera-space point projects to
``u = fx * x / z + cx``, ``v = fy * y / z + cy``. Frames are 8-bit 3-channel JPEGs. Left hands are stored as
left hands (``hand_side`` 1, MANO_LEFT parameters with the left-shapedirs fix that ``common.mano`` applies;
DexYCB fitted its left hands without it); the dataset mirrors them to right hands when loading.

Converter notes: move everything into the camera frame of the images. A rigid change of frame ``(R, T)``
turns the global orientation into ``R @ R_g`` and ``mano_trans`` into ``R @ (J0 + t) + T - J0``, where
``J0 = J_regressor[0] @ (v_template + shapedirs @ betas)`` is the rest-pose root joint (MANO rotates about it).
HO3D is in OpenGL axes (``R = diag(1, -1, -1)``) with ``flat_hand_mean`` true; InterHand2.6M stores MANO in
world space (apply the camera extrinsics); DexYCB, InterHand2.6M and FreiHAND use ``flat_hand_mean`` false.
Check a conversion by running ``common.mano.ManoLayer`` on (pose, shape, trans) against ``joints_cam``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import simplejpeg

from common.data.staging import staged_folder

FORMAT_VERSION = 1
META_FILE = "meta.json"
ANNOTATION_FILE = "annotations.npz"
FRAMES_DIR = "frames"
FRAME_NAME = "{:06d}.jpg"
SPLITS_FILE = "splits.json"
MANO_MODELS = ("procedural", "official")
RIGHT, LEFT = 0, 1

# name -> (per-frame shape, dtype on disk and in memory)
ARRAY_SPECS: dict[str, tuple[tuple[int, ...], type]] = {
    "timestamp": ((), np.float64),
    "mano_pose": ((48,), np.float32),
    "mano_shape": ((10,), np.float32),
    "mano_trans": ((3,), np.float32),
    "joints_cam": ((21, 3), np.float32),
    "focal": ((2,), np.float32),
    "princpt": ((2,), np.float32),
    "bbox": ((4,), np.float32),
    "hand_side": ((), np.int8),
    "valid": ((), np.bool_),
}
# Optional per-frame fields and the value a sequence without them gets.
OPTIONAL_ARRAY_SPECS: dict[str, tuple[tuple[int, ...], type, object]] = {
    "occluded": ((), np.bool_, False),
}
# A bbox may reach this far past the image border (converters round; JPEG sizes are integers).
BBOX_TOLERANCE_PX = 1.0


class SequenceFormatError(ValueError):
    """A sequence folder does not follow the format; the message names the sequence and the field."""


@dataclass(frozen=True)
class HandSequence:
    """One sequence as stored: arrays ``[N, ...]`` (see the module docstring) plus metadata."""

    folder: Path
    arrays: Mapping[str, np.ndarray]
    fps: float
    flat_hand_mean: bool
    mano_model: str
    source: str
    image_size: tuple[int, int]  # (W, H)
    extra: Mapping = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.folder.name

    def __len__(self) -> int:
        return len(self.arrays["timestamp"])

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def frame_path(self, i: int) -> Path:
        return self.folder / FRAMES_DIR / FRAME_NAME.format(i)


def _fail(where: str, msg: str) -> SequenceFormatError:
    return SequenceFormatError(f"{where}: {msg}")


def validate_arrays(arrays: Mapping[str, np.ndarray], image_size: tuple[int, int], where: str) -> dict:
    """Check every field of ``arrays`` against the format; return them converted to the format's dtypes.

    Raises :class:`SequenceFormatError` naming ``where`` (the sequence), the field and the first bad frame.
    """
    missing = [k for k in ARRAY_SPECS if k not in arrays]
    if missing:
        raise _fail(where, f"missing field(s) {missing}")
    n = None
    out: dict[str, np.ndarray] = {}
    for key, (frame_shape, dtype) in ARRAY_SPECS.items():
        a = np.asarray(arrays[key])
        if n is None:
            n = a.shape[0] if a.ndim else -1
        if a.shape != (n, *frame_shape) or n < 1:
            want = ("N", *frame_shape)
            raise _fail(where, f"field '{key}' has shape {a.shape}, expected {want} with N = {max(n, 0)} >= 1")
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise _fail(where, f"field '{key}' has non-numeric dtype {a.dtype}")
        if np.issubdtype(a.dtype, np.floating):
            bad = ~np.isfinite(a.reshape(n, -1)).all(axis=1)
            if bad.any():
                raise _fail(where, f"field '{key}' is not finite (NaN/inf) at frame {int(np.argmax(bad))}")
        out[key] = a.astype(dtype, copy=False)

    def first(bad: np.ndarray) -> int:
        return int(np.argmax(bad))

    ts = out["timestamp"]
    if n > 1 and not (np.diff(ts) > 0).all():
        raise _fail(where, f"field 'timestamp' is not strictly increasing at frame {first(np.diff(ts) <= 0) + 1}")
    if (out["focal"] <= 0).any():
        raise _fail(where, f"field 'focal' is not positive at frame {first((out['focal'] <= 0).any(1))}")
    side = np.asarray(arrays["hand_side"])
    if not np.isin(side, (RIGHT, LEFT)).all():
        raise _fail(where, f"field 'hand_side' must be 0 (right) or 1 (left), frame {first(~np.isin(side, (0, 1)))}")
    valid = np.asarray(arrays["valid"])
    if not np.isin(valid, (0, 1)).all():
        raise _fail(where, f"field 'valid' must be boolean, frame {first(~np.isin(valid, (0, 1)))}")
    if (out["joints_cam"][..., 2] <= 0).any():
        raise _fail(where, f"field 'joints_cam' has z <= 0 (behind the camera) at frame "
                           f"{first((out['joints_cam'][..., 2] <= 0).any(1))}")
    w, h = image_size
    x0, y0, x1, y1 = out["bbox"].T
    tol = BBOX_TOLERANCE_PX
    bad = (x1 <= x0) | (y1 <= y0)
    if bad.any():
        raise _fail(where, f"field 'bbox' is empty (x1 <= x0 or y1 <= y0) at frame {first(bad)}: "
                           f"{out['bbox'][first(bad)].tolist()}")
    bad = (x0 < -tol) | (y0 < -tol) | (x1 > w + tol) | (y1 > h + tol)
    if bad.any():
        raise _fail(where, f"field 'bbox' lies outside the {w}x{h} image at frame {first(bad)}: "
                           f"{out['bbox'][first(bad)].tolist()} (clip it to the image)")
    for key, (frame_shape, dtype, default) in OPTIONAL_ARRAY_SPECS.items():
        if key not in arrays:
            out[key] = np.full((n, *frame_shape), default, dtype)
            continue
        a = np.asarray(arrays[key])
        if a.shape != (n, *frame_shape):
            raise _fail(where, f"optional field '{key}' has shape {a.shape}, expected {('N', *frame_shape)} with N = {n}")
        if dtype is np.bool_ and not np.isin(a, (0, 1)).all():
            raise _fail(where, f"optional field '{key}' must be boolean, frame {int(np.argmax(~np.isin(a, (0, 1))))}")
        out[key] = a.astype(dtype, copy=False)
    return out


def _validate_meta(meta: Mapping, where: str) -> None:
    for key in ("format_version", "num_frames", "image_size", "fps", "flat_hand_mean", "mano_model", "source"):
        if key not in meta:
            raise _fail(where, f"{META_FILE} lacks '{key}'")
    if meta["format_version"] != FORMAT_VERSION:
        raise _fail(where, f"{META_FILE} format_version {meta['format_version']!r}, expected {FORMAT_VERSION}")
    size = meta["image_size"]
    if not (isinstance(size, list | tuple) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise _fail(where, f"{META_FILE} 'image_size' must be [W, H] positive ints, got {size!r}")
    if not (isinstance(meta["fps"], int | float) and meta["fps"] > 0):
        raise _fail(where, f"{META_FILE} 'fps' must be a positive number, got {meta['fps']!r}")
    if not isinstance(meta["flat_hand_mean"], bool):
        raise _fail(where, f"{META_FILE} 'flat_hand_mean' must be true or false, got {meta['flat_hand_mean']!r}")
    if meta["mano_model"] not in MANO_MODELS:
        raise _fail(where, f"{META_FILE} 'mano_model' must be one of {MANO_MODELS}, got {meta['mano_model']!r}")


def read_sequence(folder: str | Path, check_frames: bool = True) -> HandSequence:
    """Read and validate one sequence folder.

    With ``check_frames`` every ``frames/{i:06d}.jpg`` must exist (a missing one is an error naming it);
    their content is decoded only when the dataset loads them.
    """
    folder = Path(folder)
    where = f"sequence {folder}"
    if not folder.is_dir():
        raise _fail(where, "folder does not exist")
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise _fail(where, f"cannot read {META_FILE}: {e}") from e
    _validate_meta(meta, where)
    try:
        with np.load(folder / ANNOTATION_FILE, allow_pickle=False) as npz:
            raw = {k: npz[k] for k in npz.files if k in ARRAY_SPECS or k in OPTIONAL_ARRAY_SPECS}
    except Exception as e:  # noqa: BLE001 - numpy / zipfile / zlib errors of a truncated or corrupt file
        raise _fail(where, f"cannot read {folder / ANNOTATION_FILE} ({type(e).__name__}: {e})") from e
    image_size = (int(meta["image_size"][0]), int(meta["image_size"][1]))
    arrays = validate_arrays(raw, image_size, where)
    n = len(arrays["timestamp"])
    if meta["num_frames"] != n:
        raise _fail(where, f"{META_FILE} num_frames {meta['num_frames']} but the arrays have {n} frames")
    seq = HandSequence(folder, arrays, float(meta["fps"]), meta["flat_hand_mean"], meta["mano_model"],
                       str(meta["source"]), image_size, meta.get("extra", {}))
    if check_frames:
        for i in range(n):
            if not seq.frame_path(i).is_file():
                raise _fail(where, f"frame {i}: missing image {seq.frame_path(i)}")
    return seq


def _encode_frame(frame: np.ndarray | bytes | Path | str, quality: int, where: str) -> tuple[bytes, tuple]:
    """Frame as JPEG bytes plus its (W, H). ``frame`` is a BGR uint8 ``[H, W, 3]`` array, JPEG bytes or a path."""
    if isinstance(frame, np.ndarray):
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise _fail(where, f"frame must be uint8 [H, W, 3] BGR, got {frame.dtype} {frame.shape}")
        ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise _fail(where, "JPEG encoding failed")
        return buf.tobytes(), (frame.shape[1], frame.shape[0])
    data = Path(frame).read_bytes() if isinstance(frame, str | Path) else bytes(frame)
    try:  # strict: a PNG, a truncated file or damaged scan data is refused here, not stored as a broken .jpg
        img = simplejpeg.decode_jpeg(data, colorspace="BGR", strict=True)
    except ValueError as err:
        raise _fail(where, f"frame is not a readable JPEG ({err})") from None
    return data, (img.shape[1], img.shape[0])


def write_sequence(
    folder: str | Path,
    frames: Iterable[np.ndarray | bytes | Path | str],
    arrays: Mapping[str, np.ndarray],
    *,
    fps: float,
    flat_hand_mean: bool,
    mano_model: str,
    source: str,
    extra: Mapping | None = None,
    jpeg_quality: int = 92,
    overwrite: bool = False,
) -> HandSequence:
    """Validate ``arrays`` (keys of :data:`ARRAY_SPECS`) and write a sequence folder with its JPEG frames.

    ``frames`` yields, in order, one BGR uint8 ``[H, W, 3]`` image, JPEG bytes or a JPEG path per frame (all of
    one size). The folder is written under a temporary name and renamed at the end, so a crash never leaves a
    half-written sequence. Returns the sequence as :func:`read_sequence` would.
    """
    folder = Path(folder)
    where = f"sequence {folder}"
    if folder.exists() and not overwrite:
        raise _fail(where, "folder exists (pass overwrite=True to replace it)")
    with staged_folder(folder) as tmp:
        (tmp / FRAMES_DIR).mkdir()
        image_size = None
        count = 0
        for i, frame in enumerate(frames):
            data, size = _encode_frame(frame, jpeg_quality, f"{where} frame {i}")
            if image_size is not None and size != image_size:
                raise _fail(where, f"frame {i} is {size[0]}x{size[1]}, frame 0 is {image_size[0]}x{image_size[1]}")
            image_size = size
            (tmp / FRAMES_DIR / FRAME_NAME.format(i)).write_bytes(data)
            count += 1
        if image_size is None:
            raise _fail(where, "no frames")
        checked = validate_arrays(arrays, image_size, where)
        n = len(checked["timestamp"])
        if count != n:
            raise _fail(where, f"{count} frames for {n} annotated frames")
        meta = {
            "format_version": FORMAT_VERSION, "num_frames": n, "image_size": list(image_size), "fps": float(fps),
            "flat_hand_mean": bool(flat_hand_mean), "mano_model": mano_model, "source": source,
            "extra": dict(extra or {}),
        }
        _validate_meta(meta, where)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        np.savez(tmp / ANNOTATION_FILE, **checked)
    return read_sequence(folder)


def read_splits(root: str | Path) -> dict[str, list[str]]:
    """``ROOT/splits.json`` as ``{split: [sequence names]}``; errors name the file and the bad entry."""
    path = Path(root) / SPLITS_FILE
    try:
        splits = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SequenceFormatError(f"{path}: cannot read the splits file: {e}") from e
    if not isinstance(splits, dict) or not all(
        isinstance(v, list) and all(isinstance(s, str) for s in v) for v in splits.values()
    ):
        raise SequenceFormatError(f"{path}: expected {{split: [sequence names]}}")
    seen: dict[str, str] = {}
    for split, names in splits.items():
        for name in names:
            if name in seen:
                raise SequenceFormatError(f"{path}: sequence {name!r} is in both '{seen[name]}' and '{split}'")
            seen[name] = split
    return splits


def write_splits(root: str | Path, splits: Mapping[str, list[str]]) -> Path:
    path = Path(root) / SPLITS_FILE
    path.write_text(json.dumps({k: list(v) for k, v in splits.items()}, indent=1))
    return path

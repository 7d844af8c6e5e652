"""Reading and validating one BEAT2-like corpus of SAM-3D-Body (MHR) motion, 16 kHz speech and word TextGrids.

Every check names the clip and the field it rejects (``CorpusError``); the cache builder turns those into a hard
error (strict) or a counted skip (non-strict). This module reads; ``preprocess.py`` builds the cache.

Corpus layout (``root/``)::

    train_test_split.csv          columns ``id,type``; type in train | val | test | additional
                                  (additional clips are used for training only with use_additional=true)
    mhr_30/<id>.npz               SAM-3D-Body outputs stacked over the clip's N frames (30 fps):
        body_pose_params  [N, 133]   130 body + 3 jaw
        hand_pose_params  [N, 108]   2 x 54 PCA, left then right
        expr_params       [N, 72]
        global_rot        [N, 3]     Euler ZYX
        pred_cam_t        [N, 3]     averaged into the per-clip cam_t
        shape_params      [45] or [N, 45]      per clip or per frame (averaged)
        scale_params      [28] or [N, 28]      per clip or per frame (averaged)
        focal_length      [] / [1] or [N] / [N, 1]
        width, height     [] or [1]            image size in pixels
        pred_keypoints_3d [N, 70, 3]  optional, MHR70 order, metres; foot contact is computed from it
        contact           [N, 4]      optional, used when pred_keypoints_3d is absent (values in [0, 1])
        vid               []          optional raw speaker id; -1 = unknown speaker
        fps               []          optional; must equal the configured fps (30)
    wave16k/<id>.wav              mono speech (other rates are resampled to 16 kHz); at least as long as the
                                  motion minus one frame; longer audio is trimmed to the motion
    textgrid/<id>.TextGrid        Praat TextGrid with an interval tier named "words" (or "word")

Speaker of a clip: ``vid`` when present and >= 0; otherwise the BEAT name ``<spk>_<name>_<a>_<b>_<c>``
(``2_scott_0_1_1`` -> 2); otherwise the unknown speaker. Foot contact (4 channels, order of
``gesture.layout.CONTACT_JOINTS``: left ankle 13, right ankle 14, left big toe 15, right big toe 18 in MHR70) is 1
where the joint moves less than ``contact_threshold`` metres per frame; without keypoints the ``contact`` key is
used, and without either, all ones (with a warning).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gesture.data.audio import AudioError, fit_to_frames, load_wave
from gesture.data.speakers import UNKNOWN_RAW, speaker_from_name
from gesture.data.textgrid import WORD_TIER_NAMES, TextGridError, WordInterval, read_words
from gesture.layout import CONTACT_DIM, CONTACT_JOINTS, FRAME_KEYS, ClipConstants, pack

log = logging.getLogger(__name__)

SPLIT_TYPES = ("train", "val", "test", "additional")
PER_FRAME_KEYS: dict[str, tuple[int, ...]] = {**{k: (v,) for k, v in FRAME_KEYS.items()}, "pred_cam_t": (3,)}
KEYPOINTS_SHAPE = (70, 3)


class CorpusError(ValueError):
    """A clip cannot be used: ``clip`` and ``field`` name what was rejected."""

    def __init__(self, clip: str, field: str, message: str):
        super().__init__(f"clip {clip!r}, field {field!r}: {message}")
        self.clip, self.field, self.reason = clip, field, message


@dataclass(frozen=True)
class CorpusConfig:
    """Where the files are and how motion, audio and words are read."""

    fps: float = 30.0
    sr: int = 16000
    motion_dir: str = "mhr_30"
    wave_dir: str = "wave16k"
    textgrid_dir: str = "textgrid"
    split_file: str = "train_test_split.csv"
    word_tiers: tuple[str, ...] = WORD_TIER_NAMES
    contact_joints: tuple[int, ...] = tuple(CONTACT_JOINTS.values())
    contact_threshold: float = 0.01  # metres per frame (EMAGE: 0.01 on SMPL-X joints)

    def paths(self, root: Path, clip: str) -> dict[str, Path]:
        return {
            "npz": root / self.motion_dir / f"{clip}.npz",
            "wav": root / self.wave_dir / f"{clip}.wav",
            "textgrid": root / self.textgrid_dir / f"{clip}.TextGrid",
        }


@dataclass
class RawClip:
    """One validated clip. ``vec [N, 320]`` may hold non-finite rows only where ``valid`` is False."""

    name: str
    vec: np.ndarray  # [N, 320] float32
    valid: np.ndarray  # [N] bool
    wave: np.ndarray  # [frame_bounds(N)[-1]] float32, exactly aligned with the frames
    words: list[WordInterval]
    raw_speaker: int | None
    constants: ClipConstants
    contact_source: str  # "keypoints" | "contact" | "ones"
    # field -> (number of non-finite frames, first such frame)
    invalid_fields: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return len(self.vec)


def read_split(root: Path, cfg: CorpusConfig = CorpusConfig()) -> dict[str, str]:
    """``{clip id: type}`` from the split file, in file order; bad rows raise naming the row."""
    path = root / cfg.split_file
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    out: dict[str, str] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"id", "type"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: header must have columns 'id,type', got {reader.fieldnames}")
        for row_no, row in enumerate(reader, 2):
            clip, kind = (row["id"] or "").strip(), (row["type"] or "").strip()
            if not clip or kind not in SPLIT_TYPES:
                raise ValueError(f"{path}:{row_no}: bad row {row} (type must be one of {SPLIT_TYPES})")
            if clip in out:
                raise ValueError(f"{path}:{row_no}: clip {clip!r} listed twice")
            out[clip] = kind
    return out


def _array(npz: Mapping, clip: str, key: str) -> np.ndarray:
    try:
        return np.asarray(npz[key])
    except KeyError:
        raise CorpusError(clip, key, "missing key") from None
    except Exception as e:  # zip / zlib / format errors of a damaged archive member
        raise CorpusError(clip, key, f"unreadable: {type(e).__name__}: {e}") from e


def _floats(npz: Mapping, clip: str, key: str, dtype=np.float32) -> np.ndarray:
    a = _array(npz, clip, key)
    if a.dtype.kind not in "biuf":
        raise CorpusError(clip, key, f"dtype {a.dtype} is not numeric")
    return a.astype(dtype)


def _per_clip(npz: Mapping, clip: str, key: str, size: int, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A per-clip vector given as ``[size]`` or ``[N, size]`` (scalars: ``[]``, ``[1]``, ``[N]``, ``[N, 1]``).

    Returns ``(value [n or 1, size], per_frame)``; per_frame is the ``[n, size]`` array when given per frame."""
    a = _floats(npz, clip, key, np.float64)
    if size == 1:
        if a.size == 1:
            return a.reshape(1, 1), None
        if a.shape in ((n,), (n, 1)):
            return a.reshape(n, 1), a.reshape(n, 1)
    elif a.shape in ((size,), (1, size)):
        return a.reshape(1, size), None
    elif a.shape == (n, size):
        return a, a
    want = f"a scalar or ({n},)" if size == 1 else f"({size},) or ({n}, {size})"
    raise CorpusError(clip, key, f"shape {a.shape}, expected {want}")


def foot_contact(keypoints: np.ndarray, joints: tuple[int, ...], threshold: float) -> np.ndarray:
    """Contact ``[N, 4]`` from MHR70 keypoints ``[N, 70, 3]``: 1 where the joint moves < threshold per frame.

    Speed of frame t is ``|p[t+1] - p[t]|`` (the last frame repeats the previous speed); non-finite speeds count as
    contact (standing is the common case and those frames are dropped anyway)."""
    feet = keypoints[:, list(joints)].astype(np.float64)  # [N, 4, 3]
    if len(feet) < 2:
        return np.ones((len(feet), len(joints)), dtype=np.float32)
    speed = np.linalg.norm(np.diff(feet, axis=0), axis=-1)  # [N-1, 4]
    speed = np.concatenate([speed, speed[-1:]], axis=0)
    return np.where(np.isfinite(speed), speed < threshold, True).astype(np.float32)


def load_clip(root: Path, clip: str, cfg: CorpusConfig = CorpusConfig()) -> RawClip:
    """Read and validate one clip; raise ``CorpusError`` naming the clip and field on any defect.

    Non-finite frames are not an error here: they are marked in ``valid`` and counted in ``invalid_fields``; the
    caller decides (strict: raise, non-strict: drop those frames)."""
    paths = cfg.paths(root, clip)
    for fld, p in paths.items():
        if not p.is_file():
            raise CorpusError(clip, fld, f"missing file {p}")
    try:
        npz_file = np.load(paths["npz"], allow_pickle=False)
    except Exception as e:
        raise CorpusError(clip, "npz", f"unreadable: {e}") from e
    with npz_file as npz:
        frames = {k: _floats(npz, clip, k) for k in PER_FRAME_KEYS}
        body = frames["body_pose_params"]
        n = body.shape[0] if body.ndim >= 1 else -1
        for k, tail in PER_FRAME_KEYS.items():
            if frames[k].ndim != 1 + len(tail) or frames[k].shape[1:] != tail or frames[k].shape[0] != n:
                # the body's own frame count is N when it is itself malformed ([N, 133, 1], a scalar, ...)
                frames_text = str(n) if k != "body_pose_params" and body.shape[1:] == PER_FRAME_KEYS[
                    "body_pose_params"] else "N"
                expected = ", ".join([frames_text, *map(str, tail)])
                raise CorpusError(clip, k, f"shape {frames[k].shape}, expected ({expected}): one row per frame")
        if n < 1:
            raise CorpusError(clip, "body_pose_params", "no frames")
        if "fps" in npz.files:
            fps = float(_floats(npz, clip, "fps").reshape(-1)[0])
            if abs(fps - cfg.fps) > 1e-3:
                raise CorpusError(clip, "fps", f"{fps} fps, the corpus is read at {cfg.fps} fps (no resampling)")
        per_clip = {k: _per_clip(npz, clip, k, s, n) for k, s in
                    (("shape_params", 45), ("scale_params", 28), ("focal_length", 1))}
        size = {}
        for k in ("width", "height"):
            a = _floats(npz, clip, k, np.float64).reshape(-1)
            if a.size < 1 or not np.isfinite(a).all() or a[0] <= 0:
                raise CorpusError(clip, k, f"expected a positive scalar, got {a[:3]}")
            size[k] = int(a[0])
        keypoints = contact = None
        if "pred_keypoints_3d" in npz.files:
            keypoints = _floats(npz, clip, "pred_keypoints_3d")
            if keypoints.shape != (n, *KEYPOINTS_SHAPE):
                raise CorpusError(clip, "pred_keypoints_3d", f"shape {keypoints.shape}, expected ({n}, 70, 3)")
        elif "contact" in npz.files:
            contact = _floats(npz, clip, "contact")
            if contact.shape != (n, CONTACT_DIM):
                raise CorpusError(clip, "contact", f"shape {contact.shape}, expected ({n}, {CONTACT_DIM})")
        vid = None
        if "vid" in npz.files:
            v = _floats(npz, clip, "vid", np.float64).reshape(-1)
            if v.size != 1 or not np.isfinite(v).all() or float(v[0]) != int(v[0]) or int(v[0]) < UNKNOWN_RAW:
                raise CorpusError(clip, "vid", f"expected one integer >= -1, got {v[:3]}")
            vid = int(v[0])

    # Frames where any per-frame input is non-finite are invalid; per-clip values must be finite.
    bad: dict[str, np.ndarray] = {k: ~np.isfinite(a).reshape(n, -1).all(axis=1) for k, a in frames.items()}
    for k, (value, per_frame) in per_clip.items():
        if per_frame is not None:
            bad[k] = ~np.isfinite(per_frame).all(axis=1)
        elif not np.isfinite(value).all():
            raise CorpusError(clip, k, "non-finite value")
    if keypoints is not None:
        bad["pred_keypoints_3d"] = ~np.isfinite(keypoints[:, list(cfg.contact_joints)]).reshape(n, -1).all(axis=1)
        contact_vec, source = foot_contact(keypoints, cfg.contact_joints, cfg.contact_threshold), "keypoints"
    elif contact is not None:
        bad["contact"] = ~np.isfinite(contact).all(axis=1)
        if (np.nan_to_num(contact, nan=0.5) < 0).any() or (np.nan_to_num(contact, nan=0.5) > 1).any():
            raise CorpusError(clip, "contact", "values outside [0, 1]")
        contact_vec, source = contact, "contact"
    else:
        contact_vec, source = np.ones((n, CONTACT_DIM), dtype=np.float32), "ones"
    invalid = np.zeros(n, dtype=bool)
    for m in bad.values():
        invalid |= m
    if invalid.all():
        first = next(k for k, m in bad.items() if m.any())
        raise CorpusError(clip, first, "every frame is non-finite")

    def clip_mean(value: np.ndarray) -> tuple[float, ...]:
        rows = value[~invalid] if len(value) == n else value
        return tuple(float(x) for x in rows.mean(axis=0))

    constants = ClipConstants(
        cam_t=clip_mean(frames["pred_cam_t"].astype(np.float64)),  # type: ignore[arg-type]
        focal_length=clip_mean(per_clip["focal_length"][0])[0],
        scale_params=clip_mean(per_clip["scale_params"][0]),
        shape_params=clip_mean(per_clip["shape_params"][0]),
        width=size["width"],
        height=size["height"],
        fps=cfg.fps,
    )

    try:
        wave = fit_to_frames(load_wave(paths["wav"], cfg.sr), n, cfg.sr, cfg.fps)
    except AudioError as e:
        raise CorpusError(clip, "wav", str(e)) from e
    try:
        words = read_words(paths["textgrid"], cfg.word_tiers)
    except TextGridError as e:
        raise CorpusError(clip, "textgrid", str(e)) from e

    name_speaker = speaker_from_name(clip)
    if vid is not None and vid >= 0:
        if name_speaker is not None and name_speaker != vid:
            log.warning("clip %s: vid %d differs from the speaker in its name (%d); using vid", clip, vid,
                        name_speaker)
        raw_speaker: int | None = vid
    else:
        raw_speaker = name_speaker

    return RawClip(
        name=clip,
        vec=pack(frames, contact_vec).astype(np.float32),
        valid=~invalid,
        wave=wave,
        words=words,
        raw_speaker=raw_speaker,
        constants=constants,
        contact_source=source,
        invalid_fields={k: (int(m.sum()), int(np.argmax(m))) for k, m in bad.items() if m.any()},
    )


def finite_segments(valid: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of True in ``valid [N]`` as ``(start, stop)`` pairs (stop exclusive)."""
    padded = np.concatenate([[False], np.asarray(valid, dtype=bool), [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[0::2], edges[1::2])]

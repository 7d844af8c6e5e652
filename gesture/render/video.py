"""A clip's video (parameter view, the body mesh beside it when a backend is given, the audio muxed in) and the
result npz it is made from."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.video import write_video
from gesture.layout import FRAME_KEYS, POSE_DIM, ClipConstants, pack
from gesture.render.mesh import MeshBackend, mesh_frames
from gesture.render.view import frame_segment, parameter_view, wave_segment


def render_video(motion: np.ndarray, out: str | Path, fps: float = 30.0, gt: np.ndarray | None = None,
                 wave: np.ndarray | None = None, sr: int = 16000, onsets: np.ndarray | None = None,
                 size: tuple[int, int] = (960, 540), start: int = 0, max_frames: int | None = None,
                 title: str | None = None, mesh: MeshBackend | None = None, constants: ClipConstants | None = None,
                 model_params: np.ndarray | None = None) -> Path:
    """Render frames ``[start, start + max_frames)`` of a clip to ``out`` (mp4 with audio, or GIF) -> path written.

    With a ``mesh`` backend (and the clip ``constants``) the body is drawn left of the parameter view.
    """
    motion = np.asarray(motion, np.float64)
    start, stop = frame_segment(motion.shape[0], start, max_frames)
    width, height = size
    frames: Iterable[np.ndarray]
    if mesh is not None:
        if constants is None:
            raise ValueError("render_video: a mesh backend needs the clip constants (cam_t, focal, size)")
        body = mesh_frames(mesh, motion[start:stop], constants, height,
                           None if model_params is None else np.asarray(model_params)[start:stop])
        first = next(body)
        view = parameter_view(motion, fps, gt, wave, sr, onsets, (max(2, width - first.shape[1]) // 2 * 2, height),
                              start, stop - start, title)
        frames = (np.concatenate([b, p], axis=1) for b, p in zip((first, *body), view.frames(), strict=True))
    else:
        view = parameter_view(motion, fps, gt, wave, sr, onsets, (width // 2 * 2, height // 2 * 2), start,
                              stop - start, title)
        frames = view.frames()
    return write_video(frames, out, fps, wave_segment(wave, sr, fps, start, stop), sr)



@dataclass(frozen=True)
class Result:
    """What ``load_result`` reads from a result npz."""

    motion: np.ndarray  # [T, 320] raw
    gt: np.ndarray | None
    fps: float
    wave: np.ndarray | None
    sr: int
    constants: ClipConstants | None
    model_params: np.ndarray | None


def load_result(npz: str | Path, wav: str | Path | None = None) -> Result:
    """Read a result npz: ``motion [T, 320]`` raw (or the SAM-3D-Body keys ``body_pose_params``,
    ``hand_pose_params``, ``expr_params``, ``global_rot`` and ``contact``), optional ``gt [T, 320]``, ``fps``,
    ``wave [S]`` + ``sr``, the ``ClipConstants`` keys and ``mhr_model_params [T, 204]``. ``wav`` overrides ``wave``.
    """
    from gesture.data.audio import load_wave

    path = Path(npz)
    with np.load(path) as data:
        d = {k: data[k] for k in data.files}
    if "motion" in d:
        motion = d["motion"]
    elif all(k in d for k in (*FRAME_KEYS, "contact")):
        motion = pack({k: d[k] for k in FRAME_KEYS}, d["contact"])
    else:
        raise KeyError(f"{path}: needs 'motion' [T, {POSE_DIM}] or the keys {[*FRAME_KEYS, 'contact']}; "
                       f"has {sorted(d)}")
    motion = np.asarray(motion, np.float64)
    if motion.ndim == 3 and motion.shape[0] == 1:
        motion = motion[0]
    if motion.ndim != 2 or motion.shape[1] != POSE_DIM:
        raise ValueError(f"{path}: 'motion' must be [T, {POSE_DIM}], got {motion.shape}")
    gt = d.get("gt")
    if gt is not None:
        gt = np.asarray(gt, np.float64).reshape(-1, POSE_DIM)
        if gt.shape != motion.shape:
            raise ValueError(f"{path}: 'gt' {gt.shape} and 'motion' {motion.shape} differ")
    fps = float(np.asarray(d.get("fps", 30.0)).reshape(-1)[0])
    sr = int(np.asarray(d.get("sr", 16000)).reshape(-1)[0])
    wave = d.get("wave")
    if wav is not None:
        wave = load_wave(wav, sr)
    elif wave is not None:
        wave = np.asarray(wave, np.float32).reshape(-1)
    constants = None
    if all(k in d for k in ("cam_t", "focal_length", "scale_params", "shape_params", "width", "height")):
        constants = ClipConstants.from_dict({**d, "fps": fps})
    return Result(motion, gt, fps, wave, sr, constants, d.get("mhr_model_params"))

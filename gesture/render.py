"""Gesture results as video: a parameter view (waveform with onsets, per-part speed, heatmaps of the 320-d frames,
a moving time cursor) with the audio muxed in, plus a hook for the MHR body mesh when its assets are configured.
CLI: ``python -m gesture.render --npz result.npz [--wav a.wav] --out out.mp4``. Not for metrics or training.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from common.geometry import vertex_normals
from common.video import ffmpeg_exe, has_audio_stream, write_video  # noqa: F401 - re-exported
from gesture.layout import FRAME_KEYS, PARTS, POSE_DIM, ClipConstants, pack, unpack
from gesture.metrics import VELOCITY_PARTS, audio_onsets

log = logging.getLogger(__name__)

CURSOR_RGB = (220, 30, 30)
PART_COLOURS = {"body": "tab:blue", "hand": "tab:green", "face": "tab:purple", "global": "tab:brown"}


# ---------------------------------------------------------------------------------------------- parameter view
def _part_speed(x: np.ndarray, s: slice) -> np.ndarray:
    """``x [T, D] -> [T]`` mean |x_t - x_{t-1}| over the part's dims (first frame repeats the second)."""
    d = np.abs(np.diff(x[:, s], axis=0)).mean(axis=1)
    return np.concatenate([d[:1], d]) if len(d) else np.zeros(len(x))


class ParameterView:
    """The static figure of one segment, drawn once with Agg; ``frame(i)`` adds the cursor with numpy.

    ``motion``, ``gt`` ``[T, 320]`` raw, already cut to the segment; ``wave [S]`` the segment's audio at ``sr``;
    ``onsets`` seconds from the segment start (computed from ``wave`` when not given); ``t0`` the segment's start
    time for the axis labels. ``size = (width, height)`` in pixels.
    """

    def __init__(self, motion: np.ndarray, fps: float, gt: np.ndarray | None = None, wave: np.ndarray | None = None,
                 sr: int = 16000, onsets: np.ndarray | None = None, size: tuple[int, int] = (640, 480),
                 t0: float = 0.0, title: str | None = None) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        motion = np.asarray(motion, np.float64)
        if motion.ndim != 2 or motion.shape[1] != POSE_DIM or motion.shape[0] < 1:
            raise ValueError(f"ParameterView: motion must be [T >= 1, {POSE_DIM}], got {motion.shape}")
        if gt is not None and np.shape(gt) != motion.shape:
            raise ValueError(f"ParameterView: gt {np.shape(gt)} and motion {motion.shape} differ")
        self.num_frames, self.fps, self.t0 = motion.shape[0], fps, t0
        width, height = size
        if onsets is None and wave is not None and len(wave) > 2048:
            onsets = audio_onsets(wave, sr)
        t1 = t0 + self.num_frames / fps
        rows = (["audio"] if wave is not None or onsets is not None else []) + ["speed", "pred"] + (
            ["gt"] if gt is not None else [])
        ratios = {"audio": 1.0, "speed": 1.2, "pred": 2.0, "gt": 2.0}
        dpi = 100
        fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
        canvas = FigureCanvasAgg(fig)
        axes = fig.subplots(len(rows), 1, sharex=True, gridspec_kw={"height_ratios": [ratios[r] for r in rows]})
        axes = np.atleast_1d(axes)
        panels = dict(zip(rows, axes, strict=True))
        fontsize = max(5, min(8, height // 60))
        times = t0 + np.arange(self.num_frames) / fps
        if "audio" in panels:
            ax = panels["audio"]
            if wave is not None and len(wave):
                step = max(1, len(wave) // 4000)
                w = np.asarray(wave, np.float64)[::step]
                ax.plot(t0 + np.arange(len(w)) * step / sr, w, lw=0.4, color="0.3")
                ax.set_ylim(-np.abs(w).max() * 1.05 - 1e-6, np.abs(w).max() * 1.05 + 1e-6)
            if onsets is not None and len(onsets):
                ax.vlines(t0 + np.asarray(onsets), *ax.get_ylim(), color="tab:orange", lw=0.6, label="onsets")
            ax.set_ylabel("audio", fontsize=fontsize)
            ax.set_yticks([])
        ax = panels["speed"]
        ref = gt if gt is not None else motion
        for part, s in VELOCITY_PARTS.items():
            norm = max(float(np.median(_part_speed(ref, s))), 1e-8)
            ax.plot(times, _part_speed(motion, s) / norm, lw=0.7, color=PART_COLOURS[part], label=part)
            if gt is not None:
                ax.plot(times, _part_speed(gt, s) / norm, lw=0.6, ls="--", color=PART_COLOURS[part], alpha=0.7)
        ax.set_ylabel("speed\n(÷ median)", fontsize=fontsize)
        ax.legend(fontsize=fontsize - 1, ncol=4, loc="upper right", frameon=False)
        mean, std = ref.mean(axis=0), np.maximum(ref.std(axis=0), 1e-6)
        for key, data, label in (("pred", motion, "prediction"), ("gt", gt, "ground truth")):
            if key not in panels:
                continue
            ax = panels[key]
            z = np.clip((data - mean) / std, -3, 3).T  # [320, T]
            ax.imshow(z, aspect="auto", cmap="coolwarm", vmin=-3, vmax=3, interpolation="nearest",
                      extent=(t0, t1, POSE_DIM, 0))
            for s in PARTS.values():
                ax.axhline(s.start, color="k", lw=0.4)
            ax.set_yticks([(s.start + s.stop) / 2 for s in PARTS.values()], list(PARTS), fontsize=fontsize)
            ax.set_ylabel(label, fontsize=fontsize)
        for ax in axes:
            ax.tick_params(labelsize=fontsize)
            ax.set_xlim(t0, t1)
        axes[-1].set_xlabel("time (s)", fontsize=fontsize)
        if title:
            axes[0].set_title(title, fontsize=fontsize, loc="left")
        fig.tight_layout(pad=0.3)
        canvas.draw()
        drawn = np.asarray(canvas.buffer_rgba())[..., :3]
        if drawn.shape[:2] != (height, width):  # figsize in inches can round by a pixel
            drawn = np.pad(drawn[:height, :width], ((0, max(0, height - drawn.shape[0])),
                                                   (0, max(0, width - drawn.shape[1])), (0, 0)), constant_values=255)
        self.background = np.ascontiguousarray(drawn)
        h = self.background.shape[0]
        # Pixel columns of the frame times, rows spanned by each panel (display origin is bottom-left).
        x_disp = axes[0].transData.transform(np.stack([times, np.zeros_like(times)], axis=1))[:, 0]
        self.columns = np.clip(np.round(x_disp).astype(int), 0, self.background.shape[1] - 1)
        self.row_spans = []
        for ax in axes:
            box = ax.get_window_extent()
            self.row_spans.append((max(int(round(h - box.y1)), 0), min(int(round(h - box.y0)), h)))

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the frames in pixels."""
        return self.background.shape[1], self.background.shape[0]

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i`` of the segment: the background with the cursor at its time -> ``[H, W, 3]`` uint8."""
        img = self.background.copy()
        c = self.columns[i]
        for r0, r1 in self.row_spans:
            img[r0:r1, max(c - 1, 0):c + 1] = CURSOR_RGB
        return img

    def frames(self) -> Iterator[np.ndarray]:
        return (self.frame(i) for i in range(self.num_frames))


def _segment(num_frames: int, start: int, max_frames: int | None) -> tuple[int, int]:
    if not 0 <= start < num_frames:
        raise ValueError(f"start frame {start} outside a clip of {num_frames} frames")
    stop = num_frames if max_frames is None else min(num_frames, start + max_frames)
    return start, stop


def _wave_segment(wave: np.ndarray | None, sr: int, fps: float, start: int, stop: int) -> np.ndarray | None:
    if wave is None:
        return None
    a, b = int(round(start * sr / fps)), int(round(stop * sr / fps))
    seg = np.asarray(wave, np.float32).reshape(-1)[a:b]
    return np.pad(seg, (0, max(0, (b - a) - len(seg))))  # audio shorter than the motion: silence


def parameter_view(motion: np.ndarray, fps: float = 30.0, gt: np.ndarray | None = None,
                   wave: np.ndarray | None = None, sr: int = 16000, onsets: np.ndarray | None = None,
                   size: tuple[int, int] = (640, 480), start: int = 0, max_frames: int | None = None,
                   title: str | None = None) -> ParameterView:
    """A ``ParameterView`` of frames ``[start, start + max_frames)`` of a whole clip (``onsets`` in clip seconds)."""
    motion = np.asarray(motion, np.float64)
    start, stop = _segment(motion.shape[0], start, max_frames)
    seg_onsets = None
    if onsets is not None:
        o = np.asarray(onsets, np.float64) - start / fps
        seg_onsets = o[(o >= 0) & (o < (stop - start) / fps)]
    return ParameterView(motion[start:stop], fps, gt=None if gt is None else np.asarray(gt)[start:stop],
                         wave=_wave_segment(wave, sr, fps, start, stop), sr=sr, onsets=seg_onsets, size=size,
                         t0=start / fps, title=title)


def render_frames(motion: np.ndarray, fps: float = 30.0, gt: np.ndarray | None = None,
                  wave: np.ndarray | None = None, sr: int = 16000, onsets: np.ndarray | None = None,
                  size: tuple[int, int] = (480, 360), start: int = 0, max_frames: int | None = 150,
                  title: str | None = None) -> np.ndarray:
    """``motion [T, 320]`` raw (+ ``gt``, audio) -> ``[T', H, W, 3]`` uint8 of the parameter view, for logging a
    short clip (``log_video``); ``T' = min(T - start, max_frames)``. Long clips: use ``render_video``."""
    view = parameter_view(motion, fps, gt, wave, sr, onsets, size, start, max_frames, title)
    return np.stack(list(view.frames()))


# ------------------------------------------------------------------------------------------------ mesh hook
class MeshBackend(Protocol):
    """Anything that turns frames into camera-space vertices (metres, x right, y down, z forward)."""

    faces: np.ndarray  # [F, 3] int

    def vertices(self, motion: np.ndarray, constants: ClipConstants,
                 model_params: np.ndarray | None = None) -> np.ndarray:
        """``motion [T, 320]`` raw -> ``[T, V, 3]``."""
        ...


ToModelParams = Callable[[Mapping[str, torch.Tensor], ClipConstants], torch.Tensor]


class MHRBackend:
    """The MHR body (``mhr`` package + pymomentum + asset folder; none of them exist in CI, so this is a hook).

    ``MHR.from_files(folder, device, lod=1)`` and ``forward(identity [B, 45], model_params [B, 204],
    face_expr [B, 72]) -> (vertices in cm, skeleton state [B, 127, 8])``. ``model_params`` need SAM-3D-Body's head
    buffers (hand PCA, scale components) to be built from our layout: pass ``to_model_params`` (``unpack``-ed frames
    as tensors, constants -> ``[T, 204]``), or give ``model_params`` per call (e.g. ``mhr_model_params`` saved in
    the result npz). Vertices are flipped to the camera system (y, z negated, as SAM-3D-Body) and moved by cam_t.
    """

    def __init__(self, asset_folder: str | Path, device: str = "cpu", lod: int = 1,
                 to_model_params: ToModelParams | None = None) -> None:
        try:
            from mhr.mhr import MHR
        except ImportError as err:
            raise RuntimeError(f"MHR rendering needs the `mhr` package and pymomentum ({err})") from err
        folder = Path(asset_folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"MHR asset folder not found: {folder}")
        self.device = torch.device(device)
        self.model = MHR.from_files(folder, self.device, lod=lod)
        faces = getattr(self.model, "faces", None)
        if faces is None:
            raise RuntimeError("the MHR model exposes no `faces`; cannot render a mesh")
        self.faces = np.asarray(torch.as_tensor(faces).cpu(), dtype=np.int64)
        self.to_model_params = to_model_params

    @torch.inference_mode()
    def vertices(self, motion: np.ndarray, constants: ClipConstants,
                 model_params: np.ndarray | None = None) -> np.ndarray:
        frames = {k: v.to(self.device) for k, v in unpack(torch.as_tensor(motion, dtype=torch.float32)).items()}
        if model_params is not None:
            params = torch.as_tensor(model_params, dtype=torch.float32, device=self.device)
        elif self.to_model_params is not None:
            params = self.to_model_params(frames, constants)
        else:
            raise RuntimeError("MHRBackend needs `to_model_params` or per-call `model_params` [T, 204]")
        t = params.shape[0]
        identity = torch.tensor(constants.shape_params, dtype=torch.float32, device=self.device).expand(t, -1)
        verts_cm, _ = self.model(identity, params, frames["expr_params"])
        verts = (verts_cm / 100).cpu().numpy()
        verts[..., 1:] *= -1
        return verts + np.asarray(constants.cam_t, np.float32)


def splat_mesh(vertices: np.ndarray, faces: np.ndarray, focal: float, size: tuple[int, int],
               principal: tuple[float, float] | None = None, radius: int = 1) -> np.ndarray:
    """A shaded z-buffered point splat of one mesh: ``vertices [V, 3]`` camera space -> ``[H, W, 3]`` uint8.

    Pinhole ``u = f x / z + cx``, ``v = f y / z + cy`` (principal point defaults to the image centre); each visible
    vertex paints a ``(2 radius + 1)^2`` square shaded by its normal. Fast and dependency-free, not a rasteriser.
    """
    width, height = size
    cx, cy = principal if principal is not None else (width / 2, height / 2)
    img = np.full((height, width, 3), 255, np.uint8)
    z = vertices[:, 2]
    front = z > 1e-6
    u = np.round(focal * vertices[:, 0] / np.where(front, z, 1) + cx).astype(np.int64)
    v = np.round(focal * vertices[:, 1] / np.where(front, z, 1) + cy).astype(np.int64)
    shade = np.abs(vertex_normals(vertices, faces)[:, 2])  # facing the camera -> bright
    colour = (np.array([70, 110, 170])[None] + shade[:, None] * np.array([150, 120, 70])[None]).clip(0, 255)
    zbuf = np.full(height * width, np.inf)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            uu, vv = u + dx, v + dy
            ok = front & (uu >= 0) & (uu < width) & (vv >= 0) & (vv < height)
            flat = vv[ok] * width + uu[ok]
            np.minimum.at(zbuf, flat, z[ok])
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            uu, vv = u + dx, v + dy
            ok = front & (uu >= 0) & (uu < width) & (vv >= 0) & (vv < height)
            flat = vv[ok] * width + uu[ok]
            win = z[ok] <= zbuf[flat]
            img.reshape(-1, 3)[flat[win]] = colour[ok][win].astype(np.uint8)
    return img


def mesh_frames(backend: MeshBackend, motion: np.ndarray, constants: ClipConstants, height: int,
                model_params: np.ndarray | None = None, chunk: int = 64) -> Iterator[np.ndarray]:
    """Mesh images ``[height, height * W / H, 3]`` per frame, the camera scaled from the video size to ``height``."""
    scale = height / constants.height
    size = (max(2, int(round(constants.width * scale)) // 2 * 2), height)
    for a in range(0, motion.shape[0], chunk):
        params = None if model_params is None else model_params[a:a + chunk]
        verts = backend.vertices(motion[a:a + chunk], constants, params)
        for v in verts:
            yield splat_mesh(v, backend.faces, constants.focal_length * scale, size)


def render_video(motion: np.ndarray, out: str | Path, fps: float = 30.0, gt: np.ndarray | None = None,
                 wave: np.ndarray | None = None, sr: int = 16000, onsets: np.ndarray | None = None,
                 size: tuple[int, int] = (960, 540), start: int = 0, max_frames: int | None = None,
                 title: str | None = None, mesh: MeshBackend | None = None, constants: ClipConstants | None = None,
                 model_params: np.ndarray | None = None) -> Path:
    """Render frames ``[start, start + max_frames)`` of a clip to ``out`` (mp4 with audio, or GIF) -> path written.

    With a ``mesh`` backend (and the clip ``constants``) the body is drawn left of the parameter view.
    """
    motion = np.asarray(motion, np.float64)
    start, stop = _segment(motion.shape[0], start, max_frames)
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
    return write_video(frames, out, fps, _wave_segment(wave, sr, fps, start, stop), sr)


# ---------------------------------------------------------------------------------------------------------- CLI
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


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", required=True, help="result npz (motion [T, 320] raw, optional gt, fps, wave)")
    parser.add_argument("--wav", default=None, help="audio to show and mux (overrides the npz's wave)")
    parser.add_argument("--out", required=True, help="output .mp4 (a .gif is written when there is no ffmpeg)")
    parser.add_argument("--width", type=int, default=960)
    parser.add_argument("--height", type=int, default=540)
    parser.add_argument("--start", type=float, default=0.0, help="start time in seconds")
    parser.add_argument("--seconds", type=float, default=None, help="render at most this many seconds")
    parser.add_argument("--no-gt", action="store_true", help="do not show the npz's gt")
    parser.add_argument("--mhr-assets", default=None, help="MHR asset folder (needs mhr + pymomentum)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    res = load_result(args.npz, args.wav)
    mesh = None
    if args.mhr_assets:
        try:
            mesh = MHRBackend(args.mhr_assets, args.device)
            if res.constants is None or res.model_params is None:
                raise RuntimeError("the npz lacks the clip constants or mhr_model_params [T, 204]")
        except Exception as err:  # noqa: BLE001 - fall back to the parameter view
            log.warning("MHR body unavailable (%s); rendering the parameter view only", err)
            mesh = None
    start = int(round(args.start * res.fps))
    max_frames = None if args.seconds is None else max(1, int(round(args.seconds * res.fps)))
    out = render_video(res.motion, args.out, res.fps, None if args.no_gt else res.gt, res.wave, res.sr,
                       size=(args.width, args.height), start=start, max_frames=max_frames,
                       title=Path(args.npz).stem, mesh=mesh, constants=res.constants, model_params=res.model_params)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()

"""The parameter view of gesture motion: waveform with onsets, per-part speed, heatmaps of the 320-d frames and a
moving time cursor, drawn with matplotlib into RGB frames."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from gesture.layout import PARTS, POSE_DIM
from gesture.metrics import VELOCITY_PARTS, audio_onsets

CURSOR_RGB = (220, 30, 30)
PART_COLOURS = {"body": "tab:blue", "hand": "tab:green", "face": "tab:purple", "global": "tab:brown"}


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


def frame_segment(num_frames: int, start: int, max_frames: int | None) -> tuple[int, int]:
    if not 0 <= start < num_frames:
        raise ValueError(f"start frame {start} outside a clip of {num_frames} frames")
    stop = num_frames if max_frames is None else min(num_frames, start + max_frames)
    return start, stop


def wave_segment(wave: np.ndarray | None, sr: int, fps: float, start: int, stop: int) -> np.ndarray | None:
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
    start, stop = frame_segment(motion.shape[0], start, max_frames)
    seg_onsets = None
    if onsets is not None:
        o = np.asarray(onsets, np.float64) - start / fps
        seg_onsets = o[(o >= 0) & (o < (stop - start) / fps)]
    return ParameterView(motion[start:stop], fps, gt=None if gt is None else np.asarray(gt)[start:stop],
                         wave=wave_segment(wave, sr, fps, start, stop), sr=sr, onsets=seg_onsets, size=size,
                         t0=start / fps, title=title)


def render_frames(motion: np.ndarray, fps: float = 30.0, gt: np.ndarray | None = None,
                  wave: np.ndarray | None = None, sr: int = 16000, onsets: np.ndarray | None = None,
                  size: tuple[int, int] = (480, 360), start: int = 0, max_frames: int | None = 150,
                  title: str | None = None) -> np.ndarray:
    """``motion [T, 320]`` raw (+ ``gt``, audio) -> ``[T', H, W, 3]`` uint8 of the parameter view, for logging a
    short clip (``log_video``); ``T' = min(T - start, max_frames)``. Long clips: use ``render_video``."""
    view = parameter_view(motion, fps, gt, wave, sr, onsets, size, start, max_frames, title)
    return np.stack(list(view.frames()))

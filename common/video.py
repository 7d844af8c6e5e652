"""Video files for both families: H.264 mp4 through imageio-ffmpeg's binary (with an audio track when given), a GIF
when there is no ffmpeg."""

from __future__ import annotations

import logging
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import soundfile as sf

log = logging.getLogger(__name__)


def ffmpeg_exe() -> str | None:
    """The ffmpeg binary shipped with imageio-ffmpeg (or on PATH), ``None`` when there is none."""
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:  # noqa: BLE001 - any failure means "no encoder": fall back to GIF
        return None


def _write_wav(wave: np.ndarray, sr: int, folder: Path) -> Path:
    path = folder / "audio.wav"
    sf.write(path, np.asarray(wave, np.float32), sr)
    return path


def write_video(frames: Iterable[np.ndarray], out: str | Path, fps: float, wave: np.ndarray | None = None,
                sr: int = 16000) -> Path:
    """Write ``[H, W, 3]`` uint8 frames to ``out`` -> the path written.

    mp4 (H.264, yuv420p) through imageio-ffmpeg's binary with ``wave`` muxed as AAC when given; a GIF next to
    ``out`` (suffix ``.gif``, no audio) when there is no ffmpeg or ``out`` ends in ``.gif``. H and W must be even.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise ValueError(f"write_video({out}): no frames")
    height, width = first.shape[:2]
    if out.suffix.lower() == ".gif" or ffmpeg_exe() is None:
        import imageio.v3 as iio

        gif = out.with_suffix(".gif")
        if out.suffix.lower() != ".gif":
            log.warning("no ffmpeg found: writing %s without audio instead of %s", gif, out)
        iio.imwrite(gif, np.stack([first, *it]), extension=".gif", duration=1000 / fps, loop=0)
        return gif
    if height % 2 or width % 2:
        raise ValueError(f"write_video({out}): H.264 needs even frame sizes, got {width}x{height}")
    import imageio_ffmpeg

    with tempfile.TemporaryDirectory() as tmp:
        audio = None if wave is None else str(_write_wav(wave, sr, Path(tmp)))
        writer = imageio_ffmpeg.write_frames(
            str(out), (width, height), fps=fps, codec="libx264", pix_fmt_out="yuv420p", macro_block_size=1,
            audio_path=audio, audio_codec="aac" if audio else None, output_params=["-shortest"] if audio else None,
            ffmpeg_log_level="error")
        writer.send(None)
        writer.send(np.ascontiguousarray(first))
        for frame in it:
            if frame.shape[:2] != (height, width):
                raise ValueError(f"write_video({out}): frame size {frame.shape[:2]} != first {(height, width)}")
            writer.send(np.ascontiguousarray(frame))
        writer.close()
    return out


def has_audio_stream(path: str | Path) -> bool:
    """Whether ffmpeg sees an audio stream in ``path`` (False without ffmpeg)."""
    exe = ffmpeg_exe()
    if exe is None:
        return False
    probe = subprocess.run([exe, "-hide_banner", "-i", str(path)], capture_output=True, text=True, check=False)
    return "Audio:" in probe.stderr

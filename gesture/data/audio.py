"""Waveform loading and per-frame audio features aligned exactly with motion frames.

Motion frame ``i`` owns samples ``frame_bounds[i] .. frame_bounds[i + 1]`` with ``frame_bounds[i] = round(i * sr
/ fps)`` (half up), so 30 fps at 16 kHz alternates 533 / 534 samples and never drifts. Not for model code.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf

log = logging.getLogger(__name__)

ONSET_AMP_NAMES: tuple[str, ...] = ("amplitude", "onset", "onset_strength")
ONSET_HOP = 160  # 10 ms at 16 kHz: onset resolution well below one 30 fps frame


class AudioError(ValueError):
    """A wav file cannot be used; the message says why."""


def frame_bounds(num_frames: int, sr: int, fps: float) -> np.ndarray:
    """Sample index where each motion frame starts, plus the end: ``[num_frames + 1]`` int64."""
    i = np.arange(num_frames + 1, dtype=np.float64)
    return np.floor(i * sr / fps + 0.5).astype(np.int64)


def _check_riff(path: Path) -> None:
    """Raise if a RIFF/WAVE file's ``data`` chunk declares more bytes than the file holds (a cut-off copy).

    libsndfile silently reads what is there, so a truncated file would otherwise look like short audio.
    """
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return  # not RIFF: leave it to libsndfile
        size = path.stat().st_size
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk_id, chunk_len = struct.unpack("<4sI", f.read(8))
            if chunk_id == b"data":
                if chunk_len != 0xFFFFFFFF and pos + 8 + chunk_len > size:
                    raise AudioError(
                        f"truncated: header declares {chunk_len} data bytes, file holds {size - pos - 8}"
                    )
                return
            pos += 8 + chunk_len + (chunk_len & 1)
        raise AudioError("no 'data' chunk")


def load_wave(path: Path | str, sr: int) -> np.ndarray:
    """Mono float32 waveform ``[S]`` at ``sr`` Hz (resampled with librosa if the file differs)."""
    path = Path(path)
    _check_riff(path)
    try:
        wave, file_sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile raises several types for unreadable files
        raise AudioError(f"unreadable: {e}") from e
    if wave.shape[0] == 0:
        raise AudioError("no samples")
    mono = wave.mean(axis=1)
    if not np.isfinite(mono).all():
        raise AudioError("non-finite samples")
    if file_sr != sr:
        log.info("%s: resampling %d Hz -> %d Hz", path.name, file_sr, sr)
        mono = librosa.resample(mono, orig_sr=file_sr, target_sr=sr)
    return np.ascontiguousarray(mono, dtype=np.float32)


MAX_AUDIO_EXCESS = 0.05  # audio longer than its motion by more than this fraction: not the same recording rate


def fit_to_frames(wave: np.ndarray, num_frames: int, sr: int, fps: float,
                  max_excess: float | None = MAX_AUDIO_EXCESS) -> np.ndarray:
    """Trim or zero-pad ``wave [S]`` to exactly ``frame_bounds(num_frames)[-1]`` samples -> ``[S']``.

    Raises ``AudioError`` when the audio is shorter than the motion by more than one frame, or longer by more
    than ``max_excess`` of the motion's duration (and one frame): motion captured at another frame rate than
    ``fps`` (25 fps read as 30 makes the audio 1.2x the motion) would otherwise be cut silently. ``None``
    allows any excess.
    """
    need = int(frame_bounds(num_frames, sr, fps)[-1])
    if len(wave) >= need:
        excess = len(wave) - need
        if max_excess is not None and excess > max(max_excess * need, sr / fps):
            ratio = len(wave) / need
            raise AudioError(
                f"audio is {len(wave) / sr:.3f}s, {ratio:.3f}x the motion ({num_frames} frames at {fps:g} fps = "
                f"{need / sr:.3f}s): the motion was probably captured at {fps / ratio:.4g} fps (store its rate "
                "in the npz's fps key) or the audio belongs to a longer recording"
            )
        return wave[:need].copy()
    if need - len(wave) > sr / fps:
        raise AudioError(
            f"audio is {len(wave) / sr:.3f}s, shorter than the motion ({num_frames} frames = {need / sr:.3f}s) "
            "by more than one frame"
        )
    return np.concatenate([wave, np.zeros(need - len(wave), dtype=wave.dtype)])


def _span_max(values: np.ndarray, positions: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Per frame, max of ``values`` whose ``positions`` (samples) fall in ``[bounds[i], bounds[i+1])``; 0 if none."""
    out = np.zeros(len(bounds) - 1, dtype=np.float64)
    frame = np.searchsorted(bounds, positions, side="right") - 1
    keep = (frame >= 0) & (frame < len(out))
    np.maximum.at(out, frame[keep], values[keep])
    return out


def onset_amp_features(wave: np.ndarray, bounds: np.ndarray, sr: int) -> np.ndarray:
    """EMAGE-style features per frame: ``wave [S], bounds [N+1] -> [N, 3]`` (amplitude, onset, onset_strength).

    amplitude: max |x| over the frame's samples (EMAGE's envelope, sampled per frame); onset: 1.0 where a
    librosa onset falls in the frame (EMAGE put onset *frame* indices into a *sample* array; this uses samples);
    onset_strength: the largest librosa onset-strength value inside the frame.
    """
    n = len(bounds) - 1
    amp = np.maximum.reduceat(np.abs(wave), bounds[:-1]) if n else np.zeros(0)
    # reduceat on an empty span returns the element at the index; no span is empty when sr > fps.
    env = librosa.onset.onset_strength(y=wave, sr=sr, hop_length=ONSET_HOP)
    env_pos = np.arange(len(env)) * ONSET_HOP
    onsets = librosa.onset.onset_detect(onset_envelope=env, sr=sr, hop_length=ONSET_HOP, units="samples")
    onset = _span_max(np.ones(len(onsets)), np.asarray(onsets), bounds)
    strength = _span_max(env.astype(np.float64), env_pos, bounds)
    return np.stack([amp, onset, strength], axis=1).astype(np.float32)


def log_mel_features(wave: np.ndarray, bounds: np.ndarray, sr: int, n_mels: int = 64, n_fft: int = 1024) -> np.ndarray:
    """Log-mel per frame from one Hann window centred on each frame's samples: ``[S], [N+1] -> [N, n_mels]``."""
    centres = (bounds[:-1] + bounds[1:]) // 2
    padded = np.pad(wave, (n_fft // 2, n_fft // 2))
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[centres]  # [N, n_fft]
    window = librosa.filters.get_window("hann", n_fft, fftbins=True)
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    mel_fb = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels)
    return librosa.power_to_db(power @ mel_fb.T, ref=1.0, top_db=None).astype(np.float32)


def audio_feature_names(kind: str, n_mels: int = 64) -> tuple[str, ...]:
    """Channel names of ``audio_features(kind)``: onset_amp -> 3; mel -> n_mels log-mel + the 3 onset_amp."""
    if kind == "onset_amp":
        return ONSET_AMP_NAMES
    if kind == "mel":
        return tuple(f"mel{i}" for i in range(n_mels)) + ONSET_AMP_NAMES
    raise ValueError(f"audio_features must be 'onset_amp' or 'mel', got {kind!r}")


def audio_features(wave: np.ndarray, num_frames: int, sr: int, fps: float, kind: str = "onset_amp",
                   n_mels: int = 64) -> np.ndarray:
    """Per-frame features ``wave [S] -> [num_frames, C]``; ``wave`` must already be ``fit_to_frames``'d."""
    bounds = frame_bounds(num_frames, sr, fps)
    if len(wave) != bounds[-1]:
        raise ValueError(f"wave has {len(wave)} samples, {num_frames} frames need exactly {bounds[-1]}")
    feats = onset_amp_features(wave, bounds, sr)
    if kind == "mel":
        feats = np.concatenate([log_mel_features(wave, bounds, sr, n_mels=n_mels), feats], axis=1)
    elif kind != "onset_amp":
        raise ValueError(f"audio_features must be 'onset_amp' or 'mel', got {kind!r}")
    return feats

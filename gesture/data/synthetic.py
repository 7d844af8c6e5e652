"""A small deterministic corpus in the BEAT2-like MHR format, so the gesture pipeline runs without real data.

Speech-like 16 kHz audio (voiced syllables with harmonics and formants, consonant noise bursts, pauses), word
TextGrids, and MHR-layout motion driven by that audio: body and hand gestures whose speed peaks follow syllable and
stress onsets (each stroke reaches its apex, a pose extreme and speed minimum, on an onset: the motion beats of beat
consistency), jaw and expression following the loudness (plus a slow low-rank expression drift), slow global sway, foot
steps.
``python -m gesture.data.synthetic --out DIR --seed S``. Not a model of real gesture, only of its timing.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from praatio import textgrid
from praatio.data_classes.interval_tier import IntervalTier
from praatio.utilities.constants import Interval
from scipy.ndimage import gaussian_filter1d
from scipy.signal import butter, sosfilt

from common.data.staging import staged_folder
from gesture.data.audio import frame_bounds
from gesture.data.corpus import CorpusConfig, foot_contact
from gesture.layout import BODY_DIM, CONTACT_JOINTS, EXPR_DIM, HAND_DIM, HAND_PCA_DIM, JAW_DIM

log = logging.getLogger(__name__)

# (word, syllables)
VOCAB: tuple[tuple[str, int], ...] = (
    ("yes", 1), ("no", 1), ("the", 1), ("and", 1), ("so", 1), ("right", 1), ("think", 1), ("know", 1),
    ("hello", 2), ("really", 2), ("people", 2), ("maybe", 2), ("today", 2), ("motion", 2), ("hands", 1),
    ("gesture", 2), ("because", 2), ("speaking", 2), ("actually", 4), ("important", 3), ("wonderful", 3),
    ("understand", 3), ("together", 3), ("beautiful", 3), ("everything", 3), ("music", 2), ("about", 2),
    ("story", 2), ("question", 2), ("never", 2),
)
BEAT_SPEAKERS: tuple[tuple[int, str], ...] = (
    (2, "scott"), (4, "lawrence"), (6, "carla"), (8, "miranda"), (11, "nidal"), (15, "carlos"), (21, "ayana"),
    (25, "goto"), (27, "reamey"), (30, "katya"),
)
VOWEL_FORMANTS = ((730, 1090, 2440), (270, 2290, 3010), (530, 1840, 2480), (570, 840, 2410), (300, 870, 2240),
                  (660, 1720, 2410))
LATENT = 6  # stroke latent dims per stream (body, hands); the idle drift adds 2
EXPR_DRIFT_RANK = 3  # directions of the slow expression drift


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 0
    num_speakers: int = 4
    clips_per_speaker: int = 6
    seconds: float = 12.0
    unknown_clips: int = 2
    fps: float = 30.0
    sr: int = 16000
    zero_face: bool = False  # jaw and expression all zero, as SAM-3D-Body estimates are

    def __post_init__(self) -> None:
        if not 1 <= self.num_speakers <= len(BEAT_SPEAKERS):
            raise ValueError(f"num_speakers must be in 1..{len(BEAT_SPEAKERS)}, got {self.num_speakers}")
        if self.clips_per_speaker < 1 or self.seconds < 2.0 or self.unknown_clips < 0:
            raise ValueError("need clips_per_speaker >= 1, seconds >= 2, unknown_clips >= 0")


@dataclass(frozen=True)
class Speaker:
    raw_id: int  # -1 for the unknown-speaker clips
    f0: float
    rate: float  # syllable duration multiplier (lower = faster)
    amp: float  # gesture amplitude
    stress_prob: float
    rest_body: np.ndarray
    rest_hand: np.ndarray
    hand_bias: np.ndarray  # [2] left / right activity
    stroke_gap: float  # seconds; shortest time between two stroke apexes (gesture rhythm)
    drift: float  # idle drift speed / mean stroke speed
    drift_period: float  # seconds per idle-drift circle
    shape: np.ndarray
    scale: np.ndarray
    size: tuple[int, int]


def _speaker(seed: int, index: int, raw_id: int) -> Speaker:
    rng = np.random.default_rng([seed, 1000 + index])
    return Speaker(
        raw_id=raw_id, f0=float(rng.uniform(95, 230)), rate=float(rng.uniform(0.8, 1.25)),
        amp=float(rng.uniform(0.6, 1.4)), stress_prob=float(rng.uniform(0.3, 0.6)),
        rest_body=rng.normal(0, 0.15, BODY_DIM), rest_hand=rng.normal(0, 0.3, HAND_DIM),
        hand_bias=rng.uniform(0.5, 1.5, 2), shape=rng.normal(0, 0.5, 45), scale=rng.normal(0, 0.1, 28),
        size=((1920, 1080), (1280, 720))[index % 2], stroke_gap=float(rng.uniform(0.27, 0.31)),
        drift=float(rng.uniform(0.45, 0.6)), drift_period=float(rng.uniform(2.5, 4.0)),
    )


# ----------------------------------------------------------------------------------------------- audio
def _syllable(rng: np.random.Generator, dur: float, f0: float, stress: bool, sr: int) -> np.ndarray:
    """One voiced syllable: harmonics of a falling f0 shaped by a vowel's formants, with a smooth envelope."""
    n = int(dur * sr)
    t = np.arange(n) / sr
    f0_curve = f0 * (1.15 if stress else 1.0) * (1.0 - 0.12 * t / dur) * (1 + 0.01 * rng.standard_normal())
    phase = 2 * np.pi * np.cumsum(f0_curve) / sr
    formants = VOWEL_FORMANTS[rng.integers(len(VOWEL_FORMANTS))]
    wave = np.zeros(n)
    for k in range(1, int(4000 // f0_curve.max()) + 1):
        f = k * f0_curve.mean()
        gain = sum(1.0 / (1.0 + ((f - fm) / (60.0 + 0.06 * fm)) ** 2) for fm in formants) / k**0.5
        wave += gain * np.sin(k * phase)
    attack, release = int(0.015 * sr), int(0.05 * sr)
    env = np.ones(n)
    env[:attack] = np.sin(np.linspace(0, np.pi / 2, attack)) ** 2
    env[-release:] = np.cos(np.linspace(0, np.pi / 2, release)) ** 2
    wave = wave * env / (np.abs(wave).max() + 1e-9)
    return wave * (1.0 if stress else 0.55)


def _burst(rng: np.random.Generator, sr: int) -> np.ndarray:
    n = int(rng.uniform(0.02, 0.05) * sr)
    lo = rng.uniform(1500, 3000)
    sos = butter(4, [lo, min(lo * 2.5, 0.45 * sr)], btype="band", fs=sr, output="sos")
    return sosfilt(sos, rng.standard_normal(n)) * np.hanning(n) * rng.uniform(0.15, 0.3)


def _speech(rng: np.random.Generator, spk: Speaker, seconds: float, sr: int):
    """Returns (wave [S], syllables [(onset_s, dur_s, stressed)], words [(start_s, end_s, word)])."""
    wave = np.zeros(int(seconds * sr) + sr)
    syllables, words = [], []
    t = rng.uniform(0.2, 0.4)
    while t < seconds - 1.0:
        for _ in range(int(rng.integers(2, 7))):
            word, n_syl = VOCAB[rng.integers(len(VOCAB))]
            start = t
            for s in range(n_syl):
                if rng.random() < 0.5:
                    b = _burst(rng, sr)
                    i = int(t * sr)
                    wave[i:i + len(b)] += b
                    t += len(b) / sr
                dur = rng.uniform(0.11, 0.22) * spk.rate
                stressed = bool((s == 0 and rng.random() < spk.stress_prob + 0.2) or rng.random() < 0.15)
                syl = _syllable(rng, dur, spk.f0, stressed, sr)
                i = int(t * sr)
                wave[i:i + len(syl)] += syl
                syllables.append((t, dur, stressed))
                t += dur + rng.uniform(0.01, 0.03)
            words.append((start, t, word))
            t += rng.uniform(0.03, 0.12) * spk.rate
            if t > seconds - 1.0:
                break
        t += rng.uniform(0.3, 0.8)
    wave = wave[: int(seconds * sr)] + 0.002 * rng.standard_normal(int(seconds * sr))
    return (0.8 * wave / np.abs(wave).max()).astype(np.float32), syllables, words


# ---------------------------------------------------------------------------------------------- motion
def _stroke_times(syllables: list, fps: float, min_gap: float) -> tuple[np.ndarray, np.ndarray]:
    """Frames (float) of the stroke apexes and their weights: stressed syllable onsets first, then unstressed ones,
    never two apexes closer than ``min_gap`` seconds (BC's motion beats are speed minima over +-7 frames)."""
    onsets = np.array([s[0] for s in syllables]) * fps
    stressed = np.array([s[2] for s in syllables], dtype=bool)
    chosen: list[int] = []
    for candidates in (np.flatnonzero(stressed), np.flatnonzero(~stressed)):
        for i in candidates:
            if all(abs(onsets[i] - onsets[j]) >= min_gap * fps for j in chosen):
                chosen.append(int(i))
    chosen.sort()
    return onsets[chosen], np.where(stressed[chosen], 1.0, 0.35)


def _min_jerk_path(knots: np.ndarray, keys: np.ndarray, n: int) -> np.ndarray:
    """``knots [K]`` (frames, increasing), ``keys [K, L]`` -> ``[n, L]``: minimum-jerk moves from key to key, at rest
    (zero velocity and acceleration) on every knot, holding the first / last key outside them."""
    frames = np.arange(n, dtype=np.float64)
    seg = np.clip(np.searchsorted(knots, frames, side="right") - 1, 0, len(knots) - 2)
    tau = np.clip((frames - knots[seg]) / (knots[seg + 1] - knots[seg]), 0.0, 1.0)
    s = 10 * tau**3 - 15 * tau**4 + 6 * tau**5
    return keys[seg] + s[:, None] * (keys[seg + 1] - keys[seg])


def _strokes(rng: np.random.Generator, apexes: np.ndarray, weights: np.ndarray, n: int, amp: float,
             fps: float) -> np.ndarray:
    """Stroke latent ``[n, LATENT]``: one key pose (a pose extreme) per apex frame, with minimum-jerk moves from
    key to key, so the stroke speed is zero exactly at the apexes (onsets) and peaks between them. Each key is the
    previous one pulled halfway back to rest plus a random direction scaled by the stroke weight; the limbs
    retract to rest in gaps longer than about a second and after the last stroke."""
    if len(apexes) == 0:
        return np.zeros((n, LATENT))
    prep = 0.4 * fps  # preparation from rest / retraction to rest
    knots, keys = [apexes[0] - prep], [np.zeros(LATENT)]
    pos = np.zeros(LATENT)
    for k, (f, w) in enumerate(zip(apexes, weights)):
        if k and f - knots[-1] > 2 * prep + 0.3 * fps:
            knots += [knots[-1] + prep, f - prep]
            keys += [np.zeros(LATENT), np.zeros(LATENT)]
            pos = np.zeros(LATENT)
        direction = rng.standard_normal(LATENT)
        pos = 0.5 * pos + w * amp * direction / np.linalg.norm(direction)
        knots.append(f)
        keys.append(pos)
    knots.append(knots[-1] + prep)
    keys.append(np.zeros(LATENT))
    return _min_jerk_path(np.array(knots), np.stack(keys), n)


def _drift(rng: np.random.Generator, n: int, speed: float, period: float, fps: float) -> np.ndarray:
    """Idle drift ``[n, 2]``: a slow circle at constant ``speed`` (latent units per frame). Laid on directions
    orthogonal to the strokes it keeps the limbs moving, so an apex is a speed minimum above BC's stillness
    threshold (0.3 of the mean speed) rather than a full stop."""
    omega = 2 * np.pi / (period * fps)
    phase = omega * np.arange(n) + rng.uniform(0, 2 * np.pi)
    return speed / omega * np.stack([np.cos(phase), np.sin(phase)], 1)


def _gesture_latent(rng: np.random.Generator, spk: Speaker, apexes: np.ndarray, weights: np.ndarray, n: int,
                    fps: float) -> np.ndarray:
    """``[n, LATENT + 2]``: the speaker's strokes, then their idle drift at ``spk.drift`` times the strokes' mean
    speed, so the speed at an apex is about 0.4 of the mean speed: above BC's 0.3 threshold, clearly a minimum."""
    strokes = _strokes(rng, apexes, weights, n, spk.amp, fps)
    stroke_speed = np.linalg.norm(np.diff(strokes, axis=0), axis=1).mean() if n > 1 else 0.0
    drift = _drift(rng, n, spk.drift * max(stroke_speed, 1e-3 * spk.amp), spk.drift_period, fps)
    return np.concatenate([strokes, drift], 1)


def _orthonormal_rows(rng: np.random.Generator, rows: int, weights: np.ndarray) -> np.ndarray:
    """``[rows, D]`` orthonormal rows, biased toward the dims with large ``weights [D]`` (the joints that move)."""
    q, _ = np.linalg.qr((rng.normal(0, 1, (rows, len(weights))) * weights).T)
    return q.T


def _feet(rng: np.random.Generator, n: int, fps: float) -> np.ndarray:
    """Ankle / toe positions ``[n, 4, 3]`` (CONTACT_JOINTS order) with an occasional weight-shift step."""
    base = np.array([[-0.12, 0.08, 0.0], [0.12, 0.08, 0.0], [-0.14, 0.0, 0.17], [0.14, 0.0, 0.17]])
    feet = np.repeat(base[None], n, axis=0)
    t = rng.uniform(1.0, 3.0)
    while t < n / fps - 1.0:
        side = int(rng.integers(2))
        f0, dur = int(t * fps), int(rng.uniform(0.4, 0.7) * fps)
        f1 = min(f0 + dur, n)
        phase = np.linspace(0, 1, f1 - f0)
        lift = 0.06 * np.sin(np.pi * phase)
        step = 0.1 * (rng.random() - 0.5) * (10 * phase**3 - 15 * phase**4 + 6 * phase**5)
        for j in (side, side + 2):
            feet[f0:f1, j, 1] += lift
            feet[f0:f1, j, 2] += step
            feet[f1:, j, 2] += step[-1]
        t += rng.uniform(2.5, 5.0)
    return feet


def _keypoints(rng: np.random.Generator, feet: np.ndarray, body_latent: np.ndarray) -> np.ndarray:
    """MHR70-shaped keypoints ``[n, 70, 3]`` (metres): a standing template, arms moving with the body latent."""
    n = len(feet)
    template = np.stack([rng.uniform(-0.3, 0.3, 70), rng.uniform(0.9, 1.7, 70), rng.uniform(-0.1, 0.1, 70)], 1)
    mix = rng.normal(0, 0.05, (body_latent.shape[1], 70 * 3))
    kp = template[None] + (body_latent @ mix).reshape(n, 70, 3)
    kp[:, list(CONTACT_JOINTS.values())] = feet
    return kp.astype(np.float32)


def _clip(cfg: SyntheticConfig, index: int, spk: Speaker, seconds: float, mixing: dict[str, np.ndarray],
          style: str) -> tuple[dict[str, np.ndarray], np.ndarray, list]:
    rng = np.random.default_rng([cfg.seed, index])
    wave, syllables, words = _speech(rng, spk, seconds, cfg.sr)
    n = int(round(seconds * cfg.fps))
    apexes, weights = _stroke_times(syllables, cfg.fps, spk.stroke_gap)
    body_lat = _gesture_latent(rng, spk, apexes, weights, n, cfg.fps)
    hand_lat = _gesture_latent(rng, spk, apexes, weights * 1.2, n, cfg.fps)
    t = np.arange(n) / cfg.fps
    breath = 0.02 * np.sin(2 * np.pi * 0.25 * t + rng.uniform(0, 2 * np.pi))
    tremor = gaussian_filter1d(rng.normal(0, 0.002, (n, BODY_DIM)), 2.0, axis=0)  # too faint to move a minimum
    body = spk.rest_body + body_lat @ mixing["body"] + breath[:, None] * mixing["breath"] + tremor
    hand = spk.rest_hand + np.concatenate([hand_lat @ mixing["hand_left"] * spk.hand_bias[0],
                                           hand_lat @ mixing["hand_right"] * spk.hand_bias[1]], 1)

    bounds = frame_bounds(n, cfg.sr, cfg.fps)
    audio = np.pad(wave, (0, max(0, bounds[-1] - len(wave))))
    rms = np.sqrt(np.add.reduceat(audio[: bounds[-1]].astype(np.float64) ** 2, bounds[:-1]) / np.diff(bounds))
    loud = gaussian_filter1d(rms / (rms.max() + 1e-9), 1.0)
    jaw = np.stack([0.35 * loud, 0.02 * loud, np.zeros(n)], 1)
    # Slow expression drift on EXPR_DRIFT_RANK shared directions (real expression parameters are correlated):
    # independent drifts on all 72 dims were noise no model can learn and a VQ-VAE could not reconstruct (its own
    # reconstruction of ground truth moved 1.5x as fast). The draw keeps its size so later draws are unchanged.
    drift = gaussian_filter1d(rng.normal(0, 0.3, (n, EXPR_DIM))[:, :EXPR_DRIFT_RANK], 15.0, axis=0)
    expr = loud[:, None] * mixing["expr"] + drift @ mixing["expr_drift"]
    if cfg.zero_face:
        jaw, expr = np.zeros((n, JAW_DIM)), np.zeros((n, EXPR_DIM))
    sway = np.stack([0.03 * np.sin(2 * np.pi * t / 5.0 + rng.uniform(0, 6)),
                     0.02 * np.sin(2 * np.pi * t / 7.0 + rng.uniform(0, 6)), 0.01 * np.sin(2 * np.pi * t / 3.0)], 1)
    global_rot = np.array([np.pi, 0.0, 0.0]) + rng.normal(0, 0.05, 3) + sway + 0.02 * body_lat[:, :3]

    data: dict[str, np.ndarray] = {
        "body_pose_params": np.concatenate([body, jaw], 1).astype(np.float32),
        "hand_pose_params": hand.astype(np.float32),
        "expr_params": expr.astype(np.float32),
        "global_rot": global_rot.astype(np.float32),
        "pred_cam_t": (np.array([rng.normal(0, 0.05), rng.uniform(0.1, 0.3), rng.uniform(3.5, 4.5)])
                       + rng.normal(0, 1e-4, (n, 3))).astype(np.float32),
        "focal_length": np.full(n, rng.uniform(1000, 1500), dtype=np.float32),
        "width": np.array(spk.size[0]), "height": np.array(spk.size[1]),
    }
    per_frame = index % 2 == 0  # exercise both per-clip and per-frame identity arrays
    data["shape_params"] = np.tile(spk.shape, (n, 1)).astype(np.float32) if per_frame else spk.shape.astype(np.float32)
    data["scale_params"] = np.tile(spk.scale, (n, 1)).astype(np.float32) if per_frame else spk.scale.astype(np.float32)
    feet = _feet(rng, n, cfg.fps)
    if style == "keypoints":
        data["pred_keypoints_3d"] = _keypoints(rng, feet, body_lat)
    else:
        data["contact"] = foot_contact(np.pad(feet, ((0, 0), (0, 66), (0, 0))), (0, 1, 2, 3),
                                       CorpusConfig().contact_threshold)
    if spk.raw_id < 0 or index % 3 == 0:
        data["vid"] = np.array(spk.raw_id)
    tail = int(rng.integers(0, 800))  # real recordings run a little past the motion
    audio_out = np.concatenate([audio[: bounds[-1]], 0.002 * rng.standard_normal(tail)]).astype(np.float32)
    return data, audio_out, words


def _split_of(k: int, c: int, speaker_index: int) -> str:
    if c >= 3:
        return "test" if k == c - 1 else "val" if k == c - 2 else "train"
    if c == 2 and k == 1:
        return "val" if speaker_index % 2 == 0 else "test"
    return "train"


def _write_textgrid(path: Path, words: list, seconds: float) -> None:
    entries = [Interval(round(s, 4), round(min(e, seconds), 4), w) for s, e, w in words if s < seconds]
    tg = textgrid.Textgrid()
    tg.addTier(IntervalTier("words", entries, 0.0, seconds))
    tg.save(str(path), format="long_textgrid", includeBlankSpaces=True, reportingMode="silence")


def generate(out: Path | str, cfg: SyntheticConfig = SyntheticConfig()) -> Path:
    """Write the corpus to ``out`` (created atomically: built beside it, then renamed). Returns ``out``."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another --out")
    t0 = time.perf_counter()
    corpus = CorpusConfig()
    mix_rng = np.random.default_rng([cfg.seed, 99999])
    body_scale = mix_rng.uniform(0.02, 0.25, BODY_DIM)  # some joints move much more than others
    # Orthonormal latent directions per speed group (body, each hand): a group's speed is the latent speed times
    # a constant, so the stroke apexes stay its speed minima. Norms as random rows of the same scale would have.
    mixing = {"body": _orthonormal_rows(mix_rng, LATENT + 2, body_scale) * np.sqrt((body_scale**2).sum()),
              "breath": mix_rng.normal(0, 1, BODY_DIM) * body_scale,
              "hand_left": _orthonormal_rows(mix_rng, LATENT + 2, np.ones(HAND_PCA_DIM)) * 0.5 * HAND_PCA_DIM**0.5,
              "hand_right": _orthonormal_rows(mix_rng, LATENT + 2, np.ones(HAND_PCA_DIM)) * 0.5 * HAND_PCA_DIM**0.5,
              "expr": mix_rng.normal(0, 0.5, EXPR_DIM) * (np.arange(EXPR_DIM) < 12),
              "expr_drift": mix_rng.normal(0, 1, (EXPR_DRIFT_RANK, EXPR_DIM)) / EXPR_DRIFT_RANK**0.5}
    clips: list[tuple[str, str, Speaker]] = []
    for s in range(cfg.num_speakers):
        raw_id, name = BEAT_SPEAKERS[s]
        spk = _speaker(cfg.seed, s, raw_id)
        for k in range(cfg.clips_per_speaker):
            clips.append((f"{raw_id}_{name}_0_{k + 1}_{k + 1}", _split_of(k, cfg.clips_per_speaker, s), spk))
    for u in range(cfg.unknown_clips):
        clips.append((f"podcast_{u + 1:04d}", "train", _speaker(cfg.seed, 100 + u, -1)))
    # a corpus another process finished meanwhile is kept (replace=False): theirs is the same
    with staged_folder(out, replace=False) as tmp:
        for sub in (corpus.motion_dir, corpus.wave_dir, corpus.textgrid_dir):
            (tmp / sub).mkdir(parents=True)
        rows = ["id,type"]
        for index, (name, split, spk) in enumerate(clips):
            seconds = cfg.seconds * float(np.random.default_rng([cfg.seed, index, 7]).uniform(0.92, 1.08))
            style = "keypoints" if index % 2 == 0 else "contact"
            data, audio, words = _clip(cfg, index, spk, seconds, mixing, style)
            np.savez(tmp / corpus.motion_dir / f"{name}.npz", **data)
            sf.write(str(tmp / corpus.wave_dir / f"{name}.wav"), audio, cfg.sr, subtype="PCM_16")
            _write_textgrid(tmp / corpus.textgrid_dir / f"{name}.TextGrid", words, len(audio) / cfg.sr)
            rows.append(f"{name},{split}")
        (tmp / corpus.split_file).write_text("\n".join(rows) + "\n")
    log.info("synthetic gesture corpus: %d clips in %s (%.1fs)", len(clips), out, time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-speakers", type=int, default=SyntheticConfig.num_speakers)
    p.add_argument("--clips-per-speaker", type=int, default=SyntheticConfig.clips_per_speaker)
    p.add_argument("--seconds", type=float, default=SyntheticConfig.seconds)
    p.add_argument("--unknown-clips", type=int, default=SyntheticConfig.unknown_clips)
    p.add_argument("--zero-face", action="store_true", help="zero jaw and expression, as SAM-3D-Body does")
    p.add_argument("--overwrite", action="store_true", help="regenerate an existing corpus (default: keep it)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if a.out.exists():
        if not a.overwrite:
            log.info("%s exists: kept (--overwrite regenerates it)", a.out)
            return
        shutil.rmtree(a.out)
    generate(a.out, SyntheticConfig(seed=a.seed, num_speakers=a.num_speakers, clips_per_speaker=a.clips_per_speaker,
                                    seconds=a.seconds, unknown_clips=a.unknown_clips, zero_face=a.zero_face))


if __name__ == "__main__":
    main()

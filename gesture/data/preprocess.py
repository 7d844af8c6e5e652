"""Builds and opens the gesture preprocessing cache: layout vectors, per-frame audio features and word ids, stats.

The cache folder is keyed (``common.data.cache.ArtifactCache``) by the preprocessing config and every source
file's content, so editing either rebuilds it; ``force=True`` rebuilds anyway. Arrays are raw
little-endian files opened with ``np.memmap`` (shapes in ``meta.json``); nothing is pickled.

Cache folder::

    meta.json                       config, shapes, speakers, vocabulary size, skips, zero-variance parts
    stats.npz                       mean/std [320] (std floored), raw_std [320], audio_mean/audio_std [C]
    vocab.json, speakers.json       Vocabulary / SpeakerMap
    word_vectors.npy                [vocab, D] (only with a word-vector file)
    <split>/motion.f32              [F, 320] layout vectors of all records of the split, concatenated
    <split>/audio.f32               [F, C] per-frame audio features (raw, not normalised)
    <split>/words.i32               [F] word ids (PAD 0, UNK 1)
    <split>/wave.f32                [S] 16 kHz waveform (splits in ``wave_splits`` only)
    <split>/records.json            one entry per record: clip, first frame in the clip, offset, length,
                                    speaker index, raw speaker, constants, wave offset / length
    <split>/windows.npy             [W, 3] int64 (record, start, stop) for train / val
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from common.data.cache import ArtifactCache
from common.data.windows import WindowIndex
from gesture.data.audio import audio_feature_names, audio_features, frame_bounds
from gesture.data.corpus import CorpusConfig, CorpusError, RawClip, finite_segments, load_clip, read_split
from gesture.data.speakers import SpeakerMap
from gesture.data.textgrid import Vocabulary, WordInterval, frame_words, load_word_vectors
from gesture.layout import PARTS, POSE_DIM, SUB_SLICES, ClipConstants

log = logging.getLogger(__name__)

CACHE_VERSION = 1
SPLITS = ("train", "val", "test")
WINDOWED_SPLITS = ("train", "val")


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that changes the cache's content (all of it goes into the cache key)."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    pose_length: int = 64
    stride: int = 20
    audio_features: str = "onset_amp"  # "onset_amp" | "mel"
    n_mels: int = 64
    strict: bool = False
    use_additional: bool = False  # train on "additional" clips too
    wave_splits: tuple[str, ...] = ("test",)
    min_test_frames: int | None = None  # default: pose_length
    min_word_count: int = 1
    word_vectors: str | None = None  # text file "word v1 .. vD" (fastText .vec)
    std_floor: float = 1e-4
    zero_var_eps: float = 1e-6

    def __post_init__(self) -> None:
        audio_feature_names(self.audio_features, self.n_mels)  # validates the name
        if self.pose_length < 1 or self.stride < 1:
            raise ValueError(f"pose_length and stride must be >= 1, got {self.pose_length}, {self.stride}")
        bad = set(self.wave_splits) - set(SPLITS)
        if bad:
            raise ValueError(f"wave_splits must be among {SPLITS}, got {sorted(bad)}")

    def min_frames(self, split: str) -> int:
        if split == "test":
            return self.min_test_frames if self.min_test_frames is not None else self.pose_length
        return self.pose_length

    def key_dict(self) -> dict[str, Any]:
        return {"version": CACHE_VERSION, **asdict(self)}


class SkipReport:
    """Counted, logged skips of clips (and dropped non-finite frames) in non-strict mode."""

    def __init__(self) -> None:
        self.clips: list[dict[str, str]] = []
        self.dropped_frames: dict[str, int] = {}
        self.short_segments: list[str] = []

    def skip(self, err: CorpusError, split: str) -> None:
        log.warning("skipping %s clip: %s", split, err)
        self.clips.append({"clip": err.clip, "field": err.field, "reason": err.reason, "split": split})

    def summary(self) -> dict[str, Any]:
        by_field = Counter(c["field"] for c in self.clips)
        return {"skipped_clips": len(self.clips), "by_field": dict(by_field), "clips": self.clips,
                "dropped_nonfinite_frames": self.dropped_frames, "short_segments": self.short_segments}

    def log_summary(self) -> None:
        s = self.summary()
        if s["skipped_clips"] or s["dropped_nonfinite_frames"] or s["short_segments"]:
            log.warning(
                "preprocessing skipped %d clip(s) (by field: %s); dropped non-finite frames in %d clip(s) (%d "
                "frames); %d segment(s) too short", s["skipped_clips"], s["by_field"], len(self.dropped_frames),
                sum(self.dropped_frames.values()), len(self.short_segments))
        else:
            log.info("preprocessing: no clip skipped")


class _Moments:
    """Streaming per-dimension mean / variance (Chan et al. pairwise merge, float64)."""

    def __init__(self, dim: int) -> None:
        self.n, self.mean, self.m2 = 0, np.zeros(dim), np.zeros(dim)

    def add(self, x: np.ndarray) -> None:
        x = x.astype(np.float64)
        nb, mb = len(x), x.mean(axis=0)
        m2b = ((x - mb) ** 2).sum(axis=0)
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * nb / n
        self.m2 = self.m2 + m2b + delta**2 * self.n * nb / n
        self.n = n

    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.n, 1))


def clip_list(root: Path, cfg: PreprocessConfig) -> dict[str, list[str]]:
    """Clip ids per split (train / val / test) from the split file; "additional" joins train if enabled."""
    split = read_split(root, cfg.corpus)
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for clip, kind in split.items():
        if kind != "additional":
            out[kind].append(clip)
        elif cfg.use_additional:
            out["train"].append(clip)
    return out


def source_files(root: Path, cfg: PreprocessConfig) -> list[Path]:
    """Every existing file the cache depends on (the split file, each listed clip's files, word vectors)."""
    files = [root / cfg.corpus.split_file]
    for clips in clip_list(root, cfg).values():
        for clip in clips:
            files.extend(p for p in cfg.corpus.paths(root, clip).values() if p.is_file())
    if cfg.word_vectors:
        files.append(Path(cfg.word_vectors))
    return files


def _part_variance(raw_std: np.ndarray, eps: float) -> tuple[list[str], dict[str, int]]:
    zero_parts = [p for p, s in PARTS.items() if (raw_std[s] < eps).all()]
    zero_dims = {p: int((raw_std[s] < eps).sum()) for p, s in {**PARTS, **SUB_SLICES}.items()}
    for part in zero_parts:
        extra = (" SAM-3D-Body multiplies jaw and expression by zero, so on its estimates the face VQ-VAE and "
                 "the generator's face head would learn nothing; disable the face branch or use face data."
                 if part == "face" else "")
        log.warning("%s part has zero variance over the training split (std < %g in all %d dims).%s", part, eps,
                    PARTS[part].stop - PARTS[part].start, extra)
    for sub in ("jaw", "expr"):
        if "face" not in zero_parts and zero_dims[sub] == SUB_SLICES[sub].stop - SUB_SLICES[sub].start:
            log.warning("%s has zero variance over the training split (the rest of the face part varies)", sub)
    return zero_parts, zero_dims


class _SplitWriter:
    """Appends records of one split to raw array files."""

    def __init__(self, folder: Path, keep_wave: bool) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.motion = open(folder / "motion.f32", "wb")
        self.audio = open(folder / "audio.f32", "wb")
        self.wave = open(folder / "wave.f32", "wb") if keep_wave else None
        self.frames = 0
        self.samples = 0
        self.records: list[dict[str, Any]] = []
        # (word intervals, clip frames, start, stop), encoded once the vocabulary exists; never the whole clip
        self.words: list[tuple[list[WordInterval], int, int, int]] = []

    def add(self, clip: RawClip, feats: np.ndarray, start: int, stop: int, whole: bool, fps: float,
            sr: int) -> None:
        """Append frames ``[start, stop)`` of ``clip`` (and its ``feats [N, C]``) as one record."""
        motion = np.ascontiguousarray(clip.vec[start:stop], dtype="<f4")
        if not np.isfinite(motion).all():
            raise RuntimeError(f"{clip.name}[{start}:{stop}]: non-finite frames must never reach the cache")
        self.motion.write(motion.tobytes())
        self.audio.write(np.ascontiguousarray(feats[start:stop], dtype="<f4").tobytes())
        rec: dict[str, Any] = {
            "name": clip.name if whole else f"{clip.name}@{start}", "clip": clip.name, "clip_start": start,
            "offset": self.frames, "length": stop - start, "raw_speaker": clip.raw_speaker,
            "constants": clip.constants.to_dict(),
        }
        if self.wave is not None:
            bounds = frame_bounds(clip.num_frames, sr, fps)
            wave = np.ascontiguousarray(clip.wave[bounds[start]:bounds[stop]], dtype="<f4")
            self.wave.write(wave.tobytes())
            rec.update(wave_offset=self.samples, wave_length=len(wave))
            self.samples += len(wave)
        self.frames += stop - start
        self.records.append(rec)
        self.words.append((clip.words, clip.num_frames, start, stop))

    def close(self) -> None:
        for f in (self.motion, self.audio, self.wave):
            if f is not None:
                f.close()


def _load_or_skip(root: Path, name: str, split: str, cfg: PreprocessConfig, skips: SkipReport) -> RawClip | None:
    """The validated clip; on a defect raise (strict) or count the skip and return None (non-strict).

    Non-finite frames are a defect in strict mode; otherwise they are counted here and dropped by the caller."""
    try:
        clip = load_clip(root, name, cfg.corpus)
        if clip.invalid_fields:
            fld, (count, first) = next(iter(clip.invalid_fields.items()))
            err = CorpusError(name, fld, f"{count} non-finite frame(s), first at frame {first}")
            if cfg.strict:
                raise err
            skips.dropped_frames[name] = int((~clip.valid).sum())
            log.warning("%s: dropping %d non-finite frame(s) (%s)", name, skips.dropped_frames[name], err.reason)
        return clip
    except CorpusError as e:
        if cfg.strict:
            raise
        skips.skip(e, split)
        return None


def _build(tmp: Path, root: Path, cfg: PreprocessConfig) -> None:
    t0 = time.perf_counter()
    corpus = cfg.corpus
    splits = clip_list(root, cfg)
    ignored_additional = sum(k == "additional" for k in read_split(root, corpus).values()) * (not cfg.use_additional)
    if ignored_additional:
        log.info("%d 'additional' clip(s) not used (use_additional=false)", ignored_additional)
    feat_names = audio_feature_names(cfg.audio_features, cfg.n_mels)
    skips = SkipReport()
    writers = {s: _SplitWriter(tmp / s, s in cfg.wave_splits) for s in SPLITS}
    motion_moments, audio_moments = _Moments(POSE_DIM), _Moments(len(feat_names))
    word_counts: Counter = Counter()
    contact_sources: Counter = Counter()
    total = sum(len(c) for c in splits.values())
    columns = (TextColumn("gesture cache {task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    try:
        with Progress(*columns, transient=True) as progress:
            task = progress.add_task("", total=total)
            for split, clips in splits.items():
                for name in clips:
                    progress.update(task, description=f"{split}/{name}")
                    clip = _load_or_skip(root, name, split, cfg, skips)
                    progress.advance(task)
                    if clip is None:
                        continue
                    contact_sources[clip.contact_source] += 1
                    feats = audio_features(clip.wave, clip.num_frames, corpus.sr, corpus.fps, cfg.audio_features,
                                           cfg.n_mels)
                    segments = finite_segments(clip.valid)
                    whole = len(segments) == 1 and segments[0] == (0, clip.num_frames)
                    for start, stop in segments:
                        if stop - start < cfg.min_frames(split):
                            skips.short_segments.append(f"{split}/{name}[{start}:{stop}]")
                            continue
                        writers[split].add(clip, feats, start, stop, whole, corpus.fps, corpus.sr)
                        if split == "train":
                            motion_moments.add(clip.vec[start:stop])
                            audio_moments.add(feats[start:stop])
                    if split == "train":
                        word_counts.update(w.word for w in clip.words)
    finally:
        for w in writers.values():
            w.close()
    skips.log_summary()
    if contact_sources["ones"]:
        log.warning("%d clip(s) have neither pred_keypoints_3d nor contact: foot contact set to all ones",
                    contact_sources["ones"])
    if not writers["train"].records:
        raise RuntimeError(f"no training data survived preprocessing of {root} (skips: {skips.summary()['by_field']})")

    speakers = SpeakerMap(r["raw_speaker"] for w in writers.values() for r in w.records
                          if r["raw_speaker"] is not None)
    speaker_counts: dict[str, dict[str, list[int]]] = defaultdict(dict)  # raw id -> split -> [records, frames]
    for split, w in writers.items():
        for r in w.records:
            r["speaker"] = speakers.index(r["raw_speaker"])
            key = "unknown" if r["raw_speaker"] is None else str(r["raw_speaker"])
            c = speaker_counts[key].setdefault(split, [0, 0])
            c[0], c[1] = c[0] + 1, c[1] + r["length"]
    trained = {str(r["raw_speaker"]) for r in writers["train"].records}
    untrained = sorted(k for k in speaker_counts if k != "unknown" and k not in trained)
    if untrained:
        log.warning("speakers %s have no training clip: their embeddings stay untrained", untrained)
    log.info("speakers (records, frames per split): %s", dict(speaker_counts))

    vocab = Vocabulary.from_counts(word_counts, cfg.min_word_count)
    for split, w in writers.items():
        with open(tmp / split / "words.i32", "wb") as f:
            for words, num_frames, start, stop in w.words:
                labels = frame_words(words, num_frames, corpus.fps)[start:stop]
                f.write(vocab.encode_frames(labels).astype("<i4").tobytes())
        w.words = []
    if cfg.word_vectors:
        np.save(tmp / "word_vectors.npy", load_word_vectors(cfg.word_vectors, vocab))

    windows: dict[str, int] = {}
    for split in WINDOWED_SPLITS:
        recs = writers[split].records
        idx = WindowIndex([r["length"] for r in recs], cfg.pose_length, cfg.stride,
                          names=[r["name"] for r in recs], short="skip")
        rows = np.array([tuple(idx[i]) for i in range(len(idx))], dtype=np.int64).reshape(-1, 3)
        np.save(tmp / split / "windows.npy", rows)
        windows[split] = len(rows)

    raw_std = motion_moments.std()
    audio_std = audio_moments.std()
    np.savez(tmp / "stats.npz", mean=motion_moments.mean.astype(np.float32),
             std=np.maximum(raw_std, cfg.std_floor).astype(np.float32), raw_std=raw_std.astype(np.float32),
             audio_mean=audio_moments.mean.astype(np.float32),
             audio_std=np.maximum(audio_std, cfg.std_floor).astype(np.float32))
    zero_parts, zero_dims = _part_variance(raw_std, cfg.zero_var_eps)

    for split, w in writers.items():
        (tmp / split / "records.json").write_text(json.dumps(w.records))
    (tmp / "vocab.json").write_text(vocab.to_json())
    (tmp / "speakers.json").write_text(speakers.to_json())
    meta = {
        "version": CACHE_VERSION, "root": str(root), "config": cfg.key_dict(), "pose_dim": POSE_DIM,
        "audio_feature_names": list(feat_names), "audio_dim": len(feat_names),
        "frames": {s: w.frames for s, w in writers.items()}, "samples": {s: w.samples for s, w in writers.items()},
        "records": {s: len(w.records) for s, w in writers.items()}, "windows": windows,
        "speakers": {"raw_ids": speakers.raw_ids, "num_known": speakers.num_known,
                     "unknown_index": speakers.unknown_index, "counts": speaker_counts},
        "vocab_size": len(vocab), "zero_variance_parts": zero_parts, "zero_variance_dims": zero_dims,
        "contact_sources": dict(contact_sources), "skips": skips.summary(),
        "ignored_additional": ignored_additional,
        "build_s": round(time.perf_counter() - t0, 3),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    log.info("gesture cache: %s frames, %s windows, %d speakers + unknown, vocab %d, in %.1fs",
             meta["frames"], windows, speakers.num_known, len(vocab), meta["build_s"])


class GestureCache:
    """Read access to a built cache folder (memory-mapped arrays, stats, vocabulary, speakers)."""

    def __init__(self, path: Path | str, built: bool = False) -> None:
        self.path = Path(path)
        self.built = built  # True when this call (re)built the folder
        self.meta: dict[str, Any] = json.loads((self.path / "meta.json").read_text())
        with np.load(self.path / "stats.npz") as s:
            self.stats = {k: s[k] for k in s.files}
        self.vocab = Vocabulary.from_json((self.path / "vocab.json").read_text())
        self.speakers = SpeakerMap.from_json((self.path / "speakers.json").read_text())
        wv = self.path / "word_vectors.npy"
        self.word_vectors = np.load(wv) if wv.is_file() else None

    @property
    def audio_dim(self) -> int:
        return int(self.meta["audio_dim"])

    @property
    def zero_variance_parts(self) -> list[str]:
        return list(self.meta["zero_variance_parts"])

    def records(self, split: str) -> list[dict[str, Any]]:
        return json.loads((self.path / split / "records.json").read_text())

    def windows(self, split: str) -> np.ndarray:
        return np.load(self.path / split / "windows.npy")

    def constants(self, record: dict[str, Any]) -> ClipConstants:
        return ClipConstants.from_dict(record["constants"])

    def arrays(self, split: str) -> dict[str, np.ndarray]:
        """Read-only memmaps: motion ``[F, 320]``, audio ``[F, C]``, words ``[F]`` and wave ``[S]`` if stored."""
        frames = int(self.meta["frames"][split])
        folder = self.path / split

        def mm(name: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
            if shape[0] == 0:
                return np.zeros(shape, dtype=dtype)
            return np.memmap(folder / name, dtype=dtype, mode="r", shape=shape)

        out = {"motion": mm("motion.f32", "<f4", (frames, POSE_DIM)),
               "audio": mm("audio.f32", "<f4", (frames, self.audio_dim)),
               "words": mm("words.i32", "<i4", (frames,))}
        if (folder / "wave.f32").is_file():
            out["wave"] = mm("wave.f32", "<f4", (int(self.meta["samples"][split]),))
        return out


def _artifact(root: Path, cache_dir: Path | str, cfg: PreprocessConfig) -> ArtifactCache:
    # One name per audio feature kind: caches of different kinds can live side by side in one folder.
    return ArtifactCache(cache_dir, f"gesture_{cfg.audio_features}", {"root": str(root.resolve()), **cfg.key_dict()},
                         source_files(root, cfg))


def build_gesture_cache(root: Path | str, cache_dir: Path | str, cfg: PreprocessConfig = PreprocessConfig(),
                        force: bool = False) -> GestureCache:
    """Open the cache for ``root`` under ``cache_dir``, (re)building it when config or source files changed."""
    root = Path(root)
    cache = _artifact(root, cache_dir, cfg)
    built = [False]

    def builder(tmp: Path) -> None:
        built[0] = True
        _build(tmp, root, cfg)

    path = cache.build(builder, force=force)
    return GestureCache(path, built=built[0])


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Build (or check) the gesture preprocessing cache.")
    p.add_argument("--root", required=True, type=Path)
    p.add_argument("--cache-dir", required=True, type=Path)
    p.add_argument("--pose-length", type=int, default=PreprocessConfig.pose_length)
    p.add_argument("--stride", type=int, default=PreprocessConfig.stride)
    p.add_argument("--audio-features", default=PreprocessConfig.audio_features, choices=("onset_amp", "mel"))
    p.add_argument("--strict", action="store_true", help="fail on the first bad clip instead of skipping it")
    p.add_argument("--use-additional", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="rebuild the cache even if it is up to date")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = PreprocessConfig(pose_length=a.pose_length, stride=a.stride, audio_features=a.audio_features,
                           strict=a.strict, use_additional=a.use_additional)
    cache = build_gesture_cache(a.root, a.cache_dir, cfg, force=a.overwrite)
    m = cache.meta
    print(f"{cache.path}: frames {m['frames']}, windows {m['windows']}, speakers {m['speakers']['raw_ids']} + "
          f"unknown, vocab {m['vocab_size']}, zero-variance parts {m['zero_variance_parts']}, "
          f"skipped clips {m['skips']['skipped_clips']}")


if __name__ == "__main__":
    main()

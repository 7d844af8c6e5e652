"""Word tiers from Praat TextGrids (via praatio) turned into per-frame word ids, and the word vocabulary.

Index 0 is PAD (silence, no word), 1 is UNK (a word not in the training vocabulary). Not for model code.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from praatio import textgrid

log = logging.getLogger(__name__)

PAD, UNK = 0, 1
WORD_TIER_NAMES = ("words", "word")


class TextGridError(ValueError):
    """A TextGrid cannot be used; the message says why."""


class WordInterval(NamedTuple):
    start: float
    end: float
    word: str


def normalise_word(label: str) -> str:
    return label.strip().lower()


def read_words(path: Path | str, tier_names: Sequence[str] = WORD_TIER_NAMES) -> list[WordInterval]:
    """Non-empty intervals of the first tier named one of ``tier_names`` (case-insensitive), sorted by time."""
    try:
        tg = textgrid.openTextgrid(str(path), includeEmptyIntervals=False, reportingMode="silence")
    except Exception as e:  # praatio raises many types on malformed input
        raise TextGridError(f"malformed TextGrid: {type(e).__name__}: {e}") from e
    wanted = {n.lower() for n in tier_names}
    name = next((n for n in tg.tierNames if n.lower() in wanted), None)
    if name is None:
        raise TextGridError(f"no word tier (looked for {sorted(wanted)}, found {list(tg.tierNames)})")
    tier = tg.getTier(name)
    if not hasattr(tier, "entries") or tier.entries and len(tier.entries[0]) != 3:
        raise TextGridError(f"tier {name!r} is not an interval tier")
    words = [WordInterval(float(s), float(e), normalise_word(lab)) for s, e, lab in tier.entries]
    words = [w for w in words if w.word and w.end > w.start]
    return sorted(words, key=lambda w: w.start)


def frame_words(words: Sequence[WordInterval], num_frames: int, fps: float) -> list[str]:
    """The word spoken at each frame's centre time ``(i + 0.5) / fps``; ``""`` where none."""
    out = [""] * num_frames
    if not words:
        return out
    centres = (np.arange(num_frames) + 0.5) / fps
    starts = np.array([w.start for w in words])
    ends = np.array([w.end for w in words])
    k = np.searchsorted(starts, centres, side="right") - 1
    for i in np.nonzero((k >= 0) & (centres < ends[np.clip(k, 0, None)]))[0]:
        out[i] = words[k[i]].word
    return out


class Vocabulary:
    """Word <-> id with PAD = 0 and UNK = 1; words ordered by training frequency, then alphabetically."""

    def __init__(self, words: Sequence[str]):
        if len(set(words)) != len(words) or any(not w for w in words):
            raise ValueError("vocabulary words must be unique and non-empty")
        self.words = list(words)
        self._index = {w: i + 2 for i, w in enumerate(self.words)}

    @classmethod
    def from_counts(cls, counts: Counter, min_count: int = 1) -> Vocabulary:
        kept = sorted((w for w, c in counts.items() if c >= min_count and w), key=lambda w: (-counts[w], w))
        return cls(kept)

    def __len__(self) -> int:
        """Number of embedding rows (PAD and UNK included)."""
        return len(self.words) + 2

    def encode(self, word: str) -> int:
        if not word:
            return PAD
        return self._index.get(normalise_word(word), UNK)

    def encode_frames(self, frame_labels: Iterable[str]) -> np.ndarray:
        return np.array([self.encode(w) for w in frame_labels], dtype=np.int32)

    def to_json(self) -> str:
        return json.dumps({"pad": PAD, "unk": UNK, "words": self.words})

    @classmethod
    def from_json(cls, text: str) -> Vocabulary:
        return cls(json.loads(text)["words"])


def load_word_vectors(path: Path | str, vocab: Vocabulary) -> np.ndarray:
    """Rows for ``vocab`` from a text file of ``word v1 .. vD`` lines (fastText ``.vec``; a ``count dim`` header
    line is skipped): ``[len(vocab), D]`` float32, zeros for PAD, UNK and words the file lacks."""
    found: dict[int, np.ndarray] = {}
    dim = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.rstrip().split(" ")
            if line_no == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue
            if len(parts) < 2:
                continue
            if dim is None:
                dim = len(parts) - 1
            elif len(parts) - 1 != dim:
                raise ValueError(f"{path}:{line_no}: {len(parts) - 1} values, expected {dim}")
            idx = vocab.encode(parts[0])
            if idx > UNK and idx not in found:
                found[idx] = np.asarray(parts[1:], dtype=np.float32)
    if dim is None:
        raise ValueError(f"{path}: no word vectors")
    table = np.zeros((len(vocab), dim), dtype=np.float32)
    for idx, vec in found.items():
        table[idx] = vec
    log.info("word vectors: %d of %d vocabulary words found in %s", len(found), len(vocab.words), path)
    return table

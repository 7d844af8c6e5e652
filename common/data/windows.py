"""Fixed-length windows over sequences of varying length, shared by hand sequences and gesture clips.

A window ends at a valid frame (the frame that is supervised); every `stride`-th such end is kept. This module
only indexes; datasets load the frames.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)


class Window(NamedTuple):
    seq: int  # index into the sequence list
    start: int  # first frame (inclusive)
    stop: int  # last frame + 1 (exclusive); stop - start == window


class WindowIndex:
    """All windows of ``window`` frames whose last frame is valid, every ``stride``-th per sequence.

    Args:
        lengths: frame count per sequence.
        window: frames per window (1 for single-frame models).
        stride: keep every ``stride``-th candidate end frame of a sequence (counted from the first).
        valid: optional per-sequence bool arrays ``[length]``; a window must end at a valid frame.
        names: sequence names, used in errors and logs.
        short: ``"error"`` raises on a sequence shorter than ``window``; ``"skip"`` counts and logs it.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        window: int,
        stride: int = 1,
        valid: Sequence[np.ndarray] | None = None,
        names: Sequence[str] | None = None,
        short: str = "error",
    ) -> None:
        if window < 1 or stride < 1:
            raise ValueError(f"window and stride must be >= 1, got window={window}, stride={stride}")
        if short not in ("error", "skip"):
            raise ValueError(f"short must be 'error' or 'skip', got {short!r}")
        if valid is not None and len(valid) != len(lengths):
            raise ValueError(f"valid has {len(valid)} entries for {len(lengths)} sequences")
        names = list(names) if names is not None else [f"sequence {i}" for i in range(len(lengths))]
        self.window, self.stride, self.names = window, stride, names
        self.skipped: list[str] = []
        rows: list[np.ndarray] = []
        for i, n in enumerate(lengths):
            n = int(n)
            if n < window:
                msg = f"{names[i]}: {n} frames, shorter than the window of {window}"
                if short == "error":
                    raise ValueError(msg)
                self.skipped.append(names[i])
                continue
            ends = np.arange(window - 1, n)  # inclusive last frame of each candidate window
            if valid is not None:
                v = np.asarray(valid[i], dtype=bool)
                if v.shape != (n,):
                    raise ValueError(f"{names[i]}: valid has shape {v.shape}, expected ({n},)")
                ends = ends[v[ends]]
            ends = ends[::stride]
            rows.append(np.stack([np.full_like(ends, i), ends + 1 - window, ends + 1], axis=1))
        if self.skipped:
            log.warning("skipped %d sequence(s) shorter than %d frames: %s", len(self.skipped), window,
                        ", ".join(self.skipped[:10]))
        self._rows = np.concatenate(rows, 0) if rows else np.zeros((0, 3), dtype=np.int64)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> Window:
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        seq, start, stop = (int(v) for v in self._rows[i])
        return Window(seq, start, stop)

    def per_sequence_counts(self) -> np.ndarray:
        """Number of windows per sequence index ``[num_sequences]``."""
        return np.bincount(self._rows[:, 0], minlength=len(self.names))

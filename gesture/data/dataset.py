"""Datasets over a built gesture cache: fixed windows for train / val, whole clips (with waveform) for test.

Samples are dicts of tensors; motion and audio come normalised with the training mean / std (``motion_raw`` is
the unnormalised layout vector). Memory maps are opened lazily per process, so workers never pickle arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from gesture.data.preprocess import GestureCache
from gesture.layout import POSE_DIM


class _CacheSplit(Dataset):
    def __init__(self, cache: GestureCache, split: str) -> None:
        self.cache_path, self.split = cache.path, split
        self.records = cache.records(split)
        stats = cache.stats
        self.mean, self.std = stats["mean"].astype(np.float32), stats["std"].astype(np.float32)
        self.audio_mean, self.audio_std = stats["audio_mean"].astype(np.float32), stats["audio_std"].astype(np.float32)
        self._cache: GestureCache | None = cache
        self._arrays: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = None  # reopened in the worker
        state["_cache"] = None
        return state

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            cache = self._cache if self._cache is not None else GestureCache(self.cache_path)
            self._arrays = cache.arrays(self.split)
        return self._arrays

    def _frames(self, record: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
        a, off = self.arrays, record["offset"]
        raw = np.array(a["motion"][off + start: off + stop], dtype=np.float32)
        audio = np.array(a["audio"][off + start: off + stop], dtype=np.float32)
        return {
            "motion": torch.from_numpy((raw - self.mean) / self.std),
            "motion_raw": torch.from_numpy(raw),
            "audio": torch.from_numpy((audio - self.audio_mean) / self.audio_std),
            "words": torch.from_numpy(np.array(a["words"][off + start: off + stop], dtype=np.int64)),
            "speaker": torch.tensor(record["speaker"], dtype=torch.long),
            "clip": record["name"],
        }


class GestureWindowDataset(_CacheSplit):
    """Windows of ``pose_length`` frames: ``motion / motion_raw [t, 320]``, ``audio [t, C]``, ``words [t]``,
    ``speaker []`` long, ``clip`` str, ``start []`` long (first frame within the record)."""

    def __init__(self, cache: GestureCache, split: str) -> None:
        super().__init__(cache, split)
        self.windows = cache.windows(split)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec_idx, start, stop = (int(v) for v in self.windows[i])
        sample = self._frames(self.records[rec_idx], start, stop)
        sample["start"] = torch.tensor(start, dtype=torch.long)
        return sample


class GestureClipDataset(_CacheSplit):
    """Whole records (test): window fields with ``t = N``, plus ``wave [S]`` float32 with
    ``S = round(N * sr / fps)`` when the split keeps waveforms, and the clip constants under their SAM-3D-Body
    names (``cam_t [3]``, ``focal_length []``, ``scale_params [28]``, ``shape_params [45]``, ``width``,
    ``height``, ``fps``)."""

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        sample = self._frames(rec, 0, rec["length"])
        sample["start"] = torch.tensor(0, dtype=torch.long)
        if "wave_offset" in rec:
            off = rec["wave_offset"]
            sample["wave"] = torch.from_numpy(np.array(self.arrays["wave"][off: off + rec["wave_length"]],
                                                       dtype=np.float32))
        for key, value in rec["constants"].items():
            dtype = torch.long if key in ("width", "height") else torch.float32
            sample[key] = torch.tensor(value, dtype=dtype)
        return sample


def window_spec(pose_length: int, audio_dim: int) -> dict[str, tuple[int | None, ...]]:
    """Per-sample shapes of ``GestureWindowDataset`` items, for ``CheckedCollate``."""
    return {"motion": (pose_length, POSE_DIM), "motion_raw": (pose_length, POSE_DIM),
            "audio": (pose_length, audio_dim), "words": (pose_length,), "speaker": (), "start": ()}


def clip_spec(audio_dim: int) -> dict[str, tuple[int | None, ...]]:
    """Per-sample shapes of ``GestureClipDataset`` items (variable length, so batches of one)."""
    return {"motion": (None, POSE_DIM), "motion_raw": (None, POSE_DIM), "audio": (None, audio_dim),
            "words": (None,), "speaker": (), "cam_t": (3,), "scale_params": (28,), "shape_params": (45,)}

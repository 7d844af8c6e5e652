"""Several converted hand datasets in one training run, mixed by weight (``data=hand_mix``).

Training draws each sample from dataset ``k`` with probability ``weight_k / sum(weights)`` and, within it,
uniformly over its windows (``common.data.base.EpochSeededWeightedSampler``: a function of seed and epoch, sharded
under DDP); an epoch is ``epoch_samples`` draws (default: the datasets' training windows together). Validation and
test are the datasets' own splits, one after the other (a dataset without the split is left out). Every dataset is
read with the same crop size, window length and pose convention; each keeps its own ``mano_model`` flag.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Sampler

from common.data.base import EpochSeededWeightedSampler
from handpose.data.datamodule import HandDataModule
from handpose.data.dataset import HandWindowDataset
from handpose.data.format import SPLITS_FILE, read_splits

log = logging.getLogger(__name__)


class MixedWindows(ConcatDataset):
    """The windows of several ``HandWindowDataset`` one after the other, with their names and sampling weights."""

    def __init__(self, parts: Mapping[str, HandWindowDataset], weights: Mapping[str, float] | None = None) -> None:
        super().__init__(list(parts.values()))
        self.names = list(parts)
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in self.names}

    def sample_weights(self) -> torch.Tensor:
        """Per window: its dataset's weight spread over that dataset's windows -> ``[len(self)]``."""
        return torch.cat([torch.full((len(d),), self.weights[n] / len(d), dtype=torch.float64)
                          for n, d in zip(self.names, self.datasets)])

    @property
    def num_skipped(self) -> int:
        return sum(d.num_skipped for d in self.datasets)

    def sample_annotations(self, n: int) -> dict[str, np.ndarray]:
        """``n`` annotation rows (as ``HandWindowDataset.sample_annotations``), each dataset by its weight."""
        p = torch.tensor([self.weights[name] for name in self.names], dtype=torch.float64)
        counts = torch.bincount(torch.multinomial(p, n, replacement=True), minlength=len(self.names)).tolist()
        rows = [d.sample_annotations(c) for d, c in zip(self.datasets, counts) if c]
        return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


class HandMixDataModule(HandDataModule):
    """``HandDataModule`` over ``sources``: ``{name: {root, weight}}`` (weight default 1); ``epoch_samples``: draws
    per training epoch (default: all training windows together). Other arguments as ``HandDataModule`` (``root``
    is not used)."""

    def __init__(self, sources: Mapping[str, Mapping], epoch_samples: int | None = None, **kwargs) -> None:
        if not sources:
            raise ValueError("data.sources: name at least one dataset ({name: {root, weight}})")
        self.sources = {}
        for name, spec in sources.items():
            if spec is None:  # data.sources.<name>=null drops one
                continue
            if "root" not in spec:
                raise ValueError(f"data.sources.{name}: needs a root (and optionally a weight)")
            weight = float(spec.get("weight", 1.0))
            if not weight > 0:
                raise ValueError(f"data.sources.{name}.weight: must be > 0, got {weight}")
            self.sources[name] = {"root": Path(str(spec["root"])), "weight": weight}
        if not self.sources:
            raise ValueError("data.sources: every dataset was dropped")
        kwargs.pop("root", None)
        kwargs.update(generate_if_missing=False, synthetic=None)
        super().__init__(root=next(iter(self.sources.values()))["root"], **kwargs)
        self.epoch_samples = epoch_samples

    def prepare_data(self) -> None:
        missing = [f"{name}: {s['root'] / SPLITS_FILE}" for name, s in self.sources.items()
                   if not (s["root"] / SPLITS_FILE).is_file()]
        if missing:
            raise FileNotFoundError(f"data.sources: no converted dataset at {missing} (make data-<name> SRC=...)")

    def splits(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, s in self.sources.items():
            if (s["root"] / SPLITS_FILE).is_file():
                for split, names in read_splits(s["root"]).items():
                    out.setdefault(split, []).extend(f"{name}/{n}" for n in names)
        return out

    def build_dataset(self, split: str) -> MixedWindows:
        parts = {}
        for name, s in self.sources.items():
            if not read_splits(s["root"]).get(split):
                log.info("hand_mix: %s has no %r split", name, split)
                continue
            parts[name] = self.window_dataset(s["root"], split)
        if not parts:
            raise ValueError(f"hand_mix: no source has a {split!r} split")
        mixed = MixedWindows(parts, {n: s["weight"] for n, s in self.sources.items()})
        log.info("hand_mix %s: %s", split, ", ".join(f"{n} {len(d)} windows (weight {mixed.weights[n]:g})"
                                                  for n, d in zip(mixed.names, mixed.datasets)))
        return mixed

    def train_sampler(self, dataset: MixedWindows, seed: int, shard: dict[str, int] | None) -> Sampler:
        num = self.epoch_samples or len(dataset)
        return EpochSeededWeightedSampler(dataset.sample_weights(), num, seed, **(shard or {}))

"""LightningDataModule for co-speech gesture: a corpus folder in, normalised windows / whole test clips out.

``prepare_data`` (rank 0) writes the synthetic corpus when ``root`` is absent and builds the cache;
``setup`` opens it on every rank. Batches are documented on ``GestureDataModule``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from common.data.base import BaseDataModule
from common.data.collate import CheckedCollate
from gesture.data.corpus import CorpusConfig
from gesture.data.dataset import GestureClipDataset, GestureWindowDataset, clip_spec, window_spec
from gesture.data.preprocess import GestureCache, PreprocessConfig, build_gesture_cache
from gesture.data.speakers import SpeakerMap
from gesture.data.synthetic import SyntheticConfig, generate

log = logging.getLogger(__name__)


class GestureDataModule(BaseDataModule):
    """Train / val batches (``b`` windows of ``t = pose_length`` frames):

    ``motion [b, t, 320]`` float32 normalised with the training mean / std, ``motion_raw [b, t, 320]``,
    ``audio [b, t, C]`` per-frame audio features normalised with training stats, ``words [b, t]`` long
    (PAD 0, UNK 1), ``speaker [b]`` long (``speakers.unknown_index`` for unknown speakers), ``start [b]``,
    ``clip`` list of names. Test batches hold one whole clip (``t = N``) plus ``wave [1, S]`` float32 16 kHz with
    ``S = round(N * 16000 / fps)`` and the clip constants ``cam_t [1, 3]``, ``focal_length [1]``,
    ``scale_params [1, 28]``, ``shape_params [1, 45]``, ``width [1]``, ``height [1]``, ``fps [1]``.

    After ``setup``: ``stats`` (``{"mean", "std"}`` tensors [320]), ``audio_stats``, ``speakers`` (SpeakerMap),
    ``vocab_size``, ``audio_dim``, ``zero_variance_parts``, ``word_vectors`` (tensor or None), ``cache``.
    """

    def __init__(
        self,
        root: str,
        cache_dir: str,
        pose_length: int = 64,
        stride: int = 20,
        audio_features: str = "onset_amp",
        n_mels: int = 64,
        generate_if_missing: bool = True,
        strict: bool = False,
        new_cache: bool = False,
        use_additional: bool = False,
        word_vectors: str | None = None,
        wave_splits: Sequence[str] = ("test",),
        synthetic: Mapping[str, Any] | None = None,
        batch_size: int = 32,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.root, self.cache_dir = Path(root), Path(cache_dir)
        self.preprocess = PreprocessConfig(
            corpus=CorpusConfig(), pose_length=pose_length, stride=stride, audio_features=audio_features,
            n_mels=n_mels, strict=strict, use_additional=use_additional, wave_splits=tuple(wave_splits),
            word_vectors=word_vectors,
        )
        self.generate_if_missing, self.new_cache = generate_if_missing, new_cache
        self.synthetic = SyntheticConfig(**dict(synthetic or {}))
        self.cache: GestureCache | None = None
        self.collate_fn = None  # set in _open, once the cache says the audio feature size
        self._built_this_run = False

    # ------------------------------------------------------------------------------------------ lifecycle
    def prepare_data(self) -> None:
        if not self.root.exists():
            if not self.generate_if_missing:
                raise FileNotFoundError(f"gesture corpus not found: {self.root} (generate_if_missing=false)")
            log.info("generating the synthetic gesture corpus in %s", self.root)
            generate(self.root, self.synthetic)
        force = self.new_cache and not self._built_this_run
        cache = build_gesture_cache(self.root, self.cache_dir, self.preprocess, force=force)
        self._built_this_run = self._built_this_run or cache.built

    def setup(self, stage: str | None = None) -> None:
        if self.cache is None:
            if not self.root.exists():
                self.prepare_data()  # setup without prepare_data (plain scripts); Lightning calls it first
            self._open(build_gesture_cache(self.root, self.cache_dir, self.preprocess, force=False))
        super().setup(stage)

    def _open(self, cache: GestureCache) -> None:
        self.cache = cache
        s = cache.stats
        self.stats = {"mean": torch.from_numpy(s["mean"]), "std": torch.from_numpy(s["std"])}
        self.audio_stats = {"mean": torch.from_numpy(s["audio_mean"]), "std": torch.from_numpy(s["audio_std"])}
        self.speakers: SpeakerMap = cache.speakers
        self.vocab = cache.vocab
        self.vocab_size = len(cache.vocab)
        self.audio_dim = cache.audio_dim
        self.zero_variance_parts = cache.zero_variance_parts
        self.word_vectors = None if cache.word_vectors is None else torch.from_numpy(cache.word_vectors)
        self.test_split = "test" if cache.meta["records"].get("test", 0) > 0 else None
        self.collate_fn = CheckedCollate(window_spec(self.preprocess.pose_length, self.audio_dim))

    # ------------------------------------------------------------------------------------------- datasets
    def build_dataset(self, split: str) -> Dataset:
        assert self.cache is not None, "setup() opens the cache before datasets are built"
        if split == "test":
            return GestureClipDataset(self.cache, split)
        return GestureWindowDataset(self.cache, split)

    def test_dataloader(self) -> DataLoader:
        """Whole clips of varying length: batches of one."""
        return DataLoader(self._dataset("test"), batch_size=1, shuffle=False, num_workers=self.num_workers,
                          persistent_workers=self.persistent_workers and self.num_workers > 0,
                          pin_memory=self.pin_memory, collate_fn=CheckedCollate(clip_spec(self.audio_dim)))

    def normalise(self, motion_raw: torch.Tensor) -> torch.Tensor:
        """``[..., 320]`` raw layout vector -> normalised with the training stats (new tensor)."""
        return (motion_raw - self.stats["mean"].to(motion_raw)) / self.stats["std"].to(motion_raw)

    def denormalise(self, motion: torch.Tensor) -> torch.Tensor:
        """``[..., 320]`` normalised -> raw layout vector (new tensor)."""
        return motion * self.stats["std"].to(motion) + self.stats["mean"].to(motion)

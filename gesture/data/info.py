"""``DataInfo``: everything inference needs from the training data (normalisation, vocabulary, speakers, audio
features, per-speaker render constants), JSON-able, stored in the generator's checkpoint so that ``gesture.infer``
needs no cache."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from gesture.layout import ClipConstants

# Used when a speaker has no training clip and the checkpoint has no average (documented in gesture.infer).
DEFAULT_CONSTANTS = ClipConstants(cam_t=(0.0, 0.0, 4.0), focal_length=1500.0, scale_params=(0.0,) * 28,
                                  shape_params=(0.0,) * 45, width=1080, height=1920, fps=30.0)


def _mean_constants(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Average of ``ClipConstants.to_dict()`` dicts (sizes: the first clip's; fps: the first clip's)."""
    arrays = {k: np.mean([np.asarray(c[k], np.float64) for c in items], axis=0)
              for k in ("cam_t", "focal_length", "scale_params", "shape_params")}
    first = items[0]
    return ClipConstants.from_dict({**arrays, "width": first["width"], "height": first["height"],
                                    "fps": first["fps"]}).to_dict()


@dataclass
class DataInfo:
    """Everything inference needs from the training data, JSON-able (stored in the checkpoint).

    ``mean``/``std`` [320] and ``audio_mean``/``audio_std`` [C] normalise motion and audio features;
    ``vocab_words`` the vocabulary after PAD/UNK; ``speaker_raw_ids`` the known raw ids (index = position,
    unknown = len); ``audio`` the feature config (kind, n_mels, sr, fps); ``constants`` the training clips' average
    render constants per raw speaker id (key ``"default"``: over all clips); ``datamodule`` the
    ``GestureDataModule`` arguments that rebuild the data (test-split inference).
    """

    mean: list[float]
    std: list[float]
    audio_mean: list[float]
    audio_std: list[float]
    vocab_words: list[str]
    speaker_raw_ids: list[int]
    audio: dict[str, Any]
    pose_length: int = 64
    zero_variance_parts: list[str] = field(default_factory=list)
    constants: dict[str, dict[str, Any]] = field(default_factory=dict)
    datamodule: dict[str, Any] = field(default_factory=dict)

    @property
    def num_speakers(self) -> int:
        """Speaker embedding rows: known speakers + the unknown slot."""
        return len(self.speaker_raw_ids) + 1

    @property
    def vocab_size(self) -> int:
        return len(self.vocab_words) + 2

    @property
    def audio_dim(self) -> int:
        return len(self.audio_mean)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataInfo:
        return cls(**dict(d))

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` [320] float32 tensors."""
        return torch.tensor(self.mean, dtype=torch.float32), torch.tensor(self.std, dtype=torch.float32)

    def clip_constants(self, raw_speaker: int | None) -> ClipConstants:
        """Average training constants of ``raw_speaker``, else of all training clips, else ``DEFAULT_CONSTANTS``."""
        key = str(raw_speaker)
        if raw_speaker is not None and key in self.constants:
            return ClipConstants.from_dict(self.constants[key])
        if "default" in self.constants:
            return ClipConstants.from_dict(self.constants["default"])
        return DEFAULT_CONSTANTS

    @classmethod
    def from_datamodule(cls, dm: Any) -> DataInfo:
        """From a set-up ``gesture.data.datamodule.GestureDataModule``."""
        pre = dm.preprocess
        records = dm.cache.records("train")
        by_speaker: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            by_speaker.setdefault(str(r["raw_speaker"]), []).append(r["constants"])
        constants = {k: _mean_constants(v) for k, v in by_speaker.items() if k != "None"}
        if records:
            constants["default"] = _mean_constants([r["constants"] for r in records])
        datamodule = dict(root=str(dm.root), cache_dir=str(dm.cache_dir), pose_length=pre.pose_length,
                          stride=pre.stride, audio_features=pre.audio_features, n_mels=pre.n_mels,
                          strict=pre.strict, use_additional=pre.use_additional, word_vectors=pre.word_vectors,
                          wave_splits=list(pre.wave_splits), synthetic=asdict(dm.synthetic),
                          generate_if_missing=dm.generate_if_missing)
        return cls(
            mean=dm.stats["mean"].tolist(), std=dm.stats["std"].tolist(),
            audio_mean=dm.audio_stats["mean"].tolist(), audio_std=dm.audio_stats["std"].tolist(),
            vocab_words=list(dm.vocab.words), speaker_raw_ids=list(dm.speakers.raw_ids),
            audio=dict(kind=pre.audio_features, n_mels=pre.n_mels, sr=pre.corpus.sr, fps=pre.corpus.fps),
            pose_length=pre.pose_length, zero_variance_parts=list(dm.zero_variance_parts),
            constants=constants, datamodule=datamodule,
        )

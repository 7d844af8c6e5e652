"""LightningDataModule for hand pose windows stored in the on-disk format (synthetic or converted real data).

Builds one :class:`HandWindowDataset` per split from ``ROOT/splits.json``; with ``generate_if_missing`` the
synthetic set is generated into ``ROOT`` by ``prepare_data`` (local rank 0, the other ranks wait).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

from common.data.base import BaseDataModule
from common.data.collate import CheckedCollate
from handpose.data.dataset import Augment, HandWindowDataset, sample_spec
from handpose.data.format import SPLITS_FILE, read_splits

log = logging.getLogger(__name__)


class HandDataModule(BaseDataModule):
    """Batches ``[b, t, ...]`` of the keys in :func:`handpose.data.dataset.sample_spec` (``t = num_frame``).

    Args:
        root: folder with ``splits.json`` and the sequence folders.
        num_frame: frames per window (1 for stage 1); ``stride`` / ``eval_stride``: keep every n-th window end
            in training / evaluation.
        img_size: side of the square crop; ``bbox_scale``: crop side / longest bbox side.
        augment: :class:`Augment` fields for the training split (``None`` = no augmentation).
        flat_hand_mean: convention of the ``mano_pose`` the batches carry.
        mano_model_path: the MANO files, needed for data annotated with the official model.
        limit_sequences: use only the first n sequences of each split (quick runs).
        generate_if_missing / synthetic: generate the synthetic set (:class:`SyntheticConfig` fields) into
            ``root`` when ``root/splits.json`` is absent.
        The remaining arguments go to :class:`common.data.base.BaseDataModule`.
    """

    def __init__(
        self,
        root: str | Path,
        batch_size: int = 32,
        num_workers: int = 2,
        num_frame: int = 1,
        img_size: int = 224,
        stride: int = 1,
        eval_stride: int = 1,
        bbox_scale: float = 1.4,
        augment: Mapping | Augment | None = None,
        flat_hand_mean: bool = False,
        mano_model_path: str | None = None,
        limit_sequences: int | None = None,
        generate_if_missing: bool = False,
        synthetic: Mapping | None = None,
        generate_workers: int | None = None,
        persistent_workers: bool = True,
        pin_memory: bool | None = None,
        batch_size_is_global: bool = False,
        drop_last_train: bool = True,
        seed: int | None = None,
        train_split: str = "train",
    ) -> None:
        super().__init__(batch_size, num_workers, persistent_workers, pin_memory, batch_size_is_global,
                         drop_last_train, seed, test_split="test", train_split=train_split)
        self.root = Path(root)
        self.num_frame, self.img_size, self.stride, self.eval_stride = num_frame, img_size, stride, eval_stride
        self.bbox_scale = bbox_scale
        self.augment = Augment(**augment) if isinstance(augment, Mapping) else augment
        self.flat_hand_mean, self.mano_model_path = flat_hand_mean, mano_model_path
        self.limit_sequences = limit_sequences
        self.generate_if_missing = generate_if_missing
        self.synthetic = dict(synthetic or {})
        self.generate_workers = generate_workers
        self.collate_fn = CheckedCollate(sample_spec(num_frame, img_size))

    def _synthetic_config(self):
        from handpose.data.synthetic import SyntheticConfig

        return SyntheticConfig(**self.synthetic)

    def prepare_data(self) -> None:
        if not self.generate_if_missing:
            return
        from handpose.data.synthetic import CONFIG_FILE, generate_dataset

        if (self.root / SPLITS_FILE).exists():
            made_with = self.root / CONFIG_FILE
            wanted = json.loads(json.dumps(asdict(self._synthetic_config())))  # as written: tuples are lists
            have = json.loads(made_with.read_text()) if made_with.exists() else wanted
            differ = {k: (have.get(k), v) for k, v in wanted.items() if have.get(k) != v}
            if differ:
                log.warning("%s was generated with other settings (setting: (on disk, configured)) %s; "
                            "delete it to regenerate", self.root, differ)
            if self.train_split not in read_splits(self.root):
                raise ValueError(
                    f"{self.root / SPLITS_FILE} has no split {self.train_split!r} (data.train_split): the set was "
                    f"generated with other settings {differ}. Delete {self.root} to regenerate it, and retrain "
                    "Stage 1 on the new set (outputs/stage1/stage1)")
            return
        log.info("%s has no %s: generating the synthetic hand set there", self.root, SPLITS_FILE)
        generate_dataset(self.root, self._synthetic_config(), workers=self.generate_workers)

    def splits(self) -> dict[str, list[str]]:
        if (self.root / SPLITS_FILE).exists():
            return read_splits(self.root)
        if self.generate_if_missing:  # what prepare_data will write
            return self._synthetic_config().split_names()
        raise FileNotFoundError(
            f"{self.root / SPLITS_FILE} not found: generate the synthetic set (`make data-hand`), convert a "
            "dataset into the format of handpose.data.format, or set generate_if_missing=true"
        )

    def has_split(self, role: str) -> bool:
        return bool(self.splits().get(self.split_of(role)))

    def build_dataset(self, split: str) -> HandWindowDataset:
        return self.window_dataset(self.root, split)

    def window_dataset(self, root: Path, split: str) -> HandWindowDataset:
        """``split`` of the converted set at ``root`` with this module's settings (augmented when training)."""
        train = split == self.train_split
        return HandWindowDataset(
            root, split, num_frame=self.num_frame, img_size=self.img_size,
            stride=self.stride if train else self.eval_stride, bbox_scale=self.bbox_scale,
            augment=self.augment if train else None, flat_hand_mean=self.flat_hand_mean,
            mano_model_path=self.mano_model_path, limit_sequences=self.limit_sequences,
        )

    def collate_for(self, dataset) -> CheckedCollate:
        token_dim = getattr(dataset, "token_dim", None)  # samples with precomputed frame tokens instead of images
        return self.collate_fn if token_dim is None else CheckedCollate(sample_spec(self.num_frame, self.img_size,
                                                                                    token_dim))

    def skipped_windows(self) -> dict[str, int]:
        """Windows skipped for unreadable frames so far, per built split."""
        return {role: ds.num_skipped for role, ds in self.datasets.items()}

    def teardown(self, stage: str | None = None) -> None:
        for role, count in self.skipped_windows().items():
            if count:
                log.warning("%s split: %d window(s) skipped because of unreadable frames", role, count)

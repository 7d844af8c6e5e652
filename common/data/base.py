"""The LightningDataModule every domain datamodule extends: split bookkeeping and DataLoader construction.

Subclasses only say how to build a split's Dataset (and optionally set ``collate_fn``). Under DDP the training
loader gets a DistributedSampler of its own (order and worker seeds a function of seed, epoch and rank, so a resumed
run reproduces the uninterrupted one); evaluation loaders are sharded by Lightning. Nothing here knows about files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence, Sized
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

log = logging.getLogger(__name__)

# Dataset roles each Lightning stage needs; ``None`` (setup for everything) takes all of them.
STAGE_SPLITS: dict[str, tuple[str, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
}
ALL_SPLITS = ("train", "val", "test")


class EpochSeededRandomSampler(RandomSampler):
    """A RandomSampler whose order is a function of ``(seed, epoch)`` only, like DistributedSampler's.

    Lightning calls ``set_epoch`` at every epoch start, so a run resumed at epoch ``k`` sees the same order as
    an uninterrupted one. Being a RandomSampler, Lightning still recognises it as shuffled under DDP.
    """

    def __init__(self, data_source: Sized, seed: int) -> None:
        super().__init__(data_source, generator=torch.Generator())
        self.seed = seed
        # The DataLoader draws its workers' base seed from this generator at every iter(); reseeding it per
        # epoch too keeps the global RNG untouched and worker seeds a function of (seed, epoch).
        self.loader_generator = torch.Generator()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)
        self.loader_generator.manual_seed(worker_base_seed(self.seed, epoch, rank=0))


class EpochSeededDistributedSampler(DistributedSampler):
    """Under DDP: torch's DistributedSampler (each rank a shard of an order that is a function of ``(seed, epoch)``)
    that also reseeds the loader's worker-seed generator per ``(seed, epoch, rank)``.

    Lightning keeps a DistributedSampler it is given and calls its ``set_epoch``; a RandomSampler it would replace by
    its own, whose ``set_epoch`` never reaches the worker seeds: the workers of a resumed run would then be seeded
    unlike the uninterrupted run's, and every rank's workers alike (the same augmentation draws on every rank).
    """

    def __init__(self, data_source: Sized, seed: int, num_replicas: int, rank: int) -> None:
        # drop_last False, as in the sampler Lightning would build: the last shard is padded by repeating samples.
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.loader_generator = torch.Generator()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.loader_generator.manual_seed(worker_base_seed(self.seed, epoch, self.rank))


class EpochSeededWeightedSampler(EpochSeededDistributedSampler):
    """Draws ``num_samples`` indices per epoch with replacement, index ``i`` with probability proportional to
    ``weights[i]`` (e.g. several datasets mixed by weight), as a function of ``(seed, epoch)``; each of
    ``num_replicas`` ranks takes every ``num_replicas``-th draw. Seeded like ``EpochSeededDistributedSampler`` (whose
    ``set_epoch`` also reseeds the workers per ``(seed, epoch, rank)``; Lightning keeps it under DDP)."""

    def __init__(self, weights: Sequence[float] | torch.Tensor, num_samples: int, seed: int, num_replicas: int = 1,
                 rank: int = 0) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        if self.weights.ndim != 1 or not len(self.weights) or (self.weights < 0).any() or self.weights.sum() <= 0:
            raise ValueError("EpochSeededWeightedSampler: weights must be a non-empty 1-d array of values >= 0 with "
                             "a positive sum")
        super().__init__(range(len(self.weights)), seed, num_replicas, rank)
        self.num_samples = -(-num_samples // num_replicas)  # per rank; every rank draws the same count
        self.total_size = self.num_samples * num_replicas

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        draws = torch.multinomial(self.weights, self.total_size, replacement=True, generator=g)
        return iter(draws[self.rank:self.total_size:self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


def worker_base_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the generator the DataLoader draws its workers' base seed from, per (seed, epoch, rank)."""
    return seed + epoch + 1_000_003 * (1 + rank)


class BaseDataModule(L.LightningDataModule):
    """Builds ``self.datasets[role]`` per stage and wraps them in DataLoaders.

    Subclasses implement :meth:`build_dataset` and may set ``collate_fn`` (a picklable callable such as
    :class:`common.data.collate.CheckedCollate`, or a method; a plain function set as a class attribute
    would be bound as a method, so set it on the instance). ``batch_size`` is per rank unless
    ``batch_size_is_global``; then it is divided by the world size. ``seed`` (default: the seed given to
    ``seed_everything``) fixes the training order per epoch; ``test_split`` names the split used by
    ``trainer.test`` / ``trainer.predict`` (no test data when ``None``), ``train_split`` the one ``trainer.fit``
    trains on.
    """

    collate_fn: Callable[[list[Any]], Any] | None = None

    def __init__(
        self,
        batch_size: int,
        num_workers: int = 0,
        persistent_workers: bool = True,
        pin_memory: bool | None = None,
        batch_size_is_global: bool = False,
        drop_last_train: bool = True,
        seed: int | None = None,
        test_split: str | None = None,
        train_split: str = "train",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.persistent_workers = persistent_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.batch_size_is_global = batch_size_is_global
        self.drop_last_train = drop_last_train
        self.seed = seed
        self.test_split = test_split
        self.train_split = train_split
        self.datasets: dict[str, Dataset] = {}

    def build_dataset(self, split: str) -> Dataset:
        """Return the Dataset for ``split`` (the configured ``train_split``, "val", or ``test_split``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_dataset(split)")

    def split_of(self, role: str) -> str | None:
        """The split that serves ``role`` ("train": ``train_split``, "test": ``test_split``, else the role)."""
        return {"train": self.train_split, "test": self.test_split}.get(role, role)

    def has_split(self, role: str) -> bool:
        """Whether this datamodule has data for ``role`` ("train", "val" or "test")."""
        return role in ("train", "val") or (role == "test" and self.test_split is not None)

    def setup(self, stage: str | None = None) -> None:
        roles = ALL_SPLITS if stage is None else STAGE_SPLITS[stage]
        for role in roles:
            if role in self.datasets or not self.has_split(role):
                continue
            split = self.split_of(role)
            self.datasets[role] = self.build_dataset(split)
            size = len(self.datasets[role]) if isinstance(self.datasets[role], Sized) else "?"
            log.info("%s: %s split %r has %s samples", type(self).__name__, role, split, size)

    @property
    def per_rank_batch_size(self) -> int:
        if not self.batch_size_is_global:
            return self.batch_size
        world_size = self.trainer.world_size if self.trainer is not None else 1
        if self.batch_size % world_size:
            raise ValueError(
                f"global batch_size {self.batch_size} is not divisible by world size {world_size}"
            )
        return self.batch_size // world_size

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train")
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        # No `shuffle=` argument: Lightning reads it back when it re-creates a loader, and an explicit False
        # would turn off a DistributedSampler's shuffling.
        return self._loader(dataset, sampler=self.train_sampler(dataset, seed, self._distributed_shard()),
                            drop_last=self.drop_last_train)

    def train_sampler(self, dataset: Dataset, seed: int, shard: dict[str, int] | None) -> Sampler:
        """The training order: a function of (seed, epoch), and of the rank under DDP (``shard``: ``{num_replicas,
        rank}``). A subclass may draw another way (e.g. weighted); its sampler must have ``set_epoch`` and a
        ``loader_generator`` reseeded there (the workers' seeds), and be a DistributedSampler under DDP."""
        if shard is None:
            return EpochSeededRandomSampler(dataset, seed)
        return EpochSeededDistributedSampler(dataset, seed, **shard)

    def _distributed_shard(self) -> dict[str, int] | None:
        """``{num_replicas, rank}`` when the trainer shards the training data over several processes, else None."""
        trainer = self.trainer
        kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
        connector = getattr(trainer, "_accelerator_connector", None)
        if not kwargs or kwargs.get("num_replicas", 1) <= 1 or not getattr(connector, "use_distributed_sampler", True):
            return None
        return {"num_replicas": int(kwargs["num_replicas"]), "rank": int(kwargs["rank"])}

    def val_dataloader(self) -> DataLoader | list:
        if not self.has_split("val"):
            return []  # Lightning then skips validation (with a warning)
        return self._loader(self._dataset("val"), sampler=None, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test"), sampler=None, drop_last=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def _dataset(self, role: str) -> Dataset:
        if role not in self.datasets:
            if not self.has_split(role):
                raise RuntimeError(
                    f"{type(self).__name__} has no {role!r} split (looked for {self.split_of(role)!r}; see "
                    "has_split, train_split, test_split)"
                )
            raise RuntimeError(f"{type(self).__name__}: {role!r} dataset requested before setup() built it")
        return self.datasets[role]

    def _loader(self, dataset: Dataset, sampler: Sampler | None, drop_last: bool) -> DataLoader:
        training = hasattr(sampler, "loader_generator")
        if training:
            generator = sampler.loader_generator
        else:  # evaluation loaders: fixed worker seeds, and no draw from the global RNG
            generator = torch.Generator().manual_seed(self.seed if self.seed is not None else 0)
        return DataLoader(
            dataset,
            generator=generator,
            batch_size=self.per_rank_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            # Training workers are never persistent: a persistent worker carries its random stream (augmentation)
            # from one epoch into the next, which a run resumed at an epoch boundary cannot reproduce (its
            # workers start fresh); new workers per epoch are seeded from (seed, epoch) by the sampler.
            persistent_workers=self.persistent_workers and self.num_workers > 0 and not training,
            pin_memory=self.pin_memory,
            drop_last=drop_last,
            collate_fn=self.collate_for(dataset),
        )

    def collate_for(self, dataset: Dataset) -> Callable[[list[Any]], Any] | None:
        """The collate function of ``dataset``'s loader (default: ``collate_fn``)."""
        return self.collate_fn

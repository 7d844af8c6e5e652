"""Shared data pieces: checked collation (errors name field, index, shapes) and BaseDataModule's loaders
(per-stage splits, per-rank batch size, shuffling only train, epoch order reproducible across resume)."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.fabric.utilities.data import _replace_dunder_methods
from lightning.pytorch.utilities.data import _is_dataloader_shuffled
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from common.data.base import BaseDataModule, EpochSeededRandomSampler
from common.data.collate import CheckedCollate, collate_checked
from common.shapes import ShapeError


def _sample(i: int, t: int = 3) -> dict:
    rng = np.random.default_rng(i)
    return {
        "pose": torch.from_numpy(rng.standard_normal((t, 2)).astype(np.float32)),
        "audio": rng.standard_normal(4).astype(np.float32),
        "label": i,
        "weight": 0.5 * i,
        "valid": i % 2 == 0,
        "name": f"clip_{i}",
    }


# ---------------------------------------------------------------- collate


def test_collate_stacks_fields_by_kind():
    samples = [_sample(i) for i in range(3)]
    batch = collate_checked(samples)
    assert torch.equal(batch["pose"], torch.from_numpy(np.stack([s["pose"].numpy() for s in samples])))
    assert isinstance(batch["audio"], torch.Tensor) and batch["audio"].dtype == torch.float32
    np.testing.assert_array_equal(batch["audio"].numpy(), np.stack([s["audio"] for s in samples]))
    assert batch["label"].dtype == torch.int64 and batch["label"].tolist() == [0, 1, 2]
    assert batch["weight"].dtype == torch.float32 and batch["weight"].tolist() == [0.0, 0.5, 1.0]
    assert batch["valid"].dtype == torch.bool and batch["valid"].tolist() == [True, False, True]
    assert batch["name"] == ["clip_0", "clip_1", "clip_2"]


def test_collate_does_not_share_memory_with_inputs():
    samples = [_sample(i) for i in range(2)]
    batch = collate_checked(samples)
    batch["pose"].zero_()
    assert samples[0]["pose"].abs().sum() > 0


def test_collate_shape_mismatch_names_field_index_and_shapes():
    samples = [_sample(0), _sample(1), _sample(2, t=5)]
    with pytest.raises(
        ShapeError, match=r"'pose', sample 2: shape \(5, 2\) differs from sample 0 shape \(3, 2\)"
    ):
        collate_checked(samples)


def test_collate_missing_key_names_sample_and_key():
    samples = [_sample(0), _sample(1)]
    del samples[1]["audio"]
    with pytest.raises(ValueError, match=r"sample 1 .*missing \['audio'\]"):
        collate_checked(samples)


def test_collate_spec_wildcard_passes_and_violation_names_field():
    samples = [_sample(i) for i in range(2)]
    batch = collate_checked(samples, {"pose": (None, 2), "audio": (4,), "label": ()})
    assert batch["pose"].shape == (2, 3, 2)
    with pytest.raises(
        ShapeError, match=r"'pose', sample 0: expected per-sample shape \(\*, 3\), got \(3, 2\)"
    ):
        collate_checked(samples, {"pose": (None, 3)})
    with pytest.raises(ValueError, match="'beats'"):
        collate_checked(samples, {"beats": (4,)})


def test_collate_dtype_and_kind_mismatch_are_errors():
    samples = [_sample(0), _sample(1)]
    samples[1]["audio"] = samples[1]["audio"].astype(np.float64)
    with pytest.raises(TypeError, match=r"'audio', sample 1: dtype torch.float64"):
        collate_checked(samples)
    samples = [_sample(0), _sample(1)]
    samples[1]["label"] = "one"
    with pytest.raises(TypeError, match=r"'label', sample 1"):
        collate_checked(samples)


def test_checked_collate_pickles_with_its_spec():
    collate = CheckedCollate({"pose": [None, 2]})
    restored = pickle.loads(pickle.dumps(collate))
    assert restored.spec == {"pose": (None, 2)}
    with pytest.raises(ShapeError):
        restored([_sample(0), _sample(1, t=4)])


class _Samples(Dataset):
    def __init__(self, n: int, bad_index: int | None = None) -> None:
        self.n, self.bad_index = n, bad_index

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        sample = _sample(i, t=7 if i == self.bad_index else 3)
        sample["index"] = i
        return sample


def test_checked_collate_in_dataloader_with_workers():
    dataset = _Samples(6)
    loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=CheckedCollate({"pose": (3, 2)}))
    batches = list(loader)
    expected = collate_checked([dataset[i] for i in range(6)])
    assert torch.equal(torch.cat([b["pose"] for b in batches]), expected["pose"])
    assert sum((b["name"] for b in batches), []) == expected["name"]

    bad = DataLoader(_Samples(4, bad_index=2), batch_size=4, num_workers=2, collate_fn=CheckedCollate())
    with pytest.raises(ShapeError, match="'pose', sample 2"):
        list(bad)


# ---------------------------------------------------------------- datamodule


class ToyDataModule(BaseDataModule):
    def __init__(self, sizes: dict[str, int] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sizes = sizes or {"train": 10, "val": 4, "test": 3}
        self.built: list[str] = []
        self.collate_fn = CheckedCollate({"pose": (3, 2)})

    def build_dataset(self, split: str) -> Dataset:
        self.built.append(split)
        return _Samples(self.sizes[split])


def test_setup_builds_only_the_stage_splits_once():
    dm = ToyDataModule(batch_size=2)
    dm.setup("fit")
    dm.setup("fit")
    assert dm.built == ["train", "val"]
    dm.setup("test")  # no test_split configured: nothing to build
    assert "test" not in dm.datasets and not dm.has_split("test")
    with pytest.raises(RuntimeError, match="no 'test' split"):
        dm.test_dataloader()

    dm_test = ToyDataModule(batch_size=2, test_split="val")
    dm_test.setup("predict")
    assert dm_test.built == ["val"] and len(dm_test.datasets["test"]) == 4


def test_loaders_shuffle_only_train_and_set_worker_options():
    dm = ToyDataModule(batch_size=4, drop_last_train=True)
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert isinstance(train.sampler, EpochSeededRandomSampler)
    assert isinstance(val.sampler, SequentialSampler)
    assert len(train) == 10 // 4 and len(val) == 1  # drop_last only on train
    assert train.persistent_workers is False  # num_workers=0: persistent workers would be an error
    assert train.pin_memory == torch.cuda.is_available()
    assert list(next(iter(val))["index"]) == [0, 1, 2, 3]


def test_train_loader_is_seen_as_shuffled_by_lightning_distributed_sampler_logic():
    # Lightning decides DistributedSampler(shuffle=...) from the loader's saved init args: an explicit
    # shuffle=False next to a custom sampler would silently turn DDP shuffling off.
    dm = ToyDataModule(batch_size=2)
    dm.setup("fit")
    with _replace_dunder_methods(DataLoader, "dataset"):
        train, val = dm.train_dataloader(), dm.val_dataloader()
    assert _is_dataloader_shuffled(train) and not _is_dataloader_shuffled(val)


def test_global_batch_size_is_divided_by_world_size():
    dm = ToyDataModule(batch_size=8, batch_size_is_global=True)
    dm.trainer = SimpleNamespace(world_size=4)
    assert dm.per_rank_batch_size == 2
    dm.trainer = SimpleNamespace(world_size=3)
    with pytest.raises(ValueError, match="8 is not divisible by world size 3"):
        _ = dm.per_rank_batch_size
    assert ToyDataModule(batch_size=8).per_rank_batch_size == 8


def test_epoch_order_depends_only_on_seed_and_epoch():
    def order(epoch: int, seed: int = 3) -> list[int]:
        sampler = EpochSeededRandomSampler(range(12), seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(2) == order(2)
    assert sorted(order(2)) == list(range(12))
    assert order(1) != order(2) and order(2, seed=4) != order(2)


class _RecordingModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.seen: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).extend(batch["index"].tolist())
        return self.layer(batch["pose"]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(tmp_path, max_epochs: int, ckpt_path=None) -> tuple[_RecordingModule, L.Trainer]:
    module = _RecordingModule()
    trainer = L.Trainer(
        max_epochs=max_epochs,
        enable_progress_bar=False,
        logger=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=ToyDataModule(batch_size=3, seed=7), ckpt_path=ckpt_path)
    return module, trainer


def test_resumed_run_sees_the_same_epoch_order_as_an_uninterrupted_one(tmp_path):
    uninterrupted, _ = _fit(tmp_path, max_epochs=2)
    assert uninterrupted.seen[0] != uninterrupted.seen[1]

    first, trainer = _fit(tmp_path, max_epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch0.ckpt")
    resumed, _ = _fit(tmp_path, max_epochs=2, ckpt_path=tmp_path / "epoch0.ckpt")
    assert first.seen[0] == uninterrupted.seen[0]
    assert list(resumed.seen) == [1] and resumed.seen[1] == uninterrupted.seen[1]


def test_missing_val_split_skips_validation(tmp_path):
    class NoVal(ToyDataModule):
        def has_split(self, role: str) -> bool:
            return role == "train"

    dm = NoVal(batch_size=5)
    dm.setup("fit")
    assert dm.built == ["train"] and dm.val_dataloader() == []


class _WorkerSeeds(Dataset):
    """Each item: its index and the torch seed of the process that made it (a worker's: base seed + worker id)."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "seed": torch.initial_seed()}


class _SeedModule(BaseDataModule):
    def build_dataset(self, split: str) -> Dataset:
        return _WorkerSeeds()


def _ddp_datamodule(rank: int, world: int = 2) -> _SeedModule:
    dm = _SeedModule(batch_size=2, num_workers=2, seed=5)
    dm.trainer = SimpleNamespace(world_size=world, distributed_sampler_kwargs={"num_replicas": world, "rank": rank},
                                 _accelerator_connector=SimpleNamespace(use_distributed_sampler=True))
    dm.setup("fit")
    return dm


def _epoch(loader: DataLoader, epoch: int) -> tuple[list[int], list[int]]:
    loader.sampler.set_epoch(epoch)  # what Lightning does at every epoch start
    batches = list(loader)
    return sum((b["index"].tolist() for b in batches), []), sum((b["seed"].tolist() for b in batches), [])


def test_ddp_shards_and_worker_seeds_are_functions_of_seed_epoch_and_rank():
    """Under DDP the training sampler is a DistributedSampler of our own (Lightning keeps it and calls its set_epoch):
    each rank reads torch's shard for (seed, epoch), and its workers' seeds depend on (seed, epoch, rank) only, so
    a run resumed at epoch 2 seeds its workers (its augmentation) as the uninterrupted run did, and the two ranks'
    workers draw different augmentations."""
    from torch.utils.data import DistributedSampler

    loaders = [_ddp_datamodule(rank).train_dataloader() for rank in (0, 1)]
    assert all(isinstance(loader.sampler, DistributedSampler) for loader in loaders)
    uninterrupted = [[_epoch(loader, e) for e in range(3)] for loader in loaders]
    for rank in (0, 1):
        reference = DistributedSampler(range(12), num_replicas=2, rank=rank, shuffle=True, seed=5)
        for e in range(3):
            reference.set_epoch(e)
            assert uninterrupted[rank][e][0] == list(reference)
    assert sorted(uninterrupted[0][1][0] + uninterrupted[1][1][0]) == list(range(12))
    assert uninterrupted[0][1][0] != uninterrupted[0][2][0]

    resumed = _epoch(_ddp_datamodule(1).train_dataloader(), 2)  # a fresh process resumed at epoch 2
    assert resumed == uninterrupted[1][2]
    seeds = [{rank: set(uninterrupted[rank][e][1]) for rank in (0, 1)} for e in range(3)]
    assert all(not (s[0] & s[1]) for s in seeds), "the ranks' workers share seeds"
    assert seeds[1][1] != seeds[2][1]

    single = _SeedModule(batch_size=2, seed=5)
    single.setup("fit")
    assert isinstance(single.train_dataloader().sampler, EpochSeededRandomSampler)  # one process: unchanged


def test_data_clis_keep_existing_output_and_overwrite_rebuilds(tmp_path):
    """The data CLIs share their flags: `--out`, `--seed`, existing output kept (a second run is a no-op), and
    `--overwrite` regenerates it."""
    from gesture.data import synthetic as gesture_synthetic
    from handpose.data import synthetic as hand_synthetic

    clis = {
        "hand": (hand_synthetic.main, ["--num-seqs", "3", "--train-seqs", "0", "--min-frames", "2", "--max-frames", "2",
                                       "--image-size", "32", "--workers", "1"], "splits.json"),
        "gesture": (gesture_synthetic.main, ["--num-speakers", "1", "--clips-per-speaker", "2", "--seconds", "2",
                                             "--unknown-clips", "0"], "train_test_split.csv"),
    }
    for name, (main, args, marker) in clis.items():
        out = tmp_path / name
        main(["--out", str(out), "--seed", "1", *args])
        first = (out / marker).stat().st_mtime_ns
        (out / "mine.txt").write_text("kept")
        main(["--out", str(out), "--seed", "1", *args])
        assert (out / marker).stat().st_mtime_ns == first and (out / "mine.txt").is_file(), name
        main(["--out", str(out), "--seed", "1", *args, "--overwrite"])
        assert (out / marker).is_file() and not (out / "mine.txt").exists(), name

"""`data=hand_mix`: several converted datasets in one run, each training sample drawn from a dataset with its
weight's share; the draw is a function of (seed, epoch), sharded under DDP; val / test concatenate the datasets'."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from common.data.base import EpochSeededWeightedSampler
from handpose.data.mix import HandMixDataModule, MixedWindows
from handpose.data.synthetic import SyntheticConfig, generate_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("mix")
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        cfg = SyntheticConfig(seed=seed, num_seqs=3, image_size=64, min_frames=6, max_frames=6, train_seqs=None)
        out[name] = generate_dataset(base / name, cfg, workers=1)
    return out


def _module(roots, **kwargs) -> HandMixDataModule:
    dm = HandMixDataModule({"a": {"root": roots["a"], "weight": 3.0}, "b": {"root": roots["b"], "weight": 1.0}},
                           batch_size=4, num_workers=0, img_size=32, seed=7, **kwargs)
    dm.setup("fit")
    return dm


def test_training_draws_follow_the_weights_and_are_a_function_of_seed_and_epoch(roots):
    dm = _module(roots, epoch_samples=4000)
    train = dm.datasets["train"]
    assert isinstance(train, MixedWindows) and train.names == ["a", "b"]
    n_a = len(train.datasets[0])
    sampler = dm.train_dataloader().sampler
    assert isinstance(sampler, EpochSeededWeightedSampler) and len(sampler) == 4000
    draws = list(sampler)
    share_a = sum(i < n_a for i in draws) / len(draws)
    assert abs(share_a - 0.75) < 0.03, share_a  # weight 3 : 1, whatever the datasets' sizes
    assert list(_module(roots, epoch_samples=4000).train_dataloader().sampler) == draws  # a resumed run
    sampler.set_epoch(1)
    assert list(sampler) != draws
    batch = next(iter(dm.train_dataloader()))
    assert batch["img"].shape == (4, 1, 3, 32, 32)


def test_ddp_ranks_split_one_draw_and_evaluation_concatenates(roots):
    dm = _module(roots, epoch_samples=10)
    weights = dm.datasets["train"].sample_weights()
    one = list(EpochSeededWeightedSampler(weights, 10, seed=7))
    ranks = [list(EpochSeededWeightedSampler(weights, 10, seed=7, num_replicas=2, rank=r)) for r in (0, 1)]
    assert [x for pair in zip(*ranks) for x in pair] == one
    dm.setup("validate")
    val = dm.datasets["val"]
    assert len(val) == sum(len(d) for d in val.datasets) and val.names == ["a", "b"]
    assert dm.splits()["train"][0].startswith("a/")
    with pytest.raises(ValueError, match="weight"):
        HandMixDataModule({"a": {"root": roots["a"], "weight": 0}}, batch_size=2)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        HandMixDataModule({"a": {"root": roots["a"].parent / "nowhere"}}, batch_size=2).prepare_data()


def test_hand_mix_config_instantiates_with_any_sources(roots, tmp_path):
    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=stage1", "data=hand_mix", f"+data.sources.a.root={roots['a']}",
                                          f"+data.sources.b.root={roots['b']}", "data.sources.freihand=null",
                                          "data.sources.ho3d=null", "data.sources.dexycb=null",
                                          "data.batch_size=2", "data.num_workers=0"])
    dm = instantiate(cfg.data)
    assert isinstance(dm, HandMixDataModule) and list(dm.sources) == ["a", "b"]
    assert dm.img_size == cfg.model.net.backbone.img_size
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.datasets["train"]) > 0 and torch.is_tensor(next(iter(dm.train_dataloader()))["img"])


@pytest.mark.parametrize("data", ["freihand", "ho3d", "dexycb", "hand_mix"])
@pytest.mark.parametrize("experiment", ["stage1-dino_large", "stage2-dino_large"])
def test_paper_recipes_point_at_any_real_dataset_with_one_override(tmp_path, experiment, data):
    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", f"data={data}", f"paths.data_dir={tmp_path}"])
    assert cfg.data.img_size == 224 and cfg.data.num_frame == (1 if experiment.startswith("stage1") else 7)
    assert cfg.data.mano_model_path is None and cfg.data.generate_if_missing is False  # the MANO files: required
    roots = [s.root for s in cfg.data.sources.values()] if data == "hand_mix" else [cfg.data.root]
    assert all(str(r).startswith(str(tmp_path)) for r in roots)

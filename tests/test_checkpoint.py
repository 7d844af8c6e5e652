"""Checkpoint reading and loading: every format round-trips bitwise, wrappers and prefixes are mapped away,
mismatches are reported and never loaded, strict mode refuses before touching the module."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.checkpoint import LoadReport, load_weights, read_state_dict


class Net(nn.Module):
    def __init__(self, head_out: int = 3) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        self.head = nn.Linear(8, head_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, 4] -> y [b, head_out]"""
        return self.head(self.backbone(x))


class LitNet(L.LightningModule):
    def __init__(self, cfg=None, lr: float = 0.5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = Net()

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def _source_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A Net state dict with random values everywhere (buffers included), so nothing equals a fresh init."""
    gen = torch.Generator().manual_seed(seed)
    state = Net().state_dict()
    return {
        k: torch.randint(0, 100, v.shape, generator=gen)
        if not v.is_floating_point()
        else torch.randn(v.shape, generator=gen)
        for k, v in state.items()
    }


def _assert_bitwise_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


def _write_safetensors(state, tmp: Path) -> Path:
    save_file(state, tmp / "w.safetensors")
    return tmp / "w.safetensors"


def _write_pt(state, tmp: Path) -> Path:
    torch.save(state, tmp / "w.pt")
    return tmp / "w.pt"


def _write_pth_model_wrapped(state, tmp: Path) -> Path:
    torch.save({"model": state, "epoch": 3, "optimizer": {"lr": 0.1}}, tmp / "w.pth")
    return tmp / "w.pth"


def _write_bin_state_dict_wrapped(state, tmp: Path) -> Path:
    torch.save({"state_dict": state}, tmp / "w.bin")
    return tmp / "w.bin"


def _write_lightning_like_ckpt(state, tmp: Path) -> Path:
    ckpt = {
        "epoch": 1,
        "global_step": 7,
        "state_dict": {f"net.{k}": v for k, v in state.items()},
        "optimizer_states": [],
        "hyper_parameters": {"lr": 0.1},
    }
    torch.save(ckpt, tmp / "w.ckpt")
    return tmp / "w.ckpt"


def _write_accelerate_safetensors(state, tmp: Path) -> Path:
    (tmp / "acc").mkdir()
    save_file(state, tmp / "acc" / "model.safetensors")
    return tmp / "acc"


def _write_accelerate_bin(state, tmp: Path) -> Path:
    (tmp / "acc").mkdir()
    torch.save(state, tmp / "acc" / "pytorch_model.bin")
    return tmp / "acc"


def _write_sharded(state, tmp: Path) -> Path:
    (tmp / "sharded").mkdir()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, tmp / "sharded" / name)
        weight_map.update({k: name for k in shard_keys})
    (tmp / "sharded" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tmp / "sharded"


WRITERS = [
    _write_safetensors,
    _write_pt,
    _write_pth_model_wrapped,
    _write_bin_state_dict_wrapped,
    _write_accelerate_safetensors,
    _write_accelerate_bin,
    _write_sharded,
]


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.__name__.removeprefix("_write_"))
def test_every_format_reads_and_loads_bitwise(writer, tmp_path):
    source = _source_state()
    path = writer(source, tmp_path)
    _assert_bitwise_equal(read_state_dict(path), source)

    net = Net()
    report = load_weights(net, path, strict=True)
    assert (
        sorted(report.loaded) == sorted(source)
        and report.missing == report.unexpected == report.mismatched == []
    )
    _assert_bitwise_equal(net.state_dict(), source)


def test_hand_written_lightning_ckpt_loads_into_bare_net_with_prefix_map(tmp_path):
    source = _source_state()
    path = _write_lightning_like_ckpt(source, tmp_path)
    assert sorted(read_state_dict(path)) == sorted(f"net.{k}" for k in source)
    net = Net()
    load_weights(net, path, prefix_map={"net.": ""}, strict=True)
    _assert_bitwise_equal(net.state_dict(), source)


def test_checkpoint_from_real_trainer_fit_loads(tmp_path, caplog):
    torch.manual_seed(0)
    lit = LitNet(cfg=OmegaConf.create({"model": {"width": 8}}))  # DictConfig hparams need the pickle fallback
    trainer = L.Trainer(
        max_steps=1,
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    before = {k: v.clone() for k, v in lit.net.state_dict().items()}
    trainer.fit(lit, DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    trained = lit.net.state_dict()
    assert not torch.equal(trained["head.weight"], before["head.weight"])  # the step changed something

    with caplog.at_level(logging.WARNING, logger="common.checkpoint"):
        net = Net()
        report = load_weights(net, tmp_path / "last.ckpt", prefix_map={"net.": ""}, strict=True)
    assert "weights_only=False" in caplog.text
    assert report.missing == report.unexpected == report.mismatched == []
    _assert_bitwise_equal(net.state_dict(), trained)

    lit_again = LitNet()
    load_weights(lit_again, tmp_path / "last.ckpt", strict=True)  # the LightningModule itself, no mapping
    _assert_bitwise_equal(lit_again.net.state_dict(), trained)

    with pytest.raises(ValueError, match="allow_pickle=False"):
        read_state_dict(tmp_path / "last.ckpt", allow_pickle=False)


def test_ddp_module_prefix_is_stripped(tmp_path):
    source = _source_state()
    torch.save({f"module.{k}": v for k, v in source.items()}, tmp_path / "ddp.pt")
    net = Net()
    load_weights(net, tmp_path / "ddp.pt", strict=True)
    _assert_bitwise_equal(net.state_dict(), source)


def test_compiled_checkpoint_loads_into_plain_module_and_back(tmp_path):
    source_net = Net()
    source_net.load_state_dict(_source_state())
    compiled = torch.compile(source_net)  # lazy: nothing is compiled until the first call
    compiled_state = compiled.state_dict()
    assert all(k.startswith("_orig_mod.") for k in compiled_state)
    torch.save(compiled_state, tmp_path / "compiled.pt")

    plain = Net()
    load_weights(plain, tmp_path / "compiled.pt", strict=True)
    _assert_bitwise_equal(plain.state_dict(), source_net.state_dict())

    torch.save(source_net.state_dict(), tmp_path / "plain.pt")
    target = torch.compile(Net())
    load_weights(target, tmp_path / "plain.pt", strict=True)
    _assert_bitwise_equal(target.state_dict(), compiled_state)


def test_compiled_submodule_inside_ddp_lightning_keys(tmp_path):
    holder = nn.Module()
    holder.net = torch.compile(Net())
    holder.net.load_state_dict({f"_orig_mod.{k}": v for k, v in _source_state().items()})
    state = {f"module.{k}": v for k, v in holder.state_dict().items()}
    assert "module.net._orig_mod.backbone.0.weight" in state
    torch.save({"state_dict": state}, tmp_path / "nested.ckpt")

    net = Net()
    load_weights(net, tmp_path / "nested.ckpt", prefix_map={"net.": ""}, strict=True)
    _assert_bitwise_equal(net.state_dict(), _source_state())


def test_prefix_map_longest_prefix_wins_and_unmatched_keys_are_unexpected(tmp_path):
    source = _source_state()
    state = {f"model.net.{k}": v for k, v in source.items()} | {"ema.head.weight": torch.zeros(3, 8)}
    torch.save(state, tmp_path / "w.pt")
    net = Net()
    report = load_weights(net, tmp_path / "w.pt", prefix_map={"model.": "x.", "model.net.": ""})
    assert report.unexpected == ["ema.head.weight"]
    assert report.missing == [] and sorted(report.loaded) == sorted(source)
    _assert_bitwise_equal(net.state_dict(), source)


def test_shape_mismatch_is_reported_and_not_loaded(tmp_path, caplog):
    source = _source_state()
    save_file(source, tmp_path / "w.safetensors")
    net = Net(head_out=5)
    head_before = {k: v.clone() for k, v in net.head.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="common.checkpoint"):
        report = load_weights(net, tmp_path / "w.safetensors")

    assert sorted(report.mismatched) == [("head.bias", (3,), (5,)), ("head.weight", (3, 8), (5, 8))]
    assert report.missing == [] and report.unexpected == []
    assert not any(k.startswith("head.") for k in report.loaded)
    _assert_bitwise_equal(net.head.state_dict(), head_before)
    _assert_bitwise_equal(
        net.backbone.state_dict(),
        {k[len("backbone.") :]: v for k, v in source.items() if k.startswith("backbone.")},
    )
    record = next(r for r in caplog.records if r.name == "common.checkpoint")
    assert record.levelno == logging.WARNING and "2 shape-mismatched" in record.getMessage()


def test_clean_load_logs_at_info(tmp_path, caplog):
    save_file(_source_state(), tmp_path / "w.safetensors")
    with caplog.at_level(logging.INFO, logger="common.checkpoint"):
        load_weights(Net(), tmp_path / "w.safetensors")
    levels = {r.levelno for r in caplog.records if r.name == "common.checkpoint"}
    assert levels == {logging.INFO}


def test_strict_raises_listing_keys_and_leaves_module_untouched(tmp_path):
    source = _source_state()
    state = {k: v for k, v in source.items() if k != "backbone.1.running_var"} | {"extra.w": torch.ones(2)}
    save_file(state, tmp_path / "w.safetensors")
    net = Net(head_out=5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(RuntimeError) as err:
        load_weights(net, tmp_path / "w.safetensors", strict=True)
    message = str(err.value)
    for key in ("backbone.1.running_var", "extra.w", "head.weight", "(3, 8)", "(5, 8)", "w.safetensors"):
        assert key in message
    _assert_bitwise_equal(net.state_dict(), before)


def test_include_glob_limits_loading_and_reporting(tmp_path):
    source = _source_state()
    save_file(source, tmp_path / "w.safetensors")
    net = Net()
    head_before = {k: v.clone() for k, v in net.head.state_dict().items()}
    report = load_weights(net, tmp_path / "w.safetensors", include="backbone.*", strict=True)
    assert sorted(report.loaded) == sorted(k for k in source if k.startswith("backbone."))
    assert report.missing == [] and report.unexpected == []
    _assert_bitwise_equal(net.head.state_dict(), head_before)


def test_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        read_state_dict(tmp_path / "nope.ckpt")


def test_unknown_format_names_file_and_lists_formats(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"weights\.npz.*safetensors"):
        read_state_dict(tmp_path / "weights.npz")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(ValueError, match=r"empty_run.*model\.safetensors"):
        read_state_dict(tmp_path / "empty_run")


def test_non_tensor_payload_is_rejected_with_key(tmp_path):
    torch.save({"weight": torch.ones(2), "step": 5}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"odd\.pt.*'step'"):
        read_state_dict(tmp_path / "odd.pt")


def test_summary_counts():
    report = LoadReport(loaded=["a", "b"], missing=["c"], unexpected=[], mismatched=[("d", (1,), (2,))])
    text = report.summary()
    assert "loaded 2" in text and "1 missing [c]" in text and "0 unexpected" in text
    assert "d: ckpt (1,) vs model (2,)" in text


def test_corrupt_files_are_reported_with_their_name(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"broken\.safetensors"):
        read_state_dict(tmp_path / "broken.safetensors")
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"broken\.pt"):
        read_state_dict(tmp_path / "broken.pt")


def test_truncated_torch_checkpoint_is_an_error_naming_the_file(tmp_path):
    """A checkpoint cut short (a run killed while saving): torch's own error names no file."""
    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": Net().state_dict(), "epoch": 3}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"could not read .*cut\.ckpt as a torch file \(truncated or corrupt"):
        read_state_dict(path)
    with pytest.raises(ValueError, match=r"cut\.ckpt"):
        load_weights(Net(), path)

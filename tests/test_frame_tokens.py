"""Stage 2 on precomputed frame tokens (handpose.frame_tokens), the synthetic set's held-out split, the window
average's per-frame reliability score, and where the synthetic occluder lies."""

from __future__ import annotations

import functools
import logging
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_handpose_model import IMG, make_net

from common.data.collate import CheckedCollate
from common.geometry import project
from handpose.data.datamodule import HandDataModule
from handpose.data.dataset import Augment, HandWindowDataset, sample_spec
from handpose.data.format import LEFT, read_sequence, read_splits
from handpose.data.synthetic import SyntheticConfig, generate_dataset
from handpose.frame_tokens import compute_frame_tokens
from handpose.lit import HandPoseLit, warmup_cosine
from handpose.loss import HandPoseLoss
from handpose.models.temporal import TemporalEncoder

# base set of 3 (train [0] -> heldout, val [1], test [2]) + a training split of its own (sequences 3, 4)
TINY = SyntheticConfig(seed=3, num_seqs=3, image_size=128, min_frames=12, max_frames=12, train_seqs=2,
                       train_min_frames=8, train_max_frames=8, heldout=True, occlusion_prob=1.0, invalid_prob=0.1)
SHARED = ("pose", "shape", "trans", "joints", "verts", "joints_2d")  # the loss terms both paths compute


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("tokens") / "tiny", TINY, workers=1)


def _stage2(seed: int = 0):
    return make_net("stage2", seed=seed, kind="cnn", freeze_encoder=True)


def _collate(samples: list[dict], token_dim: int | None = None) -> dict:
    return CheckedCollate(sample_spec(7, IMG, token_dim))(samples)


def _lit(net, **kwargs) -> HandPoseLit:
    return HandPoseLit(net=net, loss=HandPoseLoss(), optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
                       scheduler=functools.partial(warmup_cosine, warmup_steps=1), **kwargs)


def test_heldout_split_is_the_base_sets_own_training_sequences(root):
    splits = read_splits(root)
    assert splits["heldout"] == ["seq_0000"] and splits["train"] == ["seq_0003", "seq_0004"]
    names = [n for names in splits.values() for n in names]
    assert len(names) == len(set(names)) == 5  # disjoint: Stage 1 never sees a held-out sequence
    assert len(read_sequence(root / "seq_0000")) == 12
    assert "heldout" not in replace(TINY, train_seqs=None).split_indices()  # then the base set trains


def test_frame_tokens_are_the_encoders_and_the_loss_is_the_image_paths(root):
    net = _stage2()
    images = HandWindowDataset(root, "heldout", num_frame=7, img_size=IMG, augment=None)
    tokens_ds = HandWindowDataset(root, "heldout", num_frame=7, img_size=IMG, augment=None)
    tokens = compute_frame_tokens(net, tokens_ds, batch_size=5)
    assert [t.shape for t in tokens] == [(12, net.token_dim)] and np.isfinite(tokens[0]).all()
    tokens_ds.use_frame_tokens(tokens)
    assert tokens_ds.token_dim == net.token_dim
    lit = _lit(net).eval()
    for j in (0, len(images) - 1):
        with_images, with_tokens = images[j], tokens_ds[j]
        assert set(with_tokens) == set(with_images) - {"img"} | {"tokens"}
        for key in set(with_images) - {"img"}:
            np.testing.assert_array_equal(with_tokens[key], with_images[key], err_msg=key)
        batch = _collate([with_images])
        with torch.no_grad():
            expected = net.encode_frames(batch["img"], batch["bbox"], batch["focal"], batch["princpt"])[0]
            torch.testing.assert_close(torch.from_numpy(with_tokens["tokens"]), expected, atol=1e-5, rtol=0)
            image_loss = lit._loss(batch)["terms"]
            token_loss = lit._loss(_collate([with_tokens], net.token_dim))["terms"]
        for term in SHARED:
            torch.testing.assert_close(token_loss[term], image_loss[term], atol=1e-5, rtol=1e-5, msg=term)


def test_frame_tokens_need_unaugmented_windows_and_one_row_per_frame(root):
    augmented = HandWindowDataset(root, "heldout", num_frame=7, img_size=IMG, augment=Augment())
    with pytest.raises(ValueError, match="data.augment=null"):
        augmented.use_frame_tokens([np.zeros((12, 8), np.float32)])
    plain = HandWindowDataset(root, "heldout", num_frame=7, img_size=IMG, augment=None)
    with pytest.raises(ValueError, match=r"seq_0000.*\[12, 8\]"):
        plain.use_frame_tokens([np.zeros((11, 8), np.float32)])
    with pytest.raises(ValueError, match="2 token arrays for 1 sequences"):
        plain.use_frame_tokens([np.zeros((12, 8), np.float32)] * 2)


def test_a_frame_without_token_skips_its_windows_and_counts_them(root):
    ds = HandWindowDataset(root, "heldout", num_frame=7, img_size=IMG, augment=None)
    tokens = np.random.default_rng(0).normal(size=(12, 8)).astype(np.float32)
    tokens[11] = np.nan  # the last frame: only the window ending there holds it
    ds.use_frame_tokens([tokens])
    last = len(ds) - 1
    assert ds.index[last][2] == 12
    sample = ds[last]
    assert np.isfinite(sample["tokens"]).all() and sample["frame_index"][-1] != 11
    assert ds.num_skipped == 1


def test_stage2_fits_on_frame_tokens_of_the_heldout_split(root, tmp_path):
    """Through Lightning: tokens are made when fitting starts (before the training loader), only the temporal
    encoder changes, and validation still runs the whole network on images."""
    stage1 = make_net("stage1", seed=1, kind="cnn")
    save_file({k: v.contiguous() for k, v in stage1.state_dict().items()}, tmp_path / "stage1.safetensors")
    datamodule = HandDataModule(root, batch_size=2, num_workers=0, num_frame=7, img_size=IMG, augment=None,
                                train_split="heldout", eval_stride=3)
    net = _stage2(seed=2)
    lit = _lit(net, stage1_weight=str(tmp_path / "stage1.safetensors"), frame_tokens=True)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0)
    trainer.fit(lit, datamodule=datamodule)
    assert datamodule.datasets["train"].split == "heldout"
    assert datamodule.datasets["train"].token_dim == net.token_dim
    after = net.state_dict()
    for key, value in stage1.state_dict().items():  # the frozen per-frame encoder: Stage 1's
        if key.startswith(("backbone.", "keypoint_head.", "decoder.blocks.", "decoder.joint_mlp_net.")):
            torch.testing.assert_close(after[key], value, msg=key)
    assert any(not torch.equal(after[k], v) for k, v in _stage2(seed=2).state_dict().items()
               if k.startswith("temporal."))
    assert torch.isfinite(trainer.callback_metrics["val/pa_mpjpe"])


def test_frame_tokens_are_refused_without_a_frozen_stage2_encoder_or_with_augmentation(root, tmp_path):
    stage1 = make_net("stage1", seed=1, kind="cnn")
    save_file({k: v.contiguous() for k, v in stage1.state_dict().items()}, tmp_path / "stage1.safetensors")
    weight = str(tmp_path / "stage1.safetensors")

    def fit(lit, augment):
        dm = HandDataModule(root, batch_size=2, num_workers=0, num_frame=7, img_size=IMG, augment=augment,
                            train_split="heldout")
        L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path).fit(lit, dm)

    with pytest.raises(ValueError, match="freeze_encoder"):
        fit(_lit(make_net("stage2", kind="cnn"), stage1_weight=weight, frame_tokens=True), None)
    with pytest.raises(ValueError, match="data.augment=null"):
        fit(_lit(_stage2(), stage1_weight=weight, frame_tokens=True), Augment())
    with pytest.raises(ValueError, match="stage1_weight"):
        fit(_lit(_stage2(), frame_tokens=True), None)


class _FixedScore(torch.nn.Module):
    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__()
        self.scores = scores  # [b, t, 1]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.scores


def test_reliability_starts_neutral_then_reweights_the_window_average():
    torch.manual_seed(0)
    enc = TemporalEncoder(dim=8, heads=2, average_tau=0.1, gate_scale=1.0, reliability=4).eval()
    tokens, stamps = torch.randn(3, 5, 8), torch.tensor([0.0, 0.033, 0.1, 0.133, 0.167]).expand(3, 5)
    with torch.no_grad():
        enc.average_gate.fill_(0.7)
        neutral = enc(tokens, stamps)
        scorer, enc.reliability = enc.reliability, None
        torch.testing.assert_close(neutral, enc(tokens, stamps), atol=0, rtol=0)  # zero-initialised: no effect
        assert scorer[-1].weight.abs().sum() == 0
        # a pure weighted average (gate 1, attention path silenced), the last frame scored as unreliable
        enc.average_gate.fill_(1.0)
        enc.out.weight.zero_()
        scores = torch.zeros(3, 5, 1)
        scores[:, -1] = -40.0
        enc.reliability = _FixedScore(scores)
        out = enc(tokens, stamps)
    age = (stamps[:, -1:] - stamps).double()[..., None]  # [b, t, 1]
    logits = -age / torch.exp(enc.log_tau.double()) + scores.double()
    expected = (torch.softmax(logits, dim=1) * tokens.double()).sum(1, keepdim=True)
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=0)
    # the unreliable last frame is out: the result is (almost) the average of the four earlier frames
    earlier = torch.softmax(-age[:, :-1] / torch.exp(enc.log_tau.double()), dim=1)
    torch.testing.assert_close(out.double(), (earlier * tokens[:, :-1].double()).sum(1, keepdim=True), atol=1e-6,
                               rtol=0)


def test_occluder_lies_within_its_offset_and_drift_since_the_occlusion_began(tmp_path, monkeypatch):
    """The occluder's centre is the hand box's centre plus an offset plus a drift per frame since the occlusion's
    first frame (not the sequence's: that put occlusions late in long sequences beside the hand)."""
    import handpose.data.synthetic as synthetic

    cfg = replace(SyntheticConfig(seed=11, num_seqs=4, image_size=128, min_frames=40, max_frames=40,
                                  drop_prob=0.0, invalid_prob=0.0, occlusion_prob=1.0), occluder_drift=0.04)
    calls = []

    def record(image, rng, centre, radius):
        calls.append((np.array(centre), radius))
        return image.copy()

    monkeypatch.setattr(synthetic, "draw_occluder", record)
    worst = 0.0
    for index in range(4):
        calls.clear()
        seq = read_sequence(synthetic.make_sequence(tmp_path, index, cfg))
        occluded = np.asarray(seq["occluded"], bool)
        frames = np.flatnonzero(occluded)
        assert len(calls) == len(frames) > 0
        side = "left" if int(seq["hand_side"][0]) == LEFT else "right"
        layer = synthetic._mano(side)
        with torch.no_grad():
            out = layer(torch.as_tensor(seq["mano_pose"]), torch.as_tensor(seq["mano_shape"]),
                        torch.as_tensor(seq["mano_trans"]))
        uv = project(out.vertices.double().numpy(), seq["focal"][0].astype(np.float64),
                     seq["princpt"][0].astype(np.float64))
        lo, hi = uv.min(1), uv.max(1)
        for (centre, radius), i in zip(calls, frames):
            box = float(np.max(hi[i] - lo[i]))
            offset = np.abs(centre - (lo[i] + hi[i]) / 2) / box
            bound = cfg.occluder_offset + cfg.occluder_drift * (i - frames[0])
            assert (offset <= bound + 1e-3).all(), (index, i, offset, bound)
            assert cfg.occluder_size[0] - 1e-6 <= radius / box <= cfg.occluder_size[1] + 1e-6
            worst = max(worst, float((offset / max(bound, 1e-9)).max()))
    assert worst > 0.3  # the bound is not vacuous


def test_list_valued_synthetic_settings_match_the_set_they_made(tmp_path, caplog):
    synthetic = {"seed": 1, "num_seqs": 3, "image_size": 64, "min_frames": 8, "max_frames": 8,
                 "occluder_size": [0.3, 0.55]}  # as a config file gives it: a list
    dm = HandDataModule(tmp_path / "set", batch_size=2, num_workers=0, img_size=IMG, synthetic=synthetic,
                        generate_if_missing=True)
    dm.prepare_data()
    with caplog.at_level(logging.WARNING):
        dm.prepare_data()
    assert "other settings" not in caplog.text
    changed = HandDataModule(tmp_path / "set", batch_size=2, num_workers=0, img_size=IMG,
                             synthetic={**synthetic, "occluder_size": [0.3, 0.6]}, generate_if_missing=True)
    with caplog.at_level(logging.WARNING):
        changed.prepare_data()
    assert "other settings" in caplog.text and "occluder_size" in caplog.text
    stage2 = HandDataModule(tmp_path / "set", batch_size=2, num_workers=0, img_size=IMG, synthetic=synthetic,
                            generate_if_missing=True, train_split="heldout")  # a set made without that split
    with pytest.raises(ValueError, match=r"no split 'heldout'.*Delete"):
        stage2.prepare_data()


def test_reliability_gate_keeps_a_clean_last_frame_and_replaces_an_unreliable_one():
    torch.manual_seed(1)
    enc = TemporalEncoder(dim=8, heads=2, average_tau=0.1, gate_scale=1.0, reliability=4, reliability_gate=True).eval()
    tokens, stamps = torch.randn(2, 5, 8), torch.tensor([0.0, 0.033, 0.067, 0.1, 0.133]).expand(2, 5)
    with torch.no_grad():
        enc.average_gate.fill_(0.5)
        enc.out.weight.zero_()
        enc.out.bias.zero_()
        neutral = enc(tokens, stamps)  # zero scores: the multiplier is 1, the plain gate of 0.5
        weights = torch.softmax(-(stamps[:, -1:] - stamps)[..., None] / enc.log_tau.exp(), dim=1)
        average = (weights * tokens).sum(1, keepdim=True)
        torch.testing.assert_close(neutral, tokens[:, -1:] + 0.5 * (average - tokens[:, -1:]), atol=1e-6, rtol=0)
        for last_score, expected in ((40.0, "last"), (-40.0, "earlier average")):
            scores = torch.zeros(2, 5, 1)
            scores[:, -1] = last_score
            enc.reliability = _FixedScore(scores)
            out = enc(tokens, stamps)
            if expected == "last":  # above the window's mean score: the gate closes, the last frame stays
                torch.testing.assert_close(out, tokens[:, -1:], atol=1e-6, rtol=0)
            else:  # below: the gate doubles to 1 and the average leaves the last frame out
                earlier = torch.softmax(-(stamps[:, -1:] - stamps[:, :-1])[..., None] / enc.log_tau.exp(), dim=1)
                torch.testing.assert_close(out, (earlier * tokens[:, :-1]).sum(1, keepdim=True), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="reliability_gate needs"):
        TemporalEncoder(dim=8, heads=2, reliability_gate=True)


def test_depth_zero_is_the_gated_window_average_alone():
    """temporal.depth 0: no attention path; the refined token is last + gate (weighted average - last), per channel,
    against a float64 recomputation; the encoder has only the average's parameters."""
    torch.manual_seed(2)
    enc = TemporalEncoder(dim=6, depth=0, average_tau=0.1, gate_scale=10.0, reliability=4).eval()
    names = {n.split(".")[0] for n, _ in enc.named_parameters()}
    assert names == {"average_gate", "log_tau", "reliability"}
    tokens, stamps = torch.randn(3, 4, 6), torch.tensor([0.0, 0.033, 0.1, 0.133]).expand(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(enc(tokens, stamps), tokens[:, -1:], atol=0, rtol=0)  # starts as Stage 1
        enc.average_gate.copy_(torch.linspace(0.0, 0.1, 6))
        enc.log_tau.copy_(torch.log(torch.linspace(0.05, 0.3, 6)))
        out = enc(tokens, stamps)
    x = tokens.double()
    age = (stamps[:, -1:] - stamps).double()[..., None]  # [b, t, 1]
    weights = torch.softmax(-age / torch.linspace(0.05, 0.3, 6, dtype=torch.float64), dim=1)  # [b, t, d]
    gate = 10.0 * torch.linspace(0.0, 0.1, 6, dtype=torch.float64)
    expected = x[:, -1:] + gate * ((weights * x).sum(1, keepdim=True) - x[:, -1:])
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="depth"):
        TemporalEncoder(dim=6, depth=-1)


def test_ground_truth_joint_tokens_need_a_joint_mlp_on_the_heatmaps(root):
    ds = HandWindowDataset(root, "val", num_frame=1, img_size=IMG)
    with pytest.raises(ValueError, match="ground_truth_joints_2d"):
        compute_frame_tokens(make_net("stage1", kind="vit"), ds, ground_truth_joints_2d=True)

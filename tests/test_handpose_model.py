"""PoseNet shapes, Stage 1 -> Stage 2 equivalence and weight loading, backbone freezing, HandPoseLit wiring.

Regression: after the temporal encoder the sequence axis is 1, and no reshape may fold the batch
(`b` samples must stay `b` independent samples, whatever t is).
"""

from __future__ import annotations

import functools
import logging

import lightning as L
import pytest
import timm
import torch
from safetensors.torch import save_file
from test_handpose_loss import TRANS_BINS, make_hand_batch
from torch.utils.data import DataLoader

from common.shapes import ShapeError
from handpose.lit import HandPoseLit, draw_keypoint_grid, warmup_cosine
from handpose.loss import HandPoseLoss
from handpose.models import PoseNet, ViTBackbone, camera_features

IMG = 32
BACKBONE = {"name": "vit_tiny_patch16_224", "img_size": IMG, "depth": 1}
DECODER = {"dim": 32, "depth": 1, "heads": 2, "mlp_ratio": 2.0, "trans_bins": TRANS_BINS}
TEMPORAL = {"depth": 1, "heads": 2, "mlp_ratio": 2.0}


# The CPU default's kind: a timm CNN, the heatmap keypoint head, its joint MLP, crop-space translation.
CNN_BACKBONE = {"kind": "cnn", "name": "resnet10t", "img_size": IMG, "out_indices": [1, 2, 3], "dense_dim": 16}
CNN_DECODER = {**DECODER, "trans_space": "crop", "joint_mlp": 32, "head_init_gain": 0.3,
               "trans_bins": {"x": {"min": -0.25, "max": 1.25, "num": 16}, "y": {"min": -0.25, "max": 1.25, "num": 16},
                              "z": {"min": -1.0, "max": 1.0, "num": 16}}}
KINDS = {"vit": {"backbone": BACKBONE, "decoder": DECODER},
         "cnn": {"backbone": CNN_BACKBONE, "decoder": CNN_DECODER, "aux_keypoints": True}}


def make_net(stage: str, seed: int = 0, kind: str = "vit", **kwargs) -> PoseNet:
    torch.manual_seed(seed)
    return PoseNet(stage, temporal=TEMPORAL, **{**KINDS[kind], **kwargs}).eval()


def inputs(b: int, t: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    batch = make_hand_batch(b, t, IMG, seed=seed)
    return batch["img"], batch["bbox"], batch["focal"], batch["princpt"], batch["timestamp"]


def with_nonzero_temporal_output(net: PoseNet) -> PoseNet:
    """A Stage 2 net whose temporal encoder has left its identity initialisation (as after training)."""
    with torch.no_grad():
        torch.nn.init.normal_(net.temporal.out.weight, std=0.2)
    return net


@pytest.fixture(scope="module", params=sorted(KINDS))
def nets(request) -> dict[str, PoseNet]:
    kind = request.param
    return {"stage1": make_net("stage1", kind=kind), "stage2": with_nonzero_temporal_output(make_net("stage2", kind=kind))}


@pytest.mark.parametrize("b", [1, 5, 14])
@pytest.mark.parametrize(("stage", "t"), [("stage1", 1), ("stage2", 1), ("stage2", 7)])
def test_output_is_last_frame_per_sample(nets, stage, t, b):
    net = nets[stage]
    with torch.no_grad():
        (pose, shape, trans), heatmaps = net.predict_mano_param(*inputs(b, t))
    assert pose.shape == (b, 1, 48) and shape.shape == (b, 1, 10) and trans.shape == (b, 1, 3)
    assert [h.shape for h in heatmaps] == [(b, 1, len(c)) for c in net.trans_bin_centers]


def test_samples_stay_independent_across_the_batch(nets):
    """Seed bug: a `(b t)` reshape with the wrong t mixed samples. Each output row must be its own sample's."""
    net = nets["stage2"]
    img, bbox, focal, princpt, timestamp = inputs(14, 7)
    with torch.no_grad():
        together = net(img, bbox, focal, princpt, timestamp)
        for i in (0, 6, 13):
            alone = net(img[i : i + 1], bbox[i : i + 1], focal[i : i + 1], princpt[i : i + 1], timestamp[i : i + 1])
            for a, b in zip((*together.mano, *together.log_heatmaps), (*alone.mano, *alone.log_heatmaps)):
                torch.testing.assert_close(a[i : i + 1], b, atol=1e-5, rtol=1e-5)


def test_stage2_uses_earlier_frames_and_their_timestamps(nets):
    net = nets["stage2"]
    img, bbox, focal, princpt, timestamp = inputs(2, 5)
    with torch.no_grad():
        base = net(img, bbox, focal, princpt, timestamp).mano.pose
        other_frame = img.clone()
        other_frame[:, 0] = torch.randn_like(other_frame[:, 0])
        assert not torch.allclose(base, net(other_frame, bbox, focal, princpt, timestamp).mano.pose)
        later = timestamp.clone()
        later[:, :-1] -= 0.2  # a dropped-frame gap before the last frame
        assert not torch.allclose(base, net(img, bbox, focal, princpt, later).mano.pose)
        # only offsets from the last frame matter, not the clock's origin
        shifted = net(img, bbox, focal, princpt, timestamp + 3.0).mano.pose
        torch.testing.assert_close(base, shifted, atol=1e-4, rtol=0)


def test_stage1_refuses_sequences(nets):
    with pytest.raises(ValueError, match="t=7"):
        nets["stage1"](*inputs(2, 7))


def test_wrong_crop_size_is_a_shape_error(nets):
    img, bbox, focal, princpt, timestamp = inputs(2, 1)
    with pytest.raises(ShapeError, match="img"):
        nets["stage1"](img[..., :16, :16], bbox, focal, princpt, timestamp)


def test_predict_is_encode_then_refine(nets):
    net = nets["stage2"]
    img, bbox, focal, princpt, timestamp = inputs(3, 4)
    with torch.no_grad():
        tokens = net.encode_frames(img, bbox, focal, princpt)
        assert tokens.shape == (3, 4, net.token_dim)
        # per frame: encoding frames one at a time gives the same tokens (a tracker's ring buffer)
        one_by_one = torch.cat([net.encode_frames(img[:, i : i + 1], bbox[:, i : i + 1], focal[:, i : i + 1],
                                                  princpt[:, i : i + 1]) for i in range(4)], dim=1)
        torch.testing.assert_close(tokens, one_by_one, atol=1e-5, rtol=1e-5)
        composed = net.refine_and_decode(tokens, timestamp, focal, princpt)
        direct = net.predict_mano_param(img, bbox, focal, princpt, timestamp)
    for a, b in zip((*composed.mano, *composed.log_heatmaps), (*direct.mano, *direct.log_heatmaps)):
        assert torch.equal(a, b)


def test_trans_is_the_expectation_of_the_heatmaps(nets):
    if nets["stage2"].translation.space != "camera":
        pytest.skip("camera-space bins only (crop space: tests/test_handpose_cnn.py)")
    with torch.no_grad():
        (_, _, trans), heatmaps = nets["stage2"](*inputs(5, 3))
    for axis, (log_hm, centers) in enumerate(zip(heatmaps, nets["stage2"].trans_bin_centers)):
        # float32 log-softmax: the probabilities sum to 1 within float32 rounding
        torch.testing.assert_close(log_hm.double().exp().sum(-1), torch.ones(5, 1, dtype=torch.float64),
                                   atol=1e-6, rtol=0)
        expected = (log_hm.double().exp() * centers.double()).sum(-1)
        torch.testing.assert_close(trans[..., axis].double(), expected, atol=1e-6, rtol=0)
        assert centers[0] == TRANS_BINS["xyz"[axis]]["min"] and centers[-1] == pytest.approx(
            TRANS_BINS["xyz"[axis]]["max"])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_stage2_at_initialisation_equals_stage1_on_the_last_frame(kind):
    stage1 = make_net("stage1", seed=1, kind=kind)
    stage2 = make_net("stage2", seed=2, kind=kind)
    result = stage2.load_state_dict(stage1.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k.startswith("temporal.") for k in result.missing_keys)
    img, bbox, focal, princpt, timestamp = inputs(4, 7)
    with torch.no_grad():
        seq = stage2(img, bbox, focal, princpt, timestamp)
        last = stage1(img[:, -1:], bbox[:, -1:], focal[:, -1:], princpt[:, -1:], timestamp[:, -1:])
    for a, b in zip((*seq.mano, *seq.log_heatmaps), (*last.mano, *last.log_heatmaps)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def _assert_stage1_loaded(stage2: PoseNet, stage1: PoseNet, report) -> None:
    reference = stage1.state_dict()
    for key, value in stage2.state_dict().items():
        if key.startswith("temporal."):
            continue
        assert torch.equal(value, reference[key]), key
    assert report.loaded and not report.mismatched and not report.missing and report.clean
    assert report.expected_missing and all(k.startswith("temporal.") for k in report.expected_missing)


def test_load_stage1_from_a_lightning_checkpoint_dict(tmp_path):
    stage1 = make_net("stage1", seed=1)
    state = {f"net.{k}": v for k, v in stage1.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3, "global_step": 10}, tmp_path / "last.ckpt")
    stage2 = make_net("stage2", seed=2)
    _assert_stage1_loaded(stage2, stage1, stage2.load_stage1(tmp_path / "last.ckpt"))


def test_a_correct_stage1_load_does_not_warn(tmp_path, caplog):
    """The temporal encoder is expected to be missing: a good load logs no warning, so a bad one stands out."""
    torch.save({"state_dict": {f"net.{k}": v for k, v in make_net("stage1").state_dict().items()}},
               tmp_path / "last.ckpt")
    with caplog.at_level(logging.INFO):
        make_net("stage2").load_stage1(tmp_path / "last.ckpt")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "expected-missing" in caplog.text


def test_stage1_of_another_architecture_is_an_error(tmp_path):
    """A checkpoint whose tensors mostly have other shapes (ViT-S, another decoder width) loads a handful of counters
    and biases at best: an error naming the file, and the network is left untouched."""
    other = make_net("stage1", backbone={**BACKBONE, "name": "vit_small_patch16_224"}, decoder={**DECODER, "dim": 48})
    torch.save({"state_dict": {f"net.{k}": v for k, v in other.state_dict().items()}}, tmp_path / "other.ckpt")
    stage2 = make_net("stage2")
    before = {k: v.clone() for k, v in stage2.state_dict().items()}
    with pytest.raises(ValueError, match=r"stage1_weight: .*other\.ckpt: only \d+ of the \d+ tensors"):
        stage2.load_stage1(tmp_path / "other.ckpt")
    assert all(torch.equal(v, before[k]) for k, v in stage2.state_dict().items())


def test_stage1_of_another_configuration_is_an_error_even_when_most_tensors_fit(tmp_path):
    """A Stage 1 made with another decoder option (one extra sub-network, one head of another width) fits most
    tensors; loading it would leave the rest at their random initialisation under Stage 2's frozen heads. Each of a
    missing key, an unexpected key and a shape mismatch is an error naming the key, and nothing is loaded."""
    stage1 = make_net("stage1", kind="cnn", decoder={**CNN_DECODER, "finger_token": 16})
    state = {f"net.{k}": v for k, v in stage1.state_dict().items()}
    cases = {
        "missing": {k: v for k, v in state.items() if not k.startswith("net.decoder.finger_head.")},
        "unexpected": {**state, "net.decoder.extra.weight": torch.zeros(2)},
        "shape-mismatched": {**state, "net.decoder.finger_head.bias": torch.zeros(7)},
    }
    for kind, tampered in cases.items():
        torch.save({"state_dict": tampered}, tmp_path / f"{kind}.ckpt")
        stage2 = make_net("stage2", kind="cnn", decoder={**CNN_DECODER, "finger_token": 16})
        before = {k: v.clone() for k, v in stage2.state_dict().items()}
        with pytest.raises(ValueError, match=rf"stage1_weight: .*{kind}\.ckpt does not fit(.|\n)*{kind} \([12]\): \[\w*\.?decoder\."):
            stage2.load_stage1(tmp_path / f"{kind}.ckpt")
        assert all(torch.equal(v, before[k]) for k, v in stage2.state_dict().items())
    torch.save({"state_dict": state}, tmp_path / "good.ckpt")
    stage2 = make_net("stage2", kind="cnn", decoder={**CNN_DECODER, "finger_token": 16})
    _assert_stage1_loaded(stage2, stage1, stage2.load_stage1(tmp_path / "good.ckpt"))


def test_load_stage1_from_an_accelerate_folder(tmp_path):
    stage1 = make_net("stage1", seed=1)
    folder = tmp_path / "checkpoint-9000"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in stage1.state_dict().items()}, folder / "model.safetensors")
    stage2 = make_net("stage2", seed=2)
    _assert_stage1_loaded(stage2, stage1, stage2.load_stage1(folder))


def test_missing_weight_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="stage1_weight"):
        make_net("stage2").load_stage1(tmp_path / "nope.ckpt")
    with pytest.raises(FileNotFoundError, match="backbone.weight"):
        PoseNet("stage1", backbone={**BACKBONE, "weight": str(tmp_path / "vit.safetensors")}, decoder=DECODER)


def test_backbone_loads_a_timm_file_of_another_resolution(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=1, num_classes=0)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "vit.safetensors")
    report = ViTBackbone(**BACKBONE).load_pretrained(tmp_path / "vit.safetensors")
    assert report.clean, report.summary()
    backbone = ViTBackbone(weight=str(tmp_path / "vit.safetensors"), **BACKBONE)  # the configured path
    assert torch.equal(backbone.vit.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    # the 4x4 position grid of 64 px was resampled to our 2x2 grid of 32 px (prefix token kept)
    assert backbone.vit.pos_embed.shape == (1, 1 + 4, 192)
    assert torch.equal(backbone.vit.pos_embed[:, 0], source.pos_embed[:, 0])


def test_conv_stem_keeps_the_token_grid_and_sees_only_its_neighbourhood():
    torch.manual_seed(0)
    backbone = ViTBackbone(**{**BACKBONE, "img_size": 64}, stem="conv").eval()
    patch = ViTBackbone(**{**BACKBONE, "img_size": 64}).eval()
    assert backbone.grid_size == patch.grid_size == (4, 4) and backbone.embed_dim == patch.embed_dim
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = backbone.vit.patch_embed(img)  # [n, 16, 192] before the transformer mixes tokens
        changed = img.clone()
        changed[:, :, 56:, 56:] += 1.0  # inside the bottom-right patch
        diff = (backbone.vit.patch_embed(changed) - feats).abs().amax(dim=(0, 2)).reshape(4, 4)
    assert diff[3, 3] > 0 and diff[:2].eq(0).all() and diff[:, :2].eq(0).all()  # receptive field: one patch + rim
    assert backbone(img).shape == (2, 16, 192)


def test_conv_stem_rejects_bad_settings_and_reports_unloaded_patchify_weights(tmp_path):
    with pytest.raises(ValueError, match="stem"):
        ViTBackbone(**BACKBONE, stem="resnet")
    with pytest.raises(ValueError, match="power-of-two"):
        ViTBackbone(name="vit_small_patch14_dinov2", img_size=28, depth=1, stem="conv")
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, depth=1, num_classes=0)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "vit.safetensors")
    report = ViTBackbone(**BACKBONE, stem="conv").load_pretrained(tmp_path / "vit.safetensors")
    assert not report.clean
    assert "vit.patch_embed.proj.weight" not in report.loaded and "patch_embed.proj.weight" not in report.loaded
    assert any("patch_embed.proj" in k for k in report.unexpected + [m[0] for m in report.mismatched])


def test_freeze_backbone_freezes_it_and_keeps_it_in_eval_mode():
    net = make_net("stage2", freeze_backbone=True).train()
    assert all(not p.requires_grad for p in net.backbone.parameters())
    assert all(p.requires_grad for n, p in net.named_parameters() if not n.startswith("backbone."))
    assert not net.backbone.training and net.decoder.training
    (pose, _, _), _ = net(*inputs(2, 3))
    pose.sum().backward()
    assert all(p.grad is None for p in net.backbone.parameters())
    assert net.decoder.query.grad is not None


def test_camera_features_equal_the_original_image_ray_and_scale():
    batch = make_hand_batch(6, 2, IMG)
    box = batch["bbox"]
    centre, size = (box[..., :2] + box[..., 2:]) / 2, box[..., 2:] - box[..., :2]
    expected = torch.cat([(centre - batch["orig_princpt"]) / batch["orig_focal"],
                          torch.log(size / batch["orig_focal"])], -1)
    features = camera_features(batch["focal"], batch["princpt"], (IMG, IMG))
    torch.testing.assert_close(features, expected, atol=1e-4, rtol=1e-4)


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6) and lrs[-1] > 0.1 - 1e-9
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_keypoint_grid_draws_both_skeletons():
    batch = make_hand_batch(3, 1, IMG)
    grid = draw_keypoint_grid(batch["img"][:, -1], batch["joints_2d"][:, -1], batch["joints_2d"][:, -1] + 3.0)
    assert grid.dtype.name == "uint8" and grid.shape[2] == 3 and grid.shape[1] == 3 * grid.shape[0]
    assert ((grid[..., 0] == 255) & (grid[..., 1] == 64)).any() and ((grid[..., 1] == 255) & (grid[..., 0] == 64)).any()


class PrebatchedData(L.LightningDataModule):
    def __init__(self, batches: list[dict]) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)

    val_dataloader = train_dataloader


def _lit(net: PoseNet, **kwargs) -> HandPoseLit:
    return HandPoseLit(
        net=net, loss=HandPoseLoss(), optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        scheduler=functools.partial(warmup_cosine, warmup_steps=2), **kwargs,
    )


def test_mean_init_makes_a_silent_head_predict_the_mean():
    decoder = make_net("stage1").decoder
    batch = make_hand_batch(5, 1, IMG)
    pose = batch["mano_pose"][0, 0]
    decoder.set_mean_init(pose, batch["mano_shape"][:, 0].mean(0))
    with torch.no_grad():
        decoder.pose_head.weight.zero_()
        decoder.shape_head.weight.zero_()
        (pose_out, shape_out, _), _ = decoder.decode_token(torch.randn(3, decoder.dim), torch.full((3, 2), 40.0), torch.full((3, 2), 16.0))
    torch.testing.assert_close(pose_out, pose.expand(3, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(shape_out, batch["mano_shape"][:, 0].mean(0).expand(3, -1), atol=1e-6, rtol=0)
    assert "init_pose_6d" in decoder.state_dict() and "init_shape" in decoder.state_dict()


def test_lightning_fit_then_stage2_loads_the_checkpoint(tmp_path):
    """Stage 1 trained by a real Trainer; its checkpoint initialises Stage 2 through HandPoseLit.setup."""
    batches = [make_hand_batch(4, 1, IMG, seed=s) for s in range(3)]
    data = PrebatchedData(batches)
    lit1 = _lit(make_net("stage1", seed=1), backbone_lr_scale=0.1, mean_init_batches=2).train()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(lit1, datamodule=data)
    mean_shape = torch.cat([b["mano_shape"][:, -1] for b in batches[:2]]).mean(0)
    torch.testing.assert_close(lit1.net.decoder.init_shape, mean_shape)
    logged = trainer.callback_metrics
    for key in ("train/loss", "train/joints_2d", "val/mpjpe", "val/pa_mpjpe", "val/mpvpe", "val/pa_mpvpe",
                "val/f5", "val/f15", "val/root_err", "val/auc"):
        assert key in logged and torch.isfinite(logged[key]), key
    groups = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}
    assert groups["backbone"] == pytest.approx(0.1 * groups["head"])
    trainer.save_checkpoint(tmp_path / "stage1.ckpt")

    lit2 = _lit(make_net("stage2", seed=2, freeze_backbone=True), stage1_weight=str(tmp_path / "stage1.ckpt"))
    lit2.setup("fit")
    _assert_stage1_loaded(lit2.net, lit1.net, lit2.net.load_stage1(tmp_path / "stage1.ckpt"))
    seq = make_hand_batch(2, 7, IMG, seed=9)
    lit1.eval()
    lit2.eval()
    with torch.no_grad():
        last = {k: v[:, -1:] for k, v in seq.items()}
        torch.testing.assert_close(lit2(seq).mano.pose, lit1(last).mano.pose, atol=1e-6, rtol=0)
    # a frozen backbone gets no optimizer group
    lit2.trainer = trainer
    assert [g["name"] for g in lit2.configure_optimizers()["optimizer"].param_groups] == ["head"]


def test_patch_keypoint_head_is_a_soft_argmax_over_patch_centres():
    from handpose.models import PatchKeypointHead

    head = PatchKeypointHead(in_dim=8, grid_size=(2, 4), img_size=32, num_joints=3)
    # patch centres in crop pixels (integer values at pixel centres): cells of 8 x 16 pixels
    expected_centres = torch.tensor([[(i + 0.5) * 8 - 0.5, (r + 0.5) * 16 - 0.5] for r in range(2) for i in range(4)])
    torch.testing.assert_close(head.patch_centres, expected_centres)
    with torch.no_grad():
        head.logits.weight.zero_()
        head.logits.bias.zero_()
        head.logits.weight[1, 0] = 100.0  # joint 1: all weight on the patches whose feature 0 is large
    patches = torch.zeros(2, 8, 8)
    patches[:, 5, 0] = 1.0  # patch 5 = row 1, column 1
    joints = head(patches)
    assert joints.shape == (2, 3, 2)
    torch.testing.assert_close(joints[:, 1], expected_centres[5].expand(2, -1), atol=1e-3, rtol=0)
    torch.testing.assert_close(joints[:, 0], expected_centres.mean(0).expand(2, -1))  # uniform -> mean centre


@pytest.mark.parametrize(("stage", "t"), [("stage1", 1), ("stage2", 7)])
def test_predict_with_keypoints_supervises_the_backbone_on_the_last_frame(stage, t):
    net = make_net(stage, aux_keypoints=True).train()
    batch = make_hand_batch(5, t, IMG)
    args = [batch[k] for k in ("img", "bbox", "focal", "princpt", "timestamp")]
    pred, keypoints = net.predict_with_keypoints(*args)
    assert keypoints.shape == (5, 1, 21, 2)
    with torch.no_grad():
        plain = net.eval().predict_mano_param(*args)
        again, _ = net.predict_with_keypoints(*args)
    for a, b in zip((*plain.mano, *plain.log_heatmaps), (*again.mano, *again.log_heatmaps)):
        assert torch.equal(a, b)  # the auxiliary head does not change the MANO outputs
    loss = HandPoseLoss(weights={k: 0.0 for k in ("pose", "shape", "trans", "joints", "verts", "joints_2d")}
                        | {"keypoints_2d": 1.0})
    out = loss(pred, batch, net.translation, keypoints_2d=keypoints)
    out["loss"].backward()
    assert out["terms"]["keypoints_2d"] > 0
    assert net.backbone.vit.patch_embed.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ShapeError):  # all frames' keypoints against the last frame's joints
        loss(pred, batch, net.translation, keypoints_2d=keypoints.expand(5, t, 21, 2).clone()
             if t > 1 else keypoints[:, :, :20])
    with pytest.raises(ValueError, match="keypoints_2d"):
        loss(pred, batch, net.translation)
    with pytest.raises(RuntimeError, match="aux_keypoints"):
        make_net(stage).predict_with_keypoints(*args)

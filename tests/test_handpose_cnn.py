"""The CPU default's components: timm CNN backbone, heatmap keypoint head, crop-space translation bins, the joint
MLP and its lifting batch, the frozen token encoder of Stage 2, the acceleration error and the learning curve.

References are independent: pinhole projection and cell centres in float64 numpy, MANO's root joint from a forward
pass of ``common.mano.ManoLayer``, the acceleration error from an explicit loop.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_handpose_loss import make_hand_batch
from test_handpose_model import CNN_BACKBONE, CNN_DECODER, TEMPORAL

from common.mano import ManoLayer
from common.shapes import ShapeError
from handpose.callbacks import FIGURE_NAME, LearningCurve, render_curve
from handpose.loss import HandPoseLoss, heatmap_target
from handpose.metrics import acceleration_error
from handpose.models import CNNBackbone, HeatmapKeypointHead, PoseNet, TranslationBins

IMG = CNN_BACKBONE["img_size"]
CROP_BINS = CNN_DECODER["trans_bins"]


def cnn_net(stage: str = "stage1", seed: int = 0, **kwargs) -> PoseNet:
    torch.manual_seed(seed)
    return PoseNet(stage, backbone=CNN_BACKBONE, decoder=CNN_DECODER, temporal=TEMPORAL, aux_keypoints=True,
                   **kwargs).eval()


def test_cnn_backbone_gives_tokens_at_its_last_stride_and_a_stride_4_map():
    bb = CNNBackbone("resnet10t", img_size=64, out_indices=(1, 2, 3), dense_dim=8).eval()
    tokens, dense = bb.forward_features(torch.randn(3, 3, 64, 64))
    assert bb.grid_size == (4, 4) and bb.num_patches == 16 and bb.dense_stride == 4
    assert tokens.shape == (3, 16, bb.embed_dim) and dense.shape == (3, 8, 16, 16)
    with pytest.raises(ValueError, match="multiple"):
        CNNBackbone("resnet10t", img_size=60)
    with pytest.raises(ShapeError, match="img"):
        bb(torch.randn(1, 3, 32, 32))


def test_cnn_backbone_loads_a_local_timm_file_and_names_the_key_when_it_is_missing(tmp_path):
    from safetensors.torch import save_file

    source = CNNBackbone("resnet10t", img_size=64, dense_dim=8)
    save_file({k: v.contiguous() for k, v in source.cnn.state_dict().items()}, tmp_path / "cnn.safetensors")
    torch.manual_seed(1)
    target = CNNBackbone("resnet10t", img_size=64, dense_dim=8)
    report = target.load_pretrained(tmp_path / "cnn.safetensors")
    assert report.clean and len(report.loaded) == len(source.cnn.state_dict())
    for key, value in source.cnn.state_dict().items():
        assert torch.equal(target.cnn.state_dict()[key], value), key
    with pytest.raises(FileNotFoundError, match="model.net.backbone.weight"):
        CNNBackbone("resnet10t", img_size=64, weight=str(tmp_path / "none.safetensors"))


def test_heatmap_head_soft_argmax_of_a_peaked_heatmap_is_that_cells_centre():
    head = HeatmapKeypointHead(in_dim=4, stride=4, img_size=32, num_joints=3)
    grid = 8
    cell = np.array([[2, 5], [7, 0], [3, 3]])  # (row, col) per joint
    logits = torch.full((1, 3, grid * grid), -1e4)
    for j, (r, c) in enumerate(cell):
        logits[0, j, r * grid + c] = 0.0
    coords = head.coordinates(torch.log_softmax(logits, -1))[0].numpy()
    # crop pixels have integer values at pixel centres: cell k spans [4k - 0.5, 4k + 3.5)
    expected = np.stack([(cell[:, 1] + 0.5) * 4 - 0.5, (cell[:, 0] + 0.5) * 4 - 0.5], 1)
    np.testing.assert_allclose(coords, expected, atol=1e-4)


def test_heatmap_target_peaks_at_the_joint_and_masks_joints_outside_the_crop():
    head = HeatmapKeypointHead(in_dim=4, stride=4, img_size=32, num_joints=2)
    joints = torch.tensor([[[9.5, 21.5], [40.0, 3.0]]])  # the second lies right of the 32-px crop
    target, inside = heatmap_target(joints, head.cell_centres, sigma=1.0, crop_wh=(32, 32))
    torch.testing.assert_close(target.sum(-1), torch.ones(1, 2))
    assert inside.tolist() == [[1.0, 0.0]]
    peak = head.cell_centres[target[0, 0].argmax()]
    assert (peak - joints[0, 0]).abs().max() <= 2.0  # the nearest cell centre (cells are 4 px)
    # the expectation of the target is (close to) the joint: the Gaussian is centred on it, not on a cell
    torch.testing.assert_close(target[0, 0] @ head.cell_centres, joints[0, 0], atol=0.3, rtol=0)


def test_heatmap_loss_term_is_positive_and_needs_the_heatmap_heads_output():
    net = cnn_net()
    batch = make_hand_batch(4, 1, IMG, seed=3)
    pred, keypoints, log_hm, depths = net.predict_with_heatmaps(batch["img"], batch["bbox"], batch["focal"],
                                                                batch["princpt"], batch["timestamp"])
    assert keypoints.shape == (4, 1, 21, 2) and log_hm.shape == (4, 1, 21, (IMG // 4) ** 2) and depths is None
    loss = HandPoseLoss(weights={"heatmap_2d": 1.0, "keypoints_2d": 1.0})
    out = loss(pred, batch, net.translation, keypoints_2d=keypoints, keypoint_heatmaps=(log_hm, net.keypoint_head.cell_centres))
    assert torch.isfinite(out["terms"]["heatmap_2d"]) and out["terms"]["heatmap_2d"] > 0
    with pytest.raises(ValueError, match="heatmap_2d"):
        loss(pred, batch, net.translation, keypoints_2d=keypoints)


def _crop_bins() -> TranslationBins:
    return TranslationBins(CROP_BINS, space="crop", img_size=64)


def test_crop_translation_root_joint_is_manos_and_decode_inverts_the_pinhole_encode():
    bins = _crop_bins()
    g = torch.Generator().manual_seed(0)
    shape = torch.randn(6, 10, generator=g)
    mano = ManoLayer()
    with torch.no_grad():
        rest_root = mano(torch.zeros(6, 48), shape).joints[:, 0]  # MANO rotates about this joint
    torch.testing.assert_close(bins.root_joint(shape), rest_root, atol=1e-6, rtol=0)

    root = torch.stack([torch.rand(6, generator=g) * 0.2 - 0.1, torch.rand(6, generator=g) * 0.2 - 0.1,
                        0.3 + 0.6 * torch.rand(6, generator=g)], 1).double()
    focal = (80 + 40 * torch.rand(6, 2, generator=g)).double()
    princpt = (20 + 20 * torch.rand(6, 2, generator=g)).double()
    trans = root - bins.root_joint(shape.double())
    values = bins.encode(trans, root, focal, princpt)
    r, f, c = root.numpy(), focal.numpy(), princpt.numpy()
    u = f[:, 0] * r[:, 0] / r[:, 2] + c[:, 0]
    v = f[:, 1] * r[:, 1] / r[:, 2] + c[:, 1]
    z_ref = f.mean(1) * 0.2 / 64
    np.testing.assert_allclose(values.numpy(), np.stack([u / 64, v / 64, np.log(r[:, 2] / z_ref)], 1), rtol=1e-9)
    torch.testing.assert_close(bins.decode(values, shape.double(), focal, princpt), trans, atol=1e-9, rtol=0)


def test_translation_bins_travel_with_the_weights_and_other_bins_are_an_error():
    saved = cnn_net().state_dict()
    assert {"decoder.translation.centers_z", "decoder.translation.space_code"} <= set(saved)
    other = {**CNN_DECODER, "trans_bins": {**CROP_BINS, "z": {"min": -0.5, "max": 1.5, "num": 16}}}
    torch.manual_seed(0)
    net = PoseNet("stage1", backbone=CNN_BACKBONE, decoder=other, temporal=TEMPORAL, aux_keypoints=True)
    with pytest.raises(ValueError, match="centers_z"):
        net.load_state_dict(saved)
    camera = PoseNet("stage1", backbone=CNN_BACKBONE, decoder={**CNN_DECODER, "trans_space": "camera"},
                     temporal=TEMPORAL, aux_keypoints=True)
    with pytest.raises(ValueError, match="space"):
        camera.load_state_dict(saved)
    cnn_net(seed=5).load_state_dict(saved)  # the same configuration loads


def test_joint_mlp_needs_the_heatmap_head():
    with pytest.raises(ValueError, match="joint_mlp"):
        PoseNet("stage1", backbone=CNN_BACKBONE, decoder=CNN_DECODER, aux_keypoints=False)


def test_freeze_encoder_leaves_only_the_temporal_encoder_and_the_heads_trainable():
    net = cnn_net("stage2", freeze_encoder=True).train()
    trainable = {name.split(".")[0] + "." + name.split(".")[1] for name, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"temporal.time_embed", "temporal.blocks", "temporal.norm", "temporal.out",
                         "temporal.average_gate", "decoder.pose_head", "decoder.shape_head", "decoder.trans_heads"}
    assert not net.backbone.training and not net.keypoint_head.training and not net.decoder.blocks.training
    batch = make_hand_batch(2, 3, IMG)
    tokens = net.encode_frames(batch["img"], batch["bbox"], batch["focal"], batch["princpt"])
    assert not tokens.requires_grad  # computed without a graph: 7 frames cost 7 forward passes
    out = net(batch["img"], batch["bbox"], batch["focal"], batch["princpt"], batch["timestamp"])
    assert out.mano.pose.requires_grad


def test_lift_terms_equal_the_forward_terms_for_the_same_prediction():
    loss = HandPoseLoss(gt_root_in_fk_terms=True)
    batch = make_hand_batch(5, 1, IMG, seed=2)
    g = torch.Generator().manual_seed(1)
    pose = batch["mano_pose"][:, 0] + 0.2 * torch.randn(5, 48, generator=g)
    bins = TranslationBins({"x": {"min": -0.3, "max": 0.3, "num": 8}, "y": {"min": -0.3, "max": 0.3, "num": 8},
                            "z": {"min": 0.2, "max": 1.5, "num": 8}})
    from handpose.models import HandPrediction, ManoParams

    heat = tuple(torch.log_softmax(torch.zeros(5, 1, 8), -1) for _ in range(3))
    pred = HandPrediction(ManoParams(pose[:, None], batch["mano_shape"], batch["mano_trans"]), heat)
    full = loss(pred, batch, bins)["terms"]
    lift = loss.lift_terms(pose, {k: v[:, 0] for k, v in batch.items()})
    torch.testing.assert_close(lift["pose"], full["pose"])
    torch.testing.assert_close(lift["joints"], full["joints"])
    assert "orient" not in lift  # off unless weighted
    weighted = HandPoseLoss(gt_root_in_fk_terms=True, weights={"orient": 10.0})
    torch.testing.assert_close(weighted.lift_terms(pose, {k: v[:, 0] for k, v in batch.items()})["orient"],
                               weighted(pred, batch, bins)["terms"]["orient"])
    # depth bins: the lift term is the forward's translation term restricted to the depth axis (two depth
    # distributions under the same x / y ones change both by the same amount)
    depth = [torch.log_softmax(torch.randn(5, 8, generator=g), -1) for _ in range(2)]
    forward = [loss(HandPrediction(pred.mano, (*heat[:2], d[:, None])), batch, bins)["terms"]["trans"] for d in depth]
    lifted = [loss.lift_terms(pose, {k: v[:, 0] for k, v in batch.items()}, (d, bins))["trans"] for d in depth]
    torch.testing.assert_close(lifted[0] - lifted[1], forward[0] - forward[1])
    assert lifted[0] > 0
    with pytest.raises(ShapeError):
        loss.lift_terms(pose, {k: v[:, 0] for k, v in batch.items()}, (depth[0][:, :7], bins))


def test_joint_distance_adds_depth_logits_read_from_the_finger_token_alone():
    """decoder.joint_distance: the depth bins' logits are the image token's plus an MLP's on the finger token;
    zero-initialised (same weights, same prediction), and decode_joint_distance reads the finger token only."""
    torch.manual_seed(0)
    decoder = {**CNN_DECODER, "finger_token": 16}
    plain = PoseNet("stage1", backbone=CNN_BACKBONE, decoder=decoder, aux_keypoints=True).eval()
    net = PoseNet("stage1", backbone=CNN_BACKBONE, decoder={**decoder, "joint_distance": True},
                  aux_keypoints=True).eval()
    report = net.load_state_dict(plain.state_dict(), strict=False)
    assert all(k.startswith("decoder.joint_distance_head.") for k in report.missing_keys) and report.missing_keys
    batch = make_hand_batch(3, 1, IMG, seed=4)
    args = (batch["img"], batch["bbox"], batch["focal"], batch["princpt"], batch["timestamp"])
    with torch.no_grad():
        torch.testing.assert_close(net(*args).mano.trans, plain(*args).mano.trans)
        torch.nn.init.normal_(net.decoder.joint_distance_head[-1].weight, std=0.3)
        dec = net.decoder
        token = torch.randn(3, dec.token_dim)
        finger = token[:, dec.dim:]
        log_hm = dec.decode_token(token, batch["focal"][:, 0], batch["princpt"][:, 0]).log_heatmaps
        extra = dec.joint_distance_head(finger)
        torch.testing.assert_close(log_hm[2], torch.log_softmax(dec.trans_heads[2](token) + extra, -1))
        torch.testing.assert_close(log_hm[0], torch.log_softmax(dec.trans_heads[0](token), -1))
        torch.testing.assert_close(dec.decode_joint_distance(finger), torch.log_softmax(extra, -1))
    with pytest.raises(ValueError, match="joint_distance"):
        PoseNet("stage1", backbone=CNN_BACKBONE, decoder={**CNN_DECODER, "joint_distance": True}, aux_keypoints=True)


def test_joint_root_adds_a_root_read_from_the_joint_positions_alone():
    """decoder.joint_root: an MLP of its own reads the (detached) 2D joint positions; its 6D residual is the hand
    token's last part and adds to the image token's root. Zero-initialised, so the network starts as without it
    (the same weights give the same prediction); decode_joint_root (what the lift batch supervises) reads only it."""
    from common.rotations import rotation_6d_to_axis_angle

    torch.manual_seed(0)
    decoder = {**CNN_DECODER, "finger_token": 16}
    plain = PoseNet("stage1", backbone=CNN_BACKBONE, decoder=decoder, aux_keypoints=True).eval()
    net = PoseNet("stage1", backbone=CNN_BACKBONE, decoder={**decoder, "joint_root": True}, aux_keypoints=True).eval()
    report = net.load_state_dict(plain.state_dict(), strict=False)
    assert report.missing_keys and all(k.startswith("decoder.joint_root_net.") for k in report.missing_keys)
    assert not report.unexpected_keys and net.decoder.joint_root_net in net.decoder.output_heads()
    dec = net.decoder
    assert dec.token_dim == plain.decoder.token_dim + 6
    batch = make_hand_batch(3, 1, IMG, seed=4)
    args = (batch["img"], batch["bbox"], batch["focal"], batch["princpt"], batch["timestamp"])
    with torch.no_grad():
        torch.testing.assert_close(net(*args).mano.pose, plain(*args).mano.pose)
        torch.nn.init.normal_(dec.joint_root_net[-1].weight, std=0.3)
        token = torch.randn(3, dec.token_dim)
        pose = dec.decode_token(token, batch["focal"][:, 0], batch["princpt"][:, 0]).mano.pose
        root_6d = dec.init_pose_6d[:6] + dec.pose_head(token[:, :-6]) + token[:, -6:]
        torch.testing.assert_close(pose[:, :3], rotation_6d_to_axis_angle(root_6d))
        torch.testing.assert_close(pose[:, 3:], dec.decode_fingers(token[:, dec.dim: dec.dim + 16]))
        torch.testing.assert_close(dec.decode_joint_root(token[:, -6:]),
                                   rotation_6d_to_axis_angle(dec.init_pose_6d[:6] + token[:, -6:]))
    positions = (0.3 * torch.randn(3, 21, 2)).requires_grad_(True)
    part = dec.root_from_joints(positions)
    torch.testing.assert_close(part, dec.joint_root_net(positions.detach().flatten(1)))
    part.sum().backward()
    assert positions.grad is None  # the heatmaps learn from their own loss, not from the root's
    with pytest.raises(ValueError, match="joint_root"):
        PoseNet("stage1", backbone=CNN_BACKBONE, decoder={**CNN_DECODER, "joint_root": True}, aux_keypoints=True)
    with pytest.raises(RuntimeError, match="joint_root"):
        plain.decoder.root_from_joints(positions)


def _accel_reference(seq, frame, pred, gt) -> float:
    """Explicit loop over (sequence, frame) triples, float64."""
    index = {(s, f): i for i, (s, f) in enumerate(zip(seq, frame))}
    errors = []
    for (s, f), i in index.items():
        if (s, f - 1) in index and (s, f + 1) in index:
            a, b = index[(s, f - 1)], index[(s, f + 1)]
            rel_p = pred - pred[:, :1]
            rel_g = gt - gt[:, :1]
            acc_p = rel_p[b] - 2 * rel_p[i] + rel_p[a]
            acc_g = rel_g[b] - 2 * rel_g[i] + rel_g[a]
            errors.append(np.linalg.norm(acc_p - acc_g, axis=-1).mean())
    return 1000 * float(np.mean(errors)), len(errors)


def test_acceleration_error_matches_an_explicit_loop_over_consecutive_frames():
    rng = np.random.default_rng(0)
    # two sequences, shuffled order, a gap (frame 4 missing) that breaks the triples around it
    seq = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    frame = np.array([0, 1, 2, 3, 5, 6, 10, 11, 12, 14])
    order = rng.permutation(len(seq))
    seq, frame = seq[order], frame[order]
    gt = rng.normal(0, 0.05, (len(seq), 21, 3))
    pred = gt + rng.normal(0, 0.01, gt.shape)
    got, triples = acceleration_error(torch.from_numpy(seq), torch.from_numpy(frame), torch.from_numpy(pred),
                                      torch.from_numpy(gt))
    want, want_triples = _accel_reference(seq, frame, pred, gt)
    assert triples == want_triples == 3  # (0,1,2), (1,2,3) of seq 0 and (10,11,12) of seq 1
    assert got == pytest.approx(want, rel=1e-9)
    same, _ = acceleration_error(torch.from_numpy(seq), torch.from_numpy(frame), torch.from_numpy(gt),
                                 torch.from_numpy(gt))
    assert same == 0.0
    assert np.isnan(acceleration_error(torch.tensor([0]), torch.tensor([0]), torch.zeros(1, 21, 3),
                                       torch.zeros(1, 21, 3))[0])


def test_learning_curve_writes_the_figure_and_keeps_its_history_in_the_checkpoint(tmp_path):
    image = render_curve([{"step": 10, "pa_mpjpe": 19.0, "mpjpe": 90.0}, {"step": 20, "pa_mpjpe": 15.0, "mpjpe": 60.0}],
                         {"pa_mpjpe": 19.5, "mpjpe": 126.0}, "stage1/test")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.std() > 0

    class Trainer:
        sanity_checking, is_global_zero, global_step = False, True, 30
        callback_metrics = {"val/pa_mpjpe": torch.tensor(14.0), "val/mpjpe": torch.tensor(50.0)}
        loggers = []

    class Module:
        trainer = Trainer()
        global_step = 30

    curve = LearningCurve(str(tmp_path / "run"))
    curve.load_state_dict({"history": [{"step": 10, "pa_mpjpe": 19.0, "mpjpe": 90.0}], "baseline": {"pa_mpjpe": 19.5}})
    curve.on_validation_end(Trainer(), Module())
    assert (tmp_path / "run" / FIGURE_NAME).is_file()
    assert [h["step"] for h in curve.state_dict()["history"]] == [10, 30]
    assert curve.state_dict()["baseline"] == {"pa_mpjpe": 19.5}


def test_temporal_gate_of_one_returns_the_window_mean_and_zero_returns_the_last_token():
    from handpose.models import TemporalEncoder

    torch.manual_seed(0)
    enc = TemporalEncoder(16, heads=2, gate_scale=10.0, token_noise=0.5).eval()  # out is zero-initialised
    tokens, ts = torch.randn(3, 5, 16), torch.cumsum(torch.rand(3, 5), 1)
    with torch.no_grad():
        torch.testing.assert_close(enc(tokens, ts), tokens[:, -1:])  # identity at start, noise off in eval
        enc.average_gate.fill_(0.1)  # effective gate 10 x 0.1 = 1
        torch.testing.assert_close(enc(tokens, ts), tokens.mean(dim=1, keepdim=True), atol=1e-6, rtol=0)


def test_finger_token_alone_gives_the_fingers_and_the_image_token_the_rest():
    """decoder.finger_token: the hand token is [image token, finger token]; the 15 finger joints depend on the
    finger token only (the same values decode_fingers gives), the root, shape and translation on the whole token."""
    torch.manual_seed(0)
    net = PoseNet("stage2", backbone=CNN_BACKBONE, decoder={**CNN_DECODER, "finger_token": 24}, temporal=TEMPORAL,
                  aux_keypoints=True, freeze_encoder=True).eval()
    dec = net.decoder
    assert net.token_dim == dec.dim + 24 and net.temporal.out.out_features == net.token_dim
    for head in (dec.pose_head, dec.finger_head):  # non-zero weights, so that a dependence would show
        torch.nn.init.normal_(head.weight, std=0.5)
    n = 3
    token = torch.randn(n, net.token_dim)
    focal, princpt = torch.full((n, 2), 80.0), torch.full((n, 2), IMG / 2)
    other = token.clone()
    other[:, : dec.dim] = torch.randn(n, dec.dim)  # another image token, the same finger token
    a, b = dec.decode_token(token, focal, princpt), dec.decode_token(other, focal, princpt)
    torch.testing.assert_close(a.mano.pose[:, 3:], b.mano.pose[:, 3:])
    assert not torch.allclose(a.mano.pose[:, :3], b.mano.pose[:, :3])
    torch.testing.assert_close(a.mano.pose[:, 3:], dec.decode_fingers(token[:, dec.dim:]))
    # The frozen encoder's tokens carry both parts, and the whole chain keeps its [b, 1, ...] contract.
    batch = make_hand_batch(2, 3, IMG)
    out = net(batch["img"], batch["bbox"], batch["focal"], batch["princpt"], batch["timestamp"])
    assert out.mano.pose.shape == (2, 1, 48)
    with pytest.raises(ValueError, match="finger_token needs joint_mlp"):
        PoseNet("stage1", backbone=CNN_BACKBONE, decoder={**CNN_DECODER, "joint_mlp": 0, "finger_token": 8},
                aux_keypoints=True)


def test_joint_hint_replaces_the_heatmap_joints_of_the_chosen_frames_only():
    """PoseNet's joint_hint (training on noisy GT 2D) changes exactly the chosen frames' tokens, to what the
    decoder gives for those joints."""
    net = cnn_net("stage1")
    batch = make_hand_batch(3, 1, IMG, seed=4)
    inputs = (batch["img"], batch["bbox"], batch["focal"], batch["princpt"], batch["timestamp"])
    use = torch.tensor([[True], [False], [True]])
    given = batch["joints_2d"]
    plain = net.predict_with_heatmaps(*inputs)[0].mano.pose
    hinted = net.predict_with_heatmaps(*inputs, joint_hint=(given, use))[0].mano.pose
    torch.testing.assert_close(hinted[1], plain[1])
    assert not torch.allclose(hinted[0], plain[0]) and not torch.allclose(hinted[2], plain[2])
    # The hinted frames equal a forward whose heatmap head put the joints exactly at the given positions.
    head = net.keypoint_head
    original = head.coordinates
    head.coordinates = lambda log_heatmaps: given[:, 0].to(log_heatmaps.dtype)
    try:
        exact = net.predict_with_heatmaps(*inputs)[0].mano.pose
    finally:
        head.coordinates = original
    torch.testing.assert_close(hinted[[0, 2]], exact[[0, 2]])


def test_freeze_heads_leaves_only_the_temporal_encoder_trainable():
    net = PoseNet("stage2", backbone=CNN_BACKBONE, decoder={**CNN_DECODER, "finger_token": 16}, temporal=TEMPORAL,
                  aux_keypoints=True, freeze_encoder=True, freeze_heads=True)
    trainable = {name.split(".")[0] for name, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"temporal"}


def test_relative_depths_are_the_joints_depth_behind_the_wrist_in_crop_sides_and_free_of_distance():
    """HeatmapKeypointHead.relative_depths against float64 numpy: (Z - Z_wrist) / Z_wrist * mean(f) / S; the wrist's
    is 0, and moving the hand along its ray (every point scaled by k, same camera) leaves them unchanged, as it leaves
    the 2D joints (relative_positions) unchanged: together they are the hand's 3D shape up to its distance."""
    rng = np.random.default_rng(0)
    joints = rng.normal(0, 0.04, (3, 21, 3)) + np.array([0.05, -0.02, 0.5])
    focal = np.array([[300.0, 310.0], [250.0, 250.0], [400.0, 390.0]])
    z = joints[..., 2]
    ref = (z - z[:, :1]) / z[:, :1] * focal.mean(-1, keepdims=True) / IMG
    got = HeatmapKeypointHead.relative_depths(torch.tensor(joints), torch.tensor(focal), IMG)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12)
    assert torch.all(got[:, 0] == 0)
    far = HeatmapKeypointHead.relative_depths(torch.tensor(joints * 1.7), torch.tensor(focal), IMG)
    torch.testing.assert_close(far, got)


def test_joint_depth_head_reads_each_joints_depth_map_under_its_heatmap_and_feeds_the_joint_mlp():
    """decoder.joint_depth: the heatmap head's depth of joint j is its depth map averaged under its heatmap (explicit
    sum over cells); the joint MLP takes (u, v, depth) per joint, so the finger token changes with the depths; the loss
    term is the mean absolute difference to relative_depths of the GT, and a weight without depths is an error."""
    torch.manual_seed(0)
    decoder = {**CNN_DECODER, "finger_token": 16, "joint_depth": True}
    net = PoseNet("stage1", backbone=CNN_BACKBONE, decoder=decoder, aux_keypoints=True).eval()
    head, dec = net.keypoint_head, net.decoder
    assert dec.joint_mlp_net[0].in_features == 21 * 3
    dense = torch.randn(2, net.backbone.dense_dim, IMG // 4, IMG // 4)
    log_hm, depths = head.maps(dense)
    maps = head.depth_maps(head.logits[:-1](dense)).flatten(2)
    ref = torch.stack([torch.stack([(log_hm[n, j].exp() * maps[n, j]).sum() for j in range(21)]) for n in range(2)])
    torch.testing.assert_close(depths, ref)
    torch.testing.assert_close(log_hm, head.log_heatmaps(dense))
    features = head.joint_features(dense, log_hm, depths=depths)
    assert features.shape == (2, 21, net.backbone.dense_dim + 3)
    torch.testing.assert_close(features[..., -1], depths)
    positions = features[..., -3:]
    other = positions.clone()
    other[..., 2] += 0.3
    assert not torch.allclose(dec.lift_token(positions), dec.lift_token(other))
    with pytest.raises(ShapeError):
        dec.lift_token(positions[..., :2])
    batch = make_hand_batch(3, 1, IMG, seed=5)
    pred, keypoints, log_hm, depths = net.predict_with_heatmaps(batch["img"], batch["bbox"], batch["focal"],
                                                                batch["princpt"], batch["timestamp"])
    assert depths.shape == (3, 1, 21)
    loss = HandPoseLoss(weights={"joint_depth": 1.0})
    out = loss(pred, batch, net.translation, joint_depths=depths)
    target = HeatmapKeypointHead.relative_depths(batch["joints_cam"][:, -1:], batch["focal"][:, -1:], IMG)
    torch.testing.assert_close(out["terms"]["joint_depth"], (depths - target).abs().mean())
    with pytest.raises(ValueError, match="joint_depth"):
        loss(pred, batch, net.translation)
    with pytest.raises(ValueError, match="joint_depth"):
        PoseNet("stage1", backbone=CNN_BACKBONE, decoder=decoder, aux_keypoints=False)
    # "aux": the head reads the depths for their loss term; the joint MLP keeps (u, v) and ignores them.
    torch.manual_seed(0)
    aux = PoseNet("stage1", backbone=CNN_BACKBONE, decoder={**decoder, "joint_depth": "aux"}, aux_keypoints=True).eval()
    assert aux.decoder.joint_mlp_net[0].in_features == 21 * 2
    out = aux.predict_with_heatmaps(batch["img"], batch["bbox"], batch["focal"], batch["princpt"], batch["timestamp"])
    assert out[3].shape == (3, 1, 21)
    frame_inputs = [batch[k] for k in ("img", "bbox", "focal", "princpt")]
    before = aux.encode_frames(*frame_inputs)
    with torch.no_grad():
        aux.keypoint_head.depth_maps.bias.add_(1.0)  # other depths, the same hand tokens
    after = aux.predict_with_heatmaps(batch["img"], batch["bbox"], batch["focal"], batch["princpt"],
                                      batch["timestamp"])[3]
    torch.testing.assert_close(aux.encode_frames(*frame_inputs), before)
    torch.testing.assert_close(after, out[3] + 1.0)
    with pytest.raises(ValueError, match="joint_depth"):
        PoseNet("stage1", backbone=CNN_BACKBONE, decoder={**decoder, "joint_depth": "depth"}, aux_keypoints=True)


def test_finger_features_start_at_zero_and_then_add_the_pooled_joint_features_to_the_finger_token():
    """decoder.finger_features: zero-initialised, so the hand token equals the position-only one at start; with
    non-zero weights the finger token depends on the pooled features; Stage 2's frozen encoder freezes it."""
    torch.manual_seed(0)
    plain = PoseNet("stage1", backbone=CNN_BACKBONE, decoder={**CNN_DECODER, "finger_token": 16},
                    aux_keypoints=True).eval()
    torch.manual_seed(0)
    net = PoseNet("stage1", backbone=CNN_BACKBONE, decoder={**CNN_DECODER, "finger_token": 16, "finger_features": 8},
                  aux_keypoints=True).eval()
    net.load_state_dict(plain.state_dict(), strict=False)
    batch = make_hand_batch(2, 1, IMG, seed=6)
    args = (batch["img"], batch["bbox"], batch["focal"], batch["princpt"])
    torch.testing.assert_close(net.encode_frames(*args), plain.encode_frames(*args))
    torch.nn.init.normal_(net.decoder.finger_feature_net[-1].weight)
    changed = net.encode_frames(*args)
    dim = net.decoder.dim
    torch.testing.assert_close(changed[..., :dim], plain.encode_frames(*args)[..., :dim])
    assert not torch.allclose(changed[..., dim:], plain.encode_frames(*args)[..., dim:])
    frozen = PoseNet("stage2", backbone=CNN_BACKBONE, decoder={**CNN_DECODER, "finger_token": 16, "finger_features": 8},
                     temporal=TEMPORAL, aux_keypoints=True, freeze_encoder=True)
    assert not any(p.requires_grad for p in frozen.decoder.finger_feature_net.parameters())
    with pytest.raises(ValueError, match="finger_features needs finger_token"):
        PoseNet("stage1", backbone=CNN_BACKBONE, decoder={**CNN_DECODER, "finger_features": 8}, aux_keypoints=True)


def test_recency_weighted_window_average_follows_the_timestamps():
    """temporal.average_tau: with the gate at 1 the refined token is sum_t w_t token_t, w_t proportional to
    exp(-|t - t_last| / tau) per channel (explicit float64 reference); a frame after a long gap counts for almost
    nothing; tau is learnt (it gets a gradient), and a non-positive start is an error."""
    from handpose.models import TemporalEncoder

    torch.manual_seed(0)
    enc = TemporalEncoder(8, heads=2, gate_scale=1.0, average_tau=0.1).eval()
    tokens = torch.randn(2, 4, 8)
    ts = torch.tensor([[0.0, 1 / 30, 2 / 30, 3 / 30], [0.0, 0.5, 0.5 + 1 / 30, 0.5 + 2 / 30]])  # a gap in sample 1
    with torch.no_grad():
        enc.average_gate.fill_(1.0)
        enc.log_tau[4:] = np.log(0.02)  # half the channels forget faster
        got = enc(tokens, ts)[:, 0]
    tau = enc.log_tau.detach().double().exp()  # [d]
    age = (ts[:, -1:] - ts).double()[..., None]  # [b, t, 1]
    w = np.exp(-(age / tau).numpy())
    w /= w.sum(axis=1, keepdims=True)
    ref = (w * tokens.double().numpy()).sum(axis=1)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-6)
    assert w[1, 0, 0] < 1e-2 < w[0, 0, 0]  # the frame before the gap barely counts
    enc.train()
    enc.average_gate.data.fill_(1.0)
    enc(tokens, ts).sum().backward()
    assert enc.log_tau.grad is not None and enc.log_tau.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="average_tau"):
        TemporalEncoder(8, heads=2, average_tau=0.0)


def test_last_frame_channels_pass_through_and_the_rest_is_refined():
    """temporal.last_frame_channels=k: the token's last k channels are the last frame's whatever the window; the others
    still follow it (gate 1: the window mean)."""
    from handpose.models import TemporalEncoder

    torch.manual_seed(0)
    enc = TemporalEncoder(8, heads=2, last_frame_channels=3).eval()
    tokens, ts = torch.randn(2, 5, 8), torch.arange(5.0).expand(2, 5) / 30
    with torch.no_grad():
        enc.average_gate.fill_(1.0)
        torch.nn.init.normal_(enc.out.weight)
        got = enc(tokens, ts)[:, 0]
    assert torch.equal(got[:, 5:], tokens[:, -1, 5:])
    assert not torch.allclose(got[:, :5], tokens[:, -1, :5])
    with pytest.raises(ValueError, match="last_frame_channels"):
        TemporalEncoder(8, heads=2, last_frame_channels=9)


def test_temporal_block_attention_equals_torch_multihead_attention():
    """TemporalBlock computes its cross-attention directly from nn.MultiheadAttention's weights (cheaper per streamed
    frame): the same values as the module itself, and gradients reach its projections."""
    from handpose.models.temporal import TemporalBlock

    torch.manual_seed(0)
    block = TemporalBlock(32, 4, 2.0, 0.0).eval()
    query, context = torch.randn(3, 1, 32), torch.randn(3, 7, 32)
    expected = block.attn(query, context, context, need_weights=False)[0]
    torch.testing.assert_close(block._attend(query, context), expected)
    block.train()
    block(query, context).sum().backward()
    assert block.attn.in_proj_weight.grad.abs().sum() > 0 and block.attn.out_proj.weight.grad.abs().sum() > 0

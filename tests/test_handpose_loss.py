"""HandPoseLoss: last-frame-only supervision, exact shapes, FK on one frame, inputs never modified.

Regressions of Stage 2's "predict only the last frame" contract: broadcasting [b,7,48] against [b,1,48],
FK on all frames, `trans_pred` scaled in place.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from common.mano import ManoLayer
from common.shapes import ShapeError
from handpose.loss import LOSS_TERMS, HandPoseLoss, bin_target, hand_scale
from handpose.models import HandPrediction, ManoParams, TranslationBins

TRANS_BINS = {"x": {"min": -0.3, "max": 0.3, "num": 61}, "y": {"min": -0.3, "max": 0.3, "num": 61},
              "z": {"min": 0.2, "max": 1.5, "num": 131}}
BINS = TranslationBins(TRANS_BINS)  # camera space: the bins are MANO trans in metres
CENTERS = BINS.centers


def project_np(points: np.ndarray, focal: np.ndarray, princpt: np.ndarray) -> np.ndarray:
    """Pinhole projection in float64 numpy (independent of handpose.loss.project)."""
    return points[..., :2] / points[..., 2:] * focal[..., None, :] + princpt[..., None, :]


def make_hand_batch(b: int, t: int, img_size: int = 32, seed: int = 0, mano: ManoLayer | None = None) -> dict:
    """A batch in the data module's layout whose joints, 2D joints and MANO parameters agree exactly."""
    g = torch.Generator().manual_seed(seed)
    mano = mano or ManoLayer()
    pose = 0.3 * torch.randn(b, t, 48, generator=g)
    shape = 0.5 * torch.randn(b, t, 10, generator=g)
    trans = torch.cat([0.2 * torch.rand(b, t, 2, generator=g) - 0.1, 0.4 + 0.5 * torch.rand(b, t, 1, generator=g)], -1)
    with torch.no_grad():
        joints_cam = mano(pose, shape, trans).joints
    focal = img_size * (2.0 + torch.rand(b, t, 2, generator=g))
    princpt = img_size / 2 - focal * joints_cam[..., 0, :2] / joints_cam[..., 0, 2:]  # wrist near the centre
    joints_2d = torch.from_numpy(project_np(joints_cam.double().numpy(), focal.double().numpy(),
                                            princpt.double().numpy())).float()
    box_size = 100 + 50 * torch.rand(b, t, 1, generator=g)
    corner = 300 * torch.rand(b, t, 2, generator=g)
    scale = img_size / box_size
    return {
        "img": torch.randn(b, t, 3, img_size, img_size, generator=g),
        "bbox": torch.cat([corner, corner + box_size], -1),
        "focal": focal,
        "princpt": princpt,
        "orig_focal": focal / scale,
        "orig_princpt": princpt / scale + corner,
        "timestamp": torch.cumsum(torch.full((b, t), 1 / 30) * (1 + torch.randint(0, 3, (b, t), generator=g)), 1),
        "mano_pose": pose,
        "mano_shape": shape,
        "mano_trans": trans,
        "joints_cam": joints_cam,
        "joints_2d": joints_2d,
        "valid": torch.ones(b, t, dtype=torch.bool),
        "hand_side": torch.zeros(b, t),
    }


def prediction_from(pose, shape, trans, sigma: float = 0.0) -> HandPrediction:
    """A prediction whose heatmaps are the (log) classification targets of `trans`."""
    heatmaps = tuple(torch.log(bin_target(trans[..., i], CENTERS[i], sigma).clamp(min=1e-12)) for i in range(3))
    return HandPrediction(ManoParams(pose, shape, trans), heatmaps)


def gt_prediction(batch: dict) -> HandPrediction:
    return prediction_from(batch["mano_pose"][:, -1:], batch["mano_shape"][:, -1:], batch["mano_trans"][:, -1:])


def noisy_prediction(batch: dict, seed: int = 1) -> HandPrediction:
    g = torch.Generator().manual_seed(seed)
    b = batch["img"].shape[0]
    pose = batch["mano_pose"][:, -1:] + 0.2 * torch.randn(b, 1, 48, generator=g)
    shape = batch["mano_shape"][:, -1:] + 0.3 * torch.randn(b, 1, 10, generator=g)
    logits = tuple(torch.randn(b, 1, len(c), generator=g) for c in CENTERS)
    heatmaps = tuple(torch.log_softmax(x, -1) for x in logits)
    trans = torch.stack([(h.exp() * c).sum(-1) for h, c in zip(heatmaps, CENTERS)], -1)
    return HandPrediction(ManoParams(pose, shape, trans), heatmaps)


@pytest.fixture(scope="module")
def mano() -> ManoLayer:
    return ManoLayer()


@pytest.fixture(scope="module")
def loss_fn() -> HandPoseLoss:
    return HandPoseLoss(heatmap_sigma=0.0)


@pytest.mark.parametrize("t", [1, 7])
def test_perfect_prediction_has_zero_geometric_terms(loss_fn, mano, t):
    batch = make_hand_batch(4, t, mano=mano)
    out = loss_fn(gt_prediction(batch), batch, BINS)
    for name in ("pose", "shape", "joints", "verts", "joints_2d"):
        assert out["terms"][name].item() < 1e-5, name
    # camera-space outputs reproduce the GT built independently (MANO(pose, shape) + trans)
    torch.testing.assert_close(out["joints_cam_pred"], batch["joints_cam"][:, -1:], atol=1e-5, rtol=0)
    # two-hot target: expectation of the heatmap is the GT translation
    torch.testing.assert_close(out["trans_pred_scaled"], batch["mano_trans"][:, -1:], atol=1e-6, rtol=0)


def test_seed_bug_all_frame_predictions_raise(loss_fn, mano):
    """[b, 7, ...] predictions against [b, 1, ...] ground truth raise instead of broadcasting."""
    batch = make_hand_batch(3, 7, mano=mano)
    pred = prediction_from(batch["mano_pose"], batch["mano_shape"], batch["mano_trans"])
    with pytest.raises(ShapeError, match=r"\(3, 7, 48\).*\(3, 1, 48\)"):
        loss_fn(pred, batch, BINS)


def test_heatmap_width_must_match_bins(loss_fn, mano):
    batch = make_hand_batch(2, 1, mano=mano)
    (pose, shape, trans), heatmaps = gt_prediction(batch)
    short = (heatmaps[0][..., :-1], *heatmaps[1:])
    with pytest.raises(ShapeError):
        loss_fn(HandPrediction(ManoParams(pose, shape, trans), short), batch, BINS)


def test_fk_runs_on_the_last_frame_only(mano):
    loss_fn = HandPoseLoss()
    seen = []
    forward = loss_fn.mano.forward

    def spy(pose, shape, trans=None):
        seen.append((tuple(pose.shape), tuple(shape.shape)))
        return forward(pose, shape, trans)

    loss_fn.mano.forward = spy
    b, t = 5, 7
    batch = make_hand_batch(b, t, mano=mano)
    out = loss_fn(noisy_prediction(batch), batch, BINS)
    assert seen and all(p == (b, 1, 48) and s == (b, 1, 10) for p, s in seen), seen
    assert out["verts_cam_pred"].shape == (b, 1, 778, 3)
    # the earlier frames of the ground truth do not matter at all
    scrambled = {k: v.clone() for k, v in batch.items()}
    for key in ("mano_pose", "mano_shape", "mano_trans", "joints_cam", "joints_2d", "focal", "princpt"):
        scrambled[key][:, :-1] = torch.randn_like(scrambled[key][:, :-1])
    again = loss_fn(noisy_prediction(batch), scrambled, BINS)
    assert torch.equal(out["loss"], again["loss"])


@pytest.mark.parametrize("norm_by_hand", [False, True])
def test_loss_never_modifies_its_inputs(mano, norm_by_hand):
    loss_fn = HandPoseLoss(norm_by_hand=norm_by_hand)
    batch = make_hand_batch(4, 3, mano=mano)
    pred = noisy_prediction(batch)
    pred_before = [x.clone() for x in (*pred.mano, *pred.log_heatmaps)]
    batch_before = {k: v.clone() for k, v in batch.items()}
    out = loss_fn(pred, batch, BINS)
    out["loss"].backward() if out["loss"].requires_grad else None
    for before, after in zip(pred_before, (*pred.mano, *pred.log_heatmaps)):
        assert torch.equal(before, after)
    for key, value in batch.items():
        assert torch.equal(batch_before[key], value), key
    if norm_by_hand:
        assert out["trans_pred_scaled"] is not pred.mano.trans
        assert not torch.equal(out["trans_pred_scaled"], pred.mano.trans)


def test_norm_by_hand_scales_a_new_tensor_consistently(mano):
    """With norm_by_hand the network predicts trans / hand scale; the scaled copy is back in metres."""
    loss_fn = HandPoseLoss(norm_by_hand=True, heatmap_sigma=0.0)
    batch = make_hand_batch(4, 2, mano=mano)
    scale = hand_scale(batch["joints_cam"][:, -1:], loss_fn.reference_scale)
    assert not torch.allclose(scale, torch.ones_like(scale), atol=1e-2)  # shapes differ from the mean hand
    trans_normalised = batch["mano_trans"][:, -1:] / scale[..., None]
    pred = prediction_from(batch["mano_pose"][:, -1:], batch["mano_shape"][:, -1:], trans_normalised)
    out = loss_fn(pred, batch, BINS)
    torch.testing.assert_close(out["trans_pred_scaled"], batch["mano_trans"][:, -1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["joints_cam_pred"], batch["joints_cam"][:, -1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["verts_cam_pred"], out["verts_cam_gt"], atol=1e-5, rtol=0)
    assert out["terms"]["joints_2d"].item() < 1e-5


def test_mean_hand_has_unit_scale(mano):
    loss_fn = HandPoseLoss(norm_by_hand=True)
    joints = mano(torch.zeros(1, 48), torch.zeros(1, 10), torch.tensor([[0.1, 0.0, 0.5]])).joints
    assert hand_scale(joints, loss_fn.reference_scale).item() == pytest.approx(1.0, abs=1e-6)


def test_invalid_frames_do_not_contribute(loss_fn, mano):
    batch = make_hand_batch(4, 2, mano=mano)
    batch["valid"][1, -1] = False
    batch["valid"][2, 0] = False  # not the supervised frame: ignored
    pred = noisy_prediction(batch)
    out = loss_fn(pred, batch, BINS)
    (pose, shape, trans), heatmaps = pred
    pose2 = pose.clone()
    pose2[1] += 1.0
    other = loss_fn(HandPrediction(ManoParams(pose2, shape, trans), heatmaps), batch, BINS)
    torch.testing.assert_close(out["loss"], other["loss"])
    pose2[2] += 1.0
    assert loss_fn(HandPrediction(ManoParams(pose2, shape, trans), heatmaps), batch, BINS)["loss"] > out["loss"]


def test_gradients_reach_every_prediction(loss_fn, mano):
    batch = make_hand_batch(3, 1, mano=mano)
    (pose, shape, _), heatmaps = noisy_prediction(batch)
    logits = [h.detach().clone().requires_grad_(True) for h in heatmaps]
    log_hm = tuple(torch.log_softmax(x, -1) for x in logits)
    trans = torch.stack([(h.exp() * c).sum(-1) for h, c in zip(log_hm, CENTERS)], -1)
    pose, shape = pose.clone().requires_grad_(True), shape.clone().requires_grad_(True)
    out = loss_fn(HandPrediction(ManoParams(pose, shape, trans), log_hm), batch, BINS)
    out["loss"].backward()
    for name, x in (("pose", pose), ("shape", shape), *((f"logits{i}", x) for i, x in enumerate(logits))):
        assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all(), name
    assert set(out["terms"]) == set(LOSS_TERMS)


@pytest.mark.parametrize("sigma", [0.0, 1.5])
def test_bin_target_is_a_distribution_centred_on_the_value(sigma):
    centers = torch.linspace(0.2, 1.5, 131, dtype=torch.float64)
    value = torch.tensor([0.2, 0.5234, 0.71, 1.5, 3.0, -1.0], dtype=torch.float64)
    target = bin_target(value, centers, sigma)
    torch.testing.assert_close(target.sum(-1), torch.ones(len(value), dtype=torch.float64))
    assert (target >= 0).all()
    expectation = (target * centers).sum(-1)
    clamped = value.clamp(0.2, 1.5)
    if sigma == 0.0:
        torch.testing.assert_close(expectation, clamped)
    else:  # symmetric Gaussian: exact away from the range ends
        torch.testing.assert_close(expectation[1:3], clamped[1:3])


def test_unknown_weight_is_an_error():
    with pytest.raises(KeyError, match="trans_l2"):
        HandPoseLoss(weights={"trans_l2": 1.0})


@pytest.mark.parametrize("detach", [True, False])
def test_shape_learns_only_from_its_own_term_when_detached_in_fk(mano, detach):
    weights = {name: 0.0 for name in LOSS_TERMS} | {"joints": 1.0, "verts": 1.0}
    loss_fn = HandPoseLoss(weights=weights, detach_shape_in_fk=detach)
    batch = make_hand_batch(3, 1, mano=mano)
    (pose, shape, trans), heatmaps = noisy_prediction(batch)
    shape = shape.clone().requires_grad_(True)
    loss_fn(HandPrediction(ManoParams(pose, shape, trans), heatmaps), batch, BINS)["loss"].backward()
    assert (shape.grad is None or not shape.grad.any()) if detach else shape.grad.abs().sum() > 0


def test_gt_root_fk_terms_supervise_articulation_only(mano):
    """gt_root_in_fk_terms: a wrong global orientation with the right fingers costs nothing in joints/verts (so the
    fingers are never bent to make up for it) but still shows in the pose term and in the camera-space outputs."""
    batch = make_hand_batch(4, 3, mano=mano)
    (pose, shape, trans), heatmaps = gt_prediction(batch)
    wrong_root = pose.clone()
    wrong_root[..., :3] = wrong_root[..., :3] + 0.5
    wrong_root.requires_grad_(True)
    pred = HandPrediction(ManoParams(wrong_root, shape, trans), heatmaps)
    articulation = HandPoseLoss(gt_root_in_fk_terms=True, weights={k: 0.0 for k in ("pose", "shape", "trans",
                                                                                    "joints_2d")})
    out = articulation(pred, batch, BINS)
    assert out["terms"]["joints"].item() < 1e-6 and out["terms"]["verts"].item() < 1e-6
    assert out["terms"]["pose"].item() > 0.01
    assert (out["joints_cam_pred"] - batch["joints_cam"][:, -1:]).abs().max() > 1e-2  # outputs use the prediction
    out["loss"].backward()
    assert wrong_root.grad[..., :3].abs().max() == 0  # the FK terms do not train the global orientation
    # the default (predicted root in FK) does see the orientation error through the joints
    assert HandPoseLoss()(pred, batch, BINS)["terms"]["joints"].item() > 1e-3


def test_outputs_are_not_aliases_of_the_prediction(mano):
    """Editing an output in place must not write into the caller's prediction."""
    batch = make_hand_batch(2, 1, mano=mano)
    (pose, shape, trans), heatmaps = gt_prediction(batch)
    before = trans.clone()
    out = HandPoseLoss()(HandPrediction(ManoParams(pose, shape, trans), heatmaps), batch, BINS)
    with torch.no_grad():
        out["trans_pred_scaled"].add_(1.0)
    assert torch.equal(trans, before)


def test_translation_outside_the_bins_is_counted_and_warned_once(mano, caplog):
    """A GT translation the bins cannot hold (its target is the edge bin) is counted and warned about once."""
    batch = make_hand_batch(4, 1, mano=mano)
    inside = gt_prediction(batch)
    loss = HandPoseLoss()
    with caplog.at_level(logging.WARNING, logger="handpose.loss"):
        loss(inside, batch, BINS)
    assert loss.num_trans_out_of_range == 0 and "outside the translation bins" not in caplog.text
    far = dict(batch, mano_trans=batch["mano_trans"].clone(), valid=batch["valid"].clone())
    far["mano_trans"][0, 0, 2] = 2.0   # z beyond 1.5 m
    far["mano_trans"][1, 0, 0] = -0.5  # x below -0.3 m
    far["mano_trans"][2, 0, 2] = 3.0
    far["valid"][2, 0] = False          # an invalid frame is not supervised: not counted
    with caplog.at_level(logging.WARNING, logger="handpose.loss"):
        loss(inside, far, BINS)
        loss(inside, far, BINS)
    assert loss.num_trans_out_of_range == 4
    assert caplog.text.count("outside the translation bins") == 1


def test_orient_term_is_the_orientation_error_in_joint_units(mano):
    """The ``orient`` term poses the ground-truth hand under the predicted global orientation: against scipy, it is
    the mean L1 between the root-relative GT joints rotated by R_pred R_gt^-1 and themselves, and against MANO's
    forward kinematics of the GT fingers and shape under the predicted root the same; wrong fingers do not change
    it, and it trains the global orientation only."""
    from scipy.spatial.transform import Rotation

    batch = make_hand_batch(4, 2, mano=mano, seed=3)
    (pose, shape, trans), heatmaps = gt_prediction(batch)
    g = torch.Generator().manual_seed(1)
    wrong = pose.clone()
    wrong[..., :3] = wrong[..., :3] + 0.4 * torch.randn(4, 1, 3, generator=g)   # orientation off by ~40 degrees
    wrong[..., 3:] = wrong[..., 3:] + 0.3 * torch.randn(4, 1, 45, generator=g)  # fingers off too
    wrong.requires_grad_(True)
    loss = HandPoseLoss(gt_root_in_fk_terms=True, weights={k: 0.0 for k in LOSS_TERMS if k != "orient"} | {"orient": 1})
    out = loss(HandPrediction(ManoParams(wrong, shape, trans), heatmaps), batch, BINS)

    gt = batch["joints_cam"][:, -1].double().numpy()
    rel = gt - gt[:, :1]
    r_pred = Rotation.from_rotvec(wrong[:, 0, :3].detach().double().numpy())
    r_gt = Rotation.from_rotvec(batch["mano_pose"][:, -1, :3].double().numpy())
    expected = np.mean([np.abs((r_pred[i] * r_gt[i].inv()).apply(rel[i]) - rel[i]).mean() for i in range(4)])
    assert out["terms"]["orient"].item() == pytest.approx(expected, rel=1e-4)
    with torch.no_grad():  # the same hand by forward kinematics: the GT fingers and shape under the predicted root
        fk = mano(torch.cat([wrong[:, 0, :3], batch["mano_pose"][:, -1, 3:]], -1), batch["mano_shape"][:, -1]).joints
    fk_rel = (fk - fk[:, :1]).double().numpy()
    assert out["terms"]["orient"].item() == pytest.approx(np.abs(fk_rel - rel).mean(), rel=1e-4)
    out["loss"].backward()
    assert wrong.grad[..., :3].abs().max() > 0 and wrong.grad[..., 3:].abs().max() == 0

    right_root = wrong.detach().clone()
    right_root[..., :3] = pose[..., :3]
    assert loss(HandPrediction(ManoParams(right_root, shape, trans), heatmaps), batch, BINS)["terms"]["orient"] < 1e-6
    assert HandPoseLoss()(HandPrediction(ManoParams(wrong, shape, trans), heatmaps), batch, BINS)["terms"]["orient"] == 0

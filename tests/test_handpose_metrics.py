"""HandPoseMetrics against a float64 numpy/scipy reference (FreiHAND evaluation: orthogonal_procrustes on
Frobenius-normalised sets, cKDTree F-score, trapezoid PCK AUC), across several update() calls and ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import orthogonal_procrustes
from scipy.spatial import cKDTree
from test_handpose_loss import make_hand_batch

from common.mano import ManoLayer
from handpose.metrics import METRIC_NAMES, HandPoseMetrics, mean_pose_baseline


def align_reference(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """FreiHAND's align_w_scale: pred aligned to gt (similarity, reflections allowed)."""
    gt_c, pred_c = gt - gt.mean(0), pred - pred.mean(0)
    s_gt, s_pred = np.linalg.norm(gt_c) + 1e-8, np.linalg.norm(pred_c) + 1e-8
    rot, s = orthogonal_procrustes(gt_c / s_gt, pred_c / s_pred)
    return (pred_c / s_pred) @ rot.T * s * s_gt + gt.mean(0)


def f_score_reference(gt: np.ndarray, pred: np.ndarray, th: float) -> float:
    recall = np.mean(cKDTree(pred).query(gt)[0] < th)
    precision = np.mean(cKDTree(gt).query(pred)[0] < th)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def metrics_reference(jp, jg, vp, vg) -> dict[str, float]:
    """Per-sample float64 loops; inputs [n, k, 3] numpy in metres; output in mm / ratios."""
    per = {name: [] for name in ("mpjpe", "pa_mpjpe", "mpvpe", "pa_mpvpe", "f5", "f15", "root_err")}
    pa_errors = []
    for a, b, c, d in zip(jp, jg, vp, vg):
        a_rel, b_rel, c_rel, d_rel = a - a[0], b - b[0], c - a[0], d - b[0]
        a_pa, c_pa = align_reference(b_rel, a_rel), align_reference(d_rel, c_rel)
        err = np.linalg.norm(a_pa - b_rel, axis=-1)
        pa_errors.append(err)
        per["mpjpe"].append(np.linalg.norm(a_rel - b_rel, axis=-1).mean() * 1000)
        per["pa_mpjpe"].append(err.mean() * 1000)
        per["mpvpe"].append(np.linalg.norm(c_rel - d_rel, axis=-1).mean() * 1000)
        per["pa_mpvpe"].append(np.linalg.norm(c_pa - d_rel, axis=-1).mean() * 1000)
        per["f5"].append(f_score_reference(d_rel, c_pa, 0.005))
        per["f15"].append(f_score_reference(d_rel, c_pa, 0.015))
        per["root_err"].append(np.linalg.norm(a[0] - b[0]) * 1000)
    out = {k: float(np.mean(v)) for k, v in per.items()}
    thresholds = np.linspace(0.0, 0.05, 100)
    errors = np.concatenate(pa_errors)
    pck = np.array([np.mean(errors <= t) for t in thresholds])
    out["auc"] = float(np.trapezoid(pck, thresholds) / 0.05)
    return out


@pytest.fixture(scope="module")
def hands() -> tuple[torch.Tensor, ...]:
    """GT and predicted hands (MANO), float32 [n, k, 3], with one mirrored and one scaled+rotated prediction."""
    mano = ManoLayer()
    g = torch.Generator().manual_seed(0)
    n = 12
    pose, shape = 0.4 * torch.randn(n, 48, generator=g), torch.randn(n, 10, generator=g)
    trans = torch.cat([0.1 * torch.randn(n, 2, generator=g), 0.5 + 0.3 * torch.rand(n, 1, generator=g)], -1)
    with torch.no_grad():
        gt = mano(pose, shape, trans)
        noisy = mano(pose + 0.15 * torch.randn(n, 48, generator=g), shape + 0.5 * torch.randn(n, 10, generator=g),
                     trans + 0.02 * torch.randn(n, 3, generator=g))
    jp, vp = noisy.joints.clone(), noisy.vertices.clone()
    mirror = torch.tensor([-1.0, 1.0, 1.0])
    jp[0], vp[0] = gt.joints[0] * mirror, gt.vertices[0] * mirror  # PA (reflections allowed) undoes this
    rot = torch.linalg.qr(torch.randn(3, 3, generator=g)).Q
    rot = rot * torch.sign(torch.det(rot))
    jp[1], vp[1] = 1.3 * gt.joints[1] @ rot.T + 0.05, 1.3 * gt.vertices[1] @ rot.T + 0.05
    return jp, gt.joints, vp, gt.vertices


def test_metrics_match_the_scipy_reference_over_several_updates(hands):
    jp, jg, vp, vg = hands
    metric = HandPoseMetrics()
    for part in (slice(0, 5), slice(5, 6), slice(6, 12)):  # uneven update sizes
        metric.update(jp[part], jg[part], vp[part], vg[part])
    result = metric.compute()
    reference = metrics_reference(*(x.double().numpy() for x in hands))
    assert set(result) == set(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert result[name].item() == pytest.approx(reference[name], rel=1e-4, abs=1e-4), name
    assert 0 < reference["f5"] < reference["f15"] <= 1  # the data exercise the F-score, not a corner case


def test_similarity_transforms_are_removed_by_procrustes(hands):
    _, jg, _, vg = hands
    metric = HandPoseMetrics()
    metric.update(jg[:2], jg[:2], vg[:2], vg[:2])
    perfect = metric.compute()
    assert perfect["mpjpe"] == 0 and perfect["root_err"] == 0 and perfect["f5"] == 1
    assert perfect["auc"] == pytest.approx(0.995, abs=1e-3)  # only the 0 mm threshold misses (errors ~1e-17)
    jp, _, vp, _ = hands
    metric.reset()
    metric.update(jp[1:2], jg[1:2], vp[1:2], vg[1:2])  # scaled, rotated, shifted copy of the GT
    moved = metric.compute()
    assert moved["pa_mpjpe"] < 1e-3 and moved["pa_mpvpe"] < 1e-3 and moved["mpjpe"] > 10


def test_states_merge_like_ddp_ranks(hands):
    """Two ranks' sum states merged give the single-process result (what dist_reduce_fx='sum' does)."""
    jp, jg, vp, vg = hands
    whole, rank0, rank1 = HandPoseMetrics(), HandPoseMetrics(), HandPoseMetrics()
    whole.update(jp, jg, vp, vg)
    rank0.update(jp[:7], jg[:7], vp[:7], vg[:7])
    rank1.update(jp[7:], jg[7:], vp[7:], vg[7:])
    rank0.merge_state(rank1)
    merged, single = rank0.compute(), whole.compute()
    for name in METRIC_NAMES:
        torch.testing.assert_close(merged[name], single[name], atol=1e-5, rtol=1e-6)


def test_leading_dims_are_flattened(hands):
    jp, jg, vp, vg = hands
    flat, nested = HandPoseMetrics(), HandPoseMetrics()
    flat.update(jp, jg, vp, vg)
    nested.update(jp[:, None], jg[:, None], vp[:, None], vg[:, None])  # [b, 1, k, 3] as the loss returns
    for name in METRIC_NAMES:
        assert torch.equal(flat.compute()[name], nested.compute()[name])


def test_mean_pose_baseline_is_exact_on_constant_data_and_worse_on_varied_data():
    batches = [make_hand_batch(4, 2, seed=s) for s in range(3)]
    constant = []
    for batch in batches:
        same = {k: v.clone() for k, v in batch.items()}
        for key in ("mano_pose", "mano_shape", "mano_trans", "joints_cam"):
            same[key][:] = batches[0][key][0, -1]
        constant.append(same)
    exact = mean_pose_baseline(constant, constant)
    assert exact["mpjpe"] < 1e-3 and exact["root_err"] < 1e-3
    varied = mean_pose_baseline(batches[:2], batches[2:])
    assert varied["mpjpe"] > 5 and varied["pa_mpjpe"] > 1

"""Hand pose evaluation metrics (mm): MPJPE, PA-MPJPE, MPVPE, PA-MPVPE, F@5/F@15 mm, root error, PCK AUC.

Follows the FreiHAND / HO3D evaluation: root-relative at the wrist; Procrustes with scale on Frobenius-
normalised sets (as ``scipy.linalg.orthogonal_procrustes``, reflections allowed); F-score and AUC on the
aligned sets. A torchmetrics ``Metric`` with summed float64 states, so it is exact under DDP.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping

import torch
from torchmetrics import Metric

from common.mano import JOINT_NAMES_21, ManoLayer
from common.rotations import axis_angle_to_matrix, matrix_to_axis_angle, nearest_rotation
from common.shapes import assert_same_shape, expect_shape
from handpose.models.decoder import NUM_POSE_JOINTS, SHAPE_DIM, ManoParams

WRIST = JOINT_NAMES_21.index("wrist")
F_THRESHOLDS_M = (0.005, 0.015)
PCK_MAX_M = 0.05
PCK_STEPS = 100  # thresholds linspace(0, 50 mm, 100), as the FreiHAND evaluation
METRIC_NAMES = ("mpjpe", "pa_mpjpe", "mpvpe", "pa_mpvpe", "f5", "f15", "root_err", "auc")
_NN_CHUNK = 32  # samples per pairwise-distance block in the F-score


def procrustes_align(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """pred, gt [n, k, 3] -> pred aligned to gt [n, k, 3] by the best similarity transform.

    Both sets are centred and scaled to unit Frobenius norm, the orthogonal matrix (reflections allowed) and
    scale come from the SVD of ``gt^T pred`` (scipy's orthogonal_procrustes), then gt's norm and centre are
    restored. Computed in float64.
    """
    assert_same_shape(pred, gt, "pred", "gt")
    pred, gt = pred.double(), gt.double()
    mu_pred, mu_gt = pred.mean(dim=1, keepdim=True), gt.mean(dim=1, keepdim=True)
    pred_c, gt_c = pred - mu_pred, gt - mu_gt
    norm_pred = pred_c.flatten(1).norm(dim=1)[:, None, None] + 1e-8
    norm_gt = gt_c.flatten(1).norm(dim=1)[:, None, None] + 1e-8
    pred_n, gt_n = pred_c / norm_pred, gt_c / norm_gt
    u, s, vh = torch.linalg.svd(gt_n.transpose(1, 2) @ pred_n)  # gt_n @ R ~= pred_n with R = u vh
    rotation = u @ vh
    scale = s.sum(dim=-1)[:, None, None]
    return (pred_n @ rotation.transpose(1, 2)) * scale * norm_gt + mu_gt


def f_score(pred: torch.Tensor, gt: torch.Tensor, threshold: float) -> torch.Tensor:
    """pred [n, k, 3], gt [n, m, 3] -> [n]: harmonic mean of precision and recall of nearest-neighbour distances."""
    return f_scores(pred, gt, (threshold,))[:, 0]


def f_scores(pred: torch.Tensor, gt: torch.Tensor, thresholds: tuple[float, ...]) -> torch.Tensor:
    """:func:`f_score` at several thresholds from one set of nearest-neighbour distances -> [n, len(thresholds)]."""
    scores = []
    for p, g in zip(pred.split(_NN_CHUNK), gt.split(_NN_CHUNK)):
        dist = torch.cdist(p.double(), g.double())  # [c, k, m]
        to_gt, to_pred = dist.min(dim=2).values, dist.min(dim=1).values  # [c, k], [c, m]
        per_threshold = []
        for threshold in thresholds:
            precision = (to_gt < threshold).double().mean(dim=1)
            recall = (to_pred < threshold).double().mean(dim=1)
            denom = precision + recall
            per_threshold.append(torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12),
                                             torch.zeros_like(denom)))
        scores.append(torch.stack(per_threshold, dim=1))
    return torch.cat(scores)


class HandPoseMetrics(Metric):
    """Accumulates per-sample errors over ``update`` calls (and ranks); ``compute`` returns mm / ratios.

    ``update(joints_pred, joints_gt, verts_pred, verts_gt)`` takes camera-space metres,
    joints [n, 21, 3] and vertices [n, V, 3]; leading dims beyond ``n`` (e.g. ``[b, 1]``) are flattened.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("mpjpe", "pa_mpjpe", "mpvpe", "pa_mpvpe", "f5", "f15", "root_err"):
            self.add_state(f"sum_{name}", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pck_hits", torch.zeros(PCK_STEPS, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_samples", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_joints", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.register_buffer("pck_thresholds", torch.linspace(0.0, PCK_MAX_M, PCK_STEPS, dtype=torch.float64),
                             persistent=False)

    def update(
        self, joints_pred: torch.Tensor, joints_gt: torch.Tensor, verts_pred: torch.Tensor, verts_gt: torch.Tensor
    ) -> None:
        assert_same_shape(joints_pred, joints_gt, "joints_pred", "joints_gt")
        assert_same_shape(verts_pred, verts_gt, "verts_pred", "verts_gt")
        jp, jg = joints_pred.detach().flatten(0, -3).double(), joints_gt.detach().flatten(0, -3).double()
        vp, vg = verts_pred.detach().flatten(0, -3).double(), verts_gt.detach().flatten(0, -3).double()
        n = jp.shape[0]
        expect_shape(jp, (n, len(JOINT_NAMES_21), 3), "joints")
        expect_shape(vp, (n, None, 3), "verts")

        root_pred, root_gt = jp[:, WRIST : WRIST + 1], jg[:, WRIST : WRIST + 1]
        jp_rel, jg_rel, vp_rel, vg_rel = jp - root_pred, jg - root_gt, vp - root_pred, vg - root_gt
        jp_pa, vp_pa = procrustes_align(jp_rel, jg_rel), procrustes_align(vp_rel, vg_rel)
        pa_joint_err = (jp_pa - jg_rel).norm(dim=-1)  # [n, 21]

        self.sum_mpjpe += (jp_rel - jg_rel).norm(dim=-1).mean(dim=1).sum()
        self.sum_pa_mpjpe += pa_joint_err.mean(dim=1).sum()
        self.sum_mpvpe += (vp_rel - vg_rel).norm(dim=-1).mean(dim=1).sum()
        self.sum_pa_mpvpe += (vp_pa - vg_rel).norm(dim=-1).mean(dim=1).sum()
        f5, f15 = f_scores(vp_pa, vg_rel, F_THRESHOLDS_M).sum(dim=0)
        self.sum_f5 += f5
        self.sum_f15 += f15
        self.sum_root_err += (root_pred - root_gt).norm(dim=-1).sum()
        self.pck_hits += (pa_joint_err.flatten()[:, None] <= self.pck_thresholds).double().sum(dim=0)
        self.num_samples += n
        self.num_joints += pa_joint_err.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.num_samples.clamp(min=1)
        mm = {name: getattr(self, f"sum_{name}") / n * 1000.0
              for name in ("mpjpe", "pa_mpjpe", "mpvpe", "pa_mpvpe", "root_err")}
        pck = self.pck_hits / self.num_joints.clamp(min=1)
        auc = torch.trapezoid(pck, self.pck_thresholds) / PCK_MAX_M
        out = {**mm, "f5": self.sum_f5 / n, "f15": self.sum_f15 / n, "auc": auc}
        return {name: out[name].float() for name in METRIC_NAMES}


def mean_mano_params(batches: Iterable[Mapping[str, torch.Tensor]], max_batches: int | None = None) -> ManoParams:
    """Mean MANO parameters of the valid last frames of ``batches``: pose [48], shape [10], trans [3].

    Rotations are averaged as matrices and projected back onto the nearest rotation (the chordal L2 mean,
    scipy's ``Rotation.mean``; unlike averaging axis-angles it is not fooled by angles near pi).
    """
    rot_sum = torch.zeros(NUM_POSE_JOINTS, 3, 3, dtype=torch.float64)
    shape_sum = torch.zeros(SHAPE_DIM, dtype=torch.float64)
    trans_sum = torch.zeros(3, dtype=torch.float64)
    count = 0
    for batch in itertools.islice(batches, max_batches):
        valid = batch["valid"][:, -1].bool()
        pose = batch["mano_pose"][:, -1][valid].double().unflatten(-1, (NUM_POSE_JOINTS, 3))
        rot_sum += axis_angle_to_matrix(pose).sum(dim=0)
        shape_sum += batch["mano_shape"][:, -1][valid].double().sum(dim=0)
        trans_sum += batch["mano_trans"][:, -1][valid].double().sum(dim=0)
        count += int(valid.sum())
    if count == 0:
        raise ValueError("mean_mano_params: no valid frame in the batches")
    mean_rot = nearest_rotation(rot_sum / count)
    pose = matrix_to_axis_angle(mean_rot).flatten()
    return ManoParams(pose.float(), (shape_sum / count).float(), (trans_sum / count).float())


def mean_pose_baseline(
    train_batches: Iterable[Mapping[str, torch.Tensor]],
    eval_batches: Iterable[Mapping[str, torch.Tensor]],
    mano: ManoLayer | None = None,
) -> dict[str, float]:
    """Metrics of predicting the training set's mean last-frame MANO pose, shape and translation everywhere.

    The floor a trained model must beat (means from :func:`mean_mano_params`). GT joints are ``joints_cam``;
    GT vertices are MANO(GT parameters) with the same ``mano`` layer.
    """
    mano = mano or ManoLayer()
    mean = mean_mano_params(train_batches)
    metric = HandPoseMetrics()
    with torch.no_grad():
        for batch in eval_batches:
            valid = batch["valid"][:, -1].bool()
            n = int(valid.sum())
            if n == 0:
                continue
            pred = mano(mean.pose.expand(n, -1), mean.shape.expand(n, -1), mean.trans.expand(n, -1))
            gt = mano(batch["mano_pose"][:, -1][valid], batch["mano_shape"][:, -1][valid],
                      batch["mano_trans"][:, -1][valid])
            metric.update(pred.joints, batch["joints_cam"][:, -1][valid], pred.vertices, gt.vertices)
    return {k: float(v) for k, v in metric.compute().items()}


def root_relative(joints: torch.Tensor) -> torch.Tensor:
    """joints [..., 21, 3] -> the same relative to the wrist."""
    return joints - joints[..., WRIST : WRIST + 1, :]


def acceleration_error(
    seq_index: torch.Tensor, frame_index: torch.Tensor, joints_pred: torch.Tensor, joints_gt: torch.Tensor
) -> tuple[float, int]:
    """Acceleration error (mm / frame^2) of consecutive per-frame predictions, as in the video hand / body pose
    literature: for every frame ``f`` of a sequence whose neighbours ``f - 1`` and ``f + 1`` are also among the
    samples, the second difference of the root-relative joints, predicted minus GT, its norm averaged over
    joints and such triples. Frames are the stored frames of a sequence (a dropped frame is not one).

    seq_index, frame_index [n] (int), joints_pred / joints_gt [n, 21, 3] metres -> (error in mm, number of
    triples); ``nan`` when there is no triple.
    """
    n = seq_index.shape[0]
    expect_shape(frame_index, (n,), "frame_index")
    expect_shape(joints_pred, (n, len(JOINT_NAMES_21), 3), "joints_pred")
    assert_same_shape(joints_pred, joints_gt, "joints_pred", "joints_gt")
    position = {(int(s), int(f)): i for i, (s, f) in enumerate(zip(seq_index.tolist(), frame_index.tolist()))}
    triples = [(position[(s, f - 1)], i, position[(s, f + 1)]) for (s, f), i in position.items()
               if (s, f - 1) in position and (s, f + 1) in position]
    if not triples:
        return float("nan"), 0
    prev, mid, nxt = (torch.tensor(col) for col in zip(*triples))
    rel_pred, rel_gt = root_relative(joints_pred.double()), root_relative(joints_gt.double())

    def accel(x: torch.Tensor) -> torch.Tensor:
        return x[nxt] - 2 * x[mid] + x[prev]

    error = (accel(rel_pred) - accel(rel_gt)).norm(dim=-1).mean()
    return float(error) * 1000.0, len(triples)


def joint_metrics(joints_pred: torch.Tensor, joints_gt: torch.Tensor) -> dict[str, float]:
    """PA-MPJPE, root-relative MPJPE and root error (mm) of joints [n, 21, 3] (metres), as
    :class:`HandPoseMetrics` computes them, without the vertex metrics; empty when n is 0."""
    n = joints_pred.shape[0]
    if n == 0:
        return {}
    assert_same_shape(joints_pred, joints_gt, "joints_pred", "joints_gt")
    jp, jg = joints_pred.double(), joints_gt.double()
    rel_pred, rel_gt = root_relative(jp), root_relative(jg)
    aligned = procrustes_align(rel_pred, rel_gt)
    return {"pa_mpjpe": float((aligned - rel_gt).norm(dim=-1).mean()) * 1000.0,
            "mpjpe": float((rel_pred - rel_gt).norm(dim=-1).mean()) * 1000.0,
            "root_err": float((jp[:, WRIST] - jg[:, WRIST]).norm(dim=-1).mean()) * 1000.0}


def metrics_of(joints_pred: torch.Tensor, joints_gt: torch.Tensor, verts_pred: torch.Tensor,
               verts_gt: torch.Tensor) -> dict[str, float]:
    """:class:`HandPoseMetrics` of one set of samples (joints [n, 21, 3], verts [n, V, 3]) -> {name: value};
    empty when n is 0."""
    if joints_pred.shape[0] == 0:
        return {}
    metric = HandPoseMetrics()
    metric.update(joints_pred, joints_gt, verts_pred, verts_gt)
    return {k: float(v) for k, v in metric.compute().items()}

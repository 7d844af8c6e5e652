"""Hand pose training loss: supervises the LAST frame only, every term through one exact-shape check.

Predictions are ``[b, 1, ...]`` (PoseNet's contract); ground truth is sliced ``[:, -1:]``; forward kinematics
runs on that one frame. Metrics live in handpose.metrics; the network in handpose.models.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from common.mano import JOINT_NAMES_21, ManoLayer
from common.rotations import axis_angle_to_matrix
from common.shapes import assert_same_shape, expect_shape
from handpose.models.decoder import NUM_POSE_JOINTS, POSE_DIM, SHAPE_DIM, HandPrediction
from handpose.models.keypoints import HeatmapKeypointHead
from handpose.models.translation import TranslationBins

LOSS_TERMS = ("pose", "shape", "trans", "joints", "verts", "joints_2d", "keypoints_2d", "heatmap_2d", "joint_depth",
              "orient")
DEFAULT_WEIGHTS = {"pose": 1.0, "shape": 0.1, "trans": 0.1, "joints": 10.0, "verts": 10.0, "joints_2d": 1.0,
                   "keypoints_2d": 0.0, "heatmap_2d": 0.0, "joint_depth": 0.0, "orient": 0.0}
log = logging.getLogger(__name__)

WRIST = JOINT_NAMES_21.index("wrist")
# Hand scale for ``norm_by_hand``: length of the wrist -> middle-finger MCP bone.
SCALE_BONE = (WRIST, JOINT_NAMES_21.index("middle_mcp"))


def hand_scale(joints: torch.Tensor, reference: float) -> torch.Tensor:
    """joints [..., 21, 3] -> [...]: wrist-to-middle-MCP length divided by ``reference`` (1 for the mean hand)."""
    start, end = SCALE_BONE
    return (joints[..., end, :] - joints[..., start, :]).norm(dim=-1) / reference


def camera_space(mano, pose: torch.Tensor, shape: torch.Tensor, trans: torch.Tensor, norm_by_hand: bool = False,
                 reference_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A prediction ``pose [b, 48], shape [b, 10], trans [b, 3]`` -> camera-space joints ``[b, 21, 3]``, vertices
    ``[b, 778, 3]`` and the metric translation ``[b, 3]`` (``trans`` itself, or scaled by the posed hand's size when
    the network predicts it in hand units: ``norm_by_hand``)."""
    fk = mano(pose, shape)
    metric = trans * hand_scale(fk.joints, reference_scale)[..., None] if norm_by_hand else trans
    return fk.joints + metric[:, None], fk.vertices + metric[:, None], metric


def project(points: torch.Tensor, focal: torch.Tensor, princpt: torch.Tensor, min_depth: float = 1e-2) -> torch.Tensor:
    """points [..., n, 3] camera space, focal/princpt [..., 2] -> pixels [..., n, 2] (u = fx x / z + cx)."""
    z = points[..., 2:].clamp(min=min_depth)
    return points[..., :2] / z * focal[..., None, :] + princpt[..., None, :]


def bin_target(value: torch.Tensor, centers: torch.Tensor, sigma: float) -> torch.Tensor:
    """value [...] -> target distribution [..., B] over evenly spaced ``centers`` (clamped to their range).

    ``sigma`` (in bins) > 0: a normalised Gaussian; ``sigma == 0``: linear split between the two nearest bins,
    whose expectation is exactly the (clamped) value.
    """
    width = centers[1] - centers[0]
    pos = ((value.clamp(centers[0], centers[-1]) - centers[0]) / width)[..., None]  # fractional bin index
    index = torch.arange(len(centers), device=value.device, dtype=value.dtype)
    if sigma > 0:
        logits = -0.5 * ((index - pos) / sigma) ** 2
        return torch.softmax(logits, dim=-1)
    return (1 - (index - pos).abs()).clamp(min=0)


def heatmap_target(
    joints_2d: torch.Tensor, centres: torch.Tensor, sigma: float, crop_wh: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """joints_2d [..., J, 2], centres [K, 2] (crop pixels) -> (target [..., J, K] (normalised Gaussians of
    ``sigma`` cell widths), inside [..., J] (1 where the joint lies in the crop, else 0))."""
    cell = (centres[1] - centres[0]).abs().max()  # cells are square and evenly spaced
    d2 = ((joints_2d[..., None, :] - centres) ** 2).sum(dim=-1)  # [..., J, K]
    target = torch.softmax(-0.5 * d2 / (sigma * cell) ** 2, dim=-1)
    w, h = crop_wh
    u, v = joints_2d[..., 0], joints_2d[..., 1]
    inside = ((u >= -0.5) & (u <= w - 0.5) & (v >= -0.5) & (v <= h - 0.5)).to(joints_2d.dtype)
    return target, inside


def rotation_l1(pose_pred: torch.Tensor, pose_gt: torch.Tensor) -> torch.Tensor:
    """pose [..., 48] axis-angle (predicted, GT) -> [...]: mean L1 between their rotation matrices."""
    assert_same_shape(pose_pred, pose_gt, "pose_pred", "pose_gt")
    rot_pred = axis_angle_to_matrix(pose_pred.unflatten(-1, (NUM_POSE_JOINTS, 3)))
    rot_gt = axis_angle_to_matrix(pose_gt.unflatten(-1, (NUM_POSE_JOINTS, 3)))
    return (rot_pred - rot_gt).abs().mean(dim=(-3, -2, -1))


def masked_mean(per_sample: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """per_sample [b, 1], weight [b, 1] -> scalar weighted mean (0 when no sample has weight)."""
    assert_same_shape(per_sample, weight, "per-sample loss", "valid weight")
    return (per_sample * weight).sum() / weight.sum().clamp(min=1.0)


class HandPoseLoss(nn.Module):
    """Weighted sum of the terms in ``LOSS_TERMS`` on the last frame.

    Args:
        weights: per-term weights (keys from ``LOSS_TERMS``; missing keys take ``DEFAULT_WEIGHTS``).
        heatmap_sigma: Gaussian width (in bins) of the translation classification target; 0 = two-hot.
        norm_by_hand: the network's translation is in hand-scale units (metric translation / hand scale):
            the heatmap target is ``trans_gt / scale_gt``, and camera-space predictions use
            ``trans_pred_scaled = trans_pred * scale_pred`` (scale of the predicted hand, no GT at test time).
        detach_shape_in_fk: forward kinematics sees the predicted shape detached, so shape learns from its
            own term only and joint/vertex errors cannot be "explained away" by distorting the hand.
        gt_root_in_fk_terms: the root-relative ``joints`` / ``verts`` terms pose the predicted fingers under the
            GROUND-TRUTH global orientation, so they supervise articulation only. With the predicted orientation
            an orientation error is partly "paid for" by bending the fingers (measured here: Stage 1's PA-MPJPE
            got worse than the mean pose's while MPJPE improved). The orientation then learns from the ``pose``
            and ``joints_2d`` terms and the ``orient`` term; camera-space outputs and metrics always use the full
            prediction. Off here, on in every hand config (``configs/model/handpose_stage1.yaml``).
        mano_model_path, flat_hand_mean: MANO model for forward kinematics; must match the data's convention
            (``None`` = the procedural hand).
        heatmap_2d_sigma: width (in heatmap cells) of the Gaussian target of the ``heatmap_2d`` term.

    Terms (``LOSS_TERMS``) beyond the obvious: ``orient`` poses the ground-truth hand (fingers and shape) under the
    predicted global orientation and takes the L1 of its root-relative joints, in the units of ``joints``: the
    orientation's own signal (in ``pose`` the root is one rotation of 16; measured: with weight 10 a 1-epoch Stage 1
    reached root-relative MPJPE 45.8 mm instead of 59.0). Off by default (weight 0).
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        heatmap_sigma: float = 1.0,
        norm_by_hand: bool = False,
        detach_shape_in_fk: bool = True,
        gt_root_in_fk_terms: bool = False,
        mano_model_path: str | None = None,
        flat_hand_mean: bool = False,
        heatmap_2d_sigma: float = 1.0,
    ) -> None:
        super().__init__()
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(LOSS_TERMS))
        if unknown:
            raise KeyError(f"loss.weights: unknown terms {unknown}; known: {list(LOSS_TERMS)}")
        self.weights = {**DEFAULT_WEIGHTS, **{k: float(v) for k, v in weights.items()}}
        self.heatmap_sigma = float(heatmap_sigma)
        self.norm_by_hand = norm_by_hand
        self.detach_shape_in_fk = detach_shape_in_fk
        self.gt_root_in_fk_terms = gt_root_in_fk_terms
        self.heatmap_2d_sigma = float(heatmap_2d_sigma)
        self.num_trans_out_of_range = 0  # valid samples whose GT translation the bins cannot hold (warned once)
        self.mano = ManoLayer(model_path=mano_model_path, side="right", flat_hand_mean=flat_hand_mean)
        with torch.no_grad():
            mean_hand = self.mano(torch.zeros(1, POSE_DIM), torch.zeros(1, SHAPE_DIM)).joints
        self.reference_scale = float(hand_scale(mean_hand, 1.0))

    def forward(
        self, pred: HandPrediction, batch: Mapping[str, torch.Tensor], translation: TranslationBins,
        keypoints_2d: torch.Tensor | None = None, keypoint_heatmaps: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_depths: torch.Tensor | None = None,
    ) -> dict:
        """pred (pose [b, 1, 48], shape [b, 1, 10], trans [b, 1, 3]), 3 x [b, 1, B]; batch [b, t, ...] -> dict.

        ``translation``: the network's :class:`TranslationBins` (``PoseNet.translation``): bin centres and the
        map from the ground truth to bin space (the classification target).

        ``keypoints_2d [b, 1, 21, 2]``: the auxiliary patch keypoints (crop pixels), required when the
        ``keypoints_2d`` weight is not 0 (L1 against ``joints_2d[:, -1:]``, normalised by the crop size).
        ``keypoint_heatmaps``: (log-probabilities [b, 1, 21, K], cell centres [K, 2] crop pixels) of the heatmap
        head, required when the ``heatmap_2d`` weight is not 0: cross-entropy against a Gaussian of
        ``heatmap_2d_sigma`` cells around each GT joint that lies inside the crop.
        ``joint_depths [b, 1, 21]``: the heatmap head's relative joint depths (``decoder.joint_depth``), required
        when the ``joint_depth`` weight is not 0: L1 against ``HeatmapKeypointHead.relative_depths`` of the GT.

        Returns ``loss`` (weighted total), ``terms`` (unweighted, by name) and last-frame tensors
        ``joints_cam_pred/gt [b, 1, 21, 3]``, ``verts_cam_pred/gt [b, 1, 778, 3]``, ``joints_2d_pred
        [b, 1, 21, 2]``, ``trans_pred_scaled [b, 1, 3]`` (camera-space predictions use the scaled translation).
        """
        (pose_pred, shape_pred, trans_pred), log_heatmaps = pred
        b = pose_pred.shape[0]
        last = {k: batch[k][:, -1:] for k in ("mano_pose", "mano_shape", "mano_trans", "joints_cam",
                                                 "joints_2d", "focal", "princpt", "valid")}
        weight = last["valid"].to(pose_pred.dtype)
        expect_shape(weight, (b, 1), "valid[:, -1:]")
        assert_same_shape(pose_pred, last["mano_pose"], "pose_pred", "mano_pose[:, -1:]")
        assert_same_shape(shape_pred, last["mano_shape"], "shape_pred", "mano_shape[:, -1:]")
        assert_same_shape(trans_pred, last["mano_trans"], "trans_pred", "mano_trans[:, -1:]")
        terms: dict[str, torch.Tensor] = {}

        terms["pose"] = masked_mean(rotation_l1(pose_pred, last["mano_pose"]), weight)
        terms["shape"] = masked_mean((shape_pred - last["mano_shape"]).abs().mean(dim=-1), weight)

        # Forward kinematics of the last frame only ([b, 1] leading dims), without translation.
        shape_fk = shape_pred.detach() if self.detach_shape_in_fk else shape_pred
        fk_pred = self.mano(pose_pred, shape_fk)
        fk_articulation = fk_pred
        if self.gt_root_in_fk_terms:
            pose_gt_root = torch.cat([last["mano_pose"][..., :3], pose_pred[..., 3:]], dim=-1)
            fk_articulation = self.mano(pose_gt_root, shape_fk)
        with torch.no_grad():
            fk_gt = self.mano(last["mano_pose"], last["mano_shape"])
        joints_cam_gt = last["joints_cam"]
        verts_cam_gt = fk_gt.vertices + last["mano_trans"][..., None, :]

        if self.norm_by_hand:
            if translation.space != "camera":
                raise ValueError("norm_by_hand needs trans_space 'camera' (crop space already has no metric scale)")
            trans_target = last["mano_trans"] / hand_scale(joints_cam_gt, self.reference_scale)[..., None]
            scale_pred = hand_scale(fk_pred.joints, self.reference_scale).detach()
            trans_pred_scaled = trans_pred * scale_pred[..., None]
        else:
            trans_target = translation.encode(last["mano_trans"], joints_cam_gt[..., WRIST, :], last["focal"],
                                              last["princpt"])
            trans_pred_scaled = trans_pred.clone()  # an output of its own, never the caller's tensor
        self._count_out_of_range(trans_target, translation, last["valid"])
        trans_ce = []
        for axis, (log_hm, centers) in enumerate(zip(log_heatmaps, translation.centers)):
            target = bin_target(trans_target[..., axis], centers.to(log_hm), self.heatmap_sigma)
            assert_same_shape(log_hm, target, f"log_heatmap[{axis}]", f"translation target[{axis}]")
            trans_ce.append(masked_mean(-(target * log_hm).sum(dim=-1), weight))
        terms["trans"] = torch.stack(trans_ce).sum()

        joints_rel_pred = fk_articulation.joints - fk_articulation.joints[..., WRIST : WRIST + 1, :]
        joints_rel_gt = joints_cam_gt - joints_cam_gt[..., WRIST : WRIST + 1, :]
        assert_same_shape(joints_rel_pred, joints_rel_gt, "root-relative joints_pred", "joints_cam[:, -1:]")
        terms["joints"] = masked_mean((joints_rel_pred - joints_rel_gt).abs().mean(dim=(-2, -1)), weight)
        verts_rel_pred = fk_articulation.vertices - fk_articulation.joints[..., WRIST : WRIST + 1, :]
        verts_rel_gt = fk_gt.vertices - fk_gt.joints[..., WRIST : WRIST + 1, :]
        assert_same_shape(verts_rel_pred, verts_rel_gt, "root-relative verts_pred", "verts_gt")
        terms["verts"] = masked_mean((verts_rel_pred - verts_rel_gt).abs().mean(dim=(-2, -1)), weight)
        if self.weights["orient"]:  # the ground-truth hand under the predicted root: the orientation alone
            terms["orient"] = masked_mean(
                self._orientation_error(pose_pred, last["mano_pose"], joints_rel_gt), weight)
        else:
            terms["orient"] = torch.zeros((), dtype=pose_pred.dtype, device=pose_pred.device)

        joints_cam_pred = fk_pred.joints + trans_pred_scaled[..., None, :]
        verts_cam_pred = fk_pred.vertices + trans_pred_scaled[..., None, :]
        joints_2d_pred = project(joints_cam_pred, last["focal"], last["princpt"])
        assert_same_shape(joints_2d_pred, last["joints_2d"], "joints_2d_pred", "joints_2d[:, -1:]")
        # the crop's size: the images', or the bins' for samples with precomputed frame tokens
        height, width = batch["img"].shape[-2:] if "img" in batch else (translation.img_size,) * 2
        crop_size = torch.tensor([width, height], dtype=joints_2d_pred.dtype, device=joints_2d_pred.device)
        error_2d = (joints_2d_pred - last["joints_2d"]) / crop_size
        terms["joints_2d"] = masked_mean(error_2d.abs().mean(dim=(-2, -1)), weight)
        if keypoints_2d is not None:
            assert_same_shape(keypoints_2d, last["joints_2d"], "keypoints_2d", "joints_2d[:, -1:]")
            error_kp = (keypoints_2d - last["joints_2d"]) / crop_size
            terms["keypoints_2d"] = masked_mean(error_kp.abs().mean(dim=(-2, -1)), weight)
        elif self.weights["keypoints_2d"]:
            raise ValueError("loss weight keypoints_2d > 0 needs the keypoints_2d predictions "
                             "(PoseNet(aux_keypoints=True).predict_with_keypoints)")
        else:
            terms["keypoints_2d"] = torch.zeros((), dtype=joints_2d_pred.dtype, device=joints_2d_pred.device)
        if keypoint_heatmaps is not None:
            log_hm, centres = keypoint_heatmaps
            expect_shape(log_hm, (b, 1, len(JOINT_NAMES_21), centres.shape[0]), "keypoint log-heatmaps")
            target, inside = heatmap_target(last["joints_2d"], centres.to(log_hm), self.heatmap_2d_sigma,
                                            (width, height))
            assert_same_shape(log_hm, target, "keypoint log-heatmaps", "heatmap target")
            per_joint = -(target * log_hm).sum(dim=-1) * inside  # [b, 1, 21]
            per_sample = per_joint.sum(dim=-1) / inside.sum(dim=-1).clamp(min=1)
            terms["heatmap_2d"] = masked_mean(per_sample, weight)
        elif self.weights["heatmap_2d"]:
            raise ValueError("loss weight heatmap_2d > 0 needs the heatmap head's output "
                             "(PoseNet.predict_with_heatmaps, a CNN backbone with aux_keypoints=True)")
        else:
            terms["heatmap_2d"] = torch.zeros((), dtype=joints_2d_pred.dtype, device=joints_2d_pred.device)

        if joint_depths is not None:
            target = HeatmapKeypointHead.relative_depths(joints_cam_gt, last["focal"], width)
            assert_same_shape(joint_depths, target, "joint_depths", "relative depths of joints_cam[:, -1:]")
            terms["joint_depth"] = masked_mean((joint_depths - target).abs().mean(dim=-1), weight)
        elif self.weights["joint_depth"]:
            raise ValueError("loss weight joint_depth > 0 needs the heatmap head's joint depths "
                             "(model.net.decoder.joint_depth: input or aux)")
        else:
            terms["joint_depth"] = torch.zeros((), dtype=joints_2d_pred.dtype, device=joints_2d_pred.device)

        total = sum(self.weights[name] * terms[name] for name in LOSS_TERMS)
        return {
            "loss": total,
            "terms": terms,
            "trans_pred_scaled": trans_pred_scaled,
            "joints_cam_pred": joints_cam_pred,
            "verts_cam_pred": verts_cam_pred,
            "joints_cam_gt": joints_cam_gt,
            "verts_cam_gt": verts_cam_gt,
            "joints_2d_pred": joints_2d_pred,
        }

    def _count_out_of_range(self, trans_target: torch.Tensor, translation: TranslationBins,
                            valid: torch.Tensor) -> None:
        """Counts valid samples whose ground-truth translation lies outside the bin range on some axis (their
        classification target is the edge bin: the network cannot express it) and warns on the first."""
        with torch.no_grad():
            lows = torch.stack([c[0] for c in translation.centers]).to(trans_target)
            highs = torch.stack([c[-1] for c in translation.centers]).to(trans_target)
            outside = ((trans_target < lows) | (trans_target > highs)).any(dim=-1) & valid.bool()  # [b, 1]
            count = int(outside.sum())
        if not count:
            return
        if not self.num_trans_out_of_range:
            value = trans_target[outside][0].tolist()
            log.warning(
                "ground-truth translation outside the translation bins (%s space, x %s, y %s, z %s): %s; such "
                "targets are clamped to the edge bin. Widen model.net.decoder.trans_bins if this is common (the "
                "count is in HandPoseLoss.num_trans_out_of_range; warned once)", translation.space,
                *[f"[{lo:.3g}, {hi:.3g}]" for lo, hi in zip(lows.tolist(), highs.tolist())],
                [round(v, 4) for v in value])
        self.num_trans_out_of_range += count

    def lift_terms(self, pose_pred: torch.Tensor, batch: Mapping[str, torch.Tensor],
                   depth_bins: tuple[torch.Tensor, TranslationBins] | None = None) -> dict[str, torch.Tensor]:
        """The ``pose`` and ``joints`` terms, ``orient`` when it is weighted, and with ``depth_bins`` (log-probabilities
        [n, Bz] over the depth bins of ``translation``) the depth axis of ``trans`` (same definitions as
        :meth:`forward`), for the lifting batch:
        pose_pred [n, 48] from 2D joints alone; batch of annotations ``[n, ...]`` (mano_pose, mano_shape,
        joints_cam, valid; with ``depth_bins`` also mano_trans, focal, princpt) -> {"pose", "joints"[, "orient"]
        [, "trans"]} (unweighted)."""
        n = pose_pred.shape[0]
        expect_shape(pose_pred, (n, POSE_DIM), "lift pose_pred")
        weight = expect_shape(batch["valid"].to(pose_pred.dtype)[:, None], (n, 1), "valid")
        pose_gt, shape_gt = batch["mano_pose"], batch["mano_shape"]
        pose_fk = torch.cat([pose_gt[..., :3], pose_pred[..., 3:]], dim=-1) if self.gt_root_in_fk_terms else pose_pred
        joints_pred = self.mano(pose_fk, shape_gt).joints
        joints_rel_pred = joints_pred - joints_pred[..., WRIST : WRIST + 1, :]
        joints_gt = batch["joints_cam"]
        joints_rel_gt = joints_gt - joints_gt[..., WRIST : WRIST + 1, :]
        assert_same_shape(joints_rel_pred, joints_rel_gt, "lift joints_pred", "joints_cam")
        terms = {
            "pose": masked_mean(rotation_l1(pose_pred, pose_gt)[:, None], weight),
            "joints": masked_mean((joints_rel_pred - joints_rel_gt).abs().mean(dim=(-2, -1))[:, None], weight),
        }
        if self.weights["orient"]:
            terms["orient"] = masked_mean(self._orientation_error(pose_pred, pose_gt, joints_rel_gt)[:, None],
                                          weight)
        if depth_bins is not None:  # the depth axis of the translation term
            log_hm, translation = depth_bins
            expect_shape(log_hm, (n, len(translation.centers[2])), "lift depth log-probabilities")
            value = translation.encode(batch["mano_trans"], joints_gt[..., WRIST, :], batch["focal"],
                                       batch["princpt"])[..., 2]
            target = bin_target(value, translation.centers[2].to(log_hm), self.heatmap_sigma)
            terms["trans"] = masked_mean(-(target * log_hm).sum(dim=-1)[:, None], weight)
        return terms

    @staticmethod
    def _orientation_error(pose_pred: torch.Tensor, pose_gt: torch.Tensor, joints_rel_gt: torch.Tensor) -> torch.Tensor:
        """The ``orient`` term per sample ``[...]``: mean L1 (m) of the ground-truth hand posed under ``pose_pred``'s
        global orientation against itself, root-relative joints ``joints_rel_gt [..., 21, 3]``. MANO's global
        orientation turns the whole hand about its root joint (the wrist), so that hand is ``joints_rel_gt`` turned
        by ``R_pred R_gt^T``: no forward kinematics (two per step would cost ~15 % of a CPU Stage 1 step)."""
        rot = axis_angle_to_matrix(pose_pred[..., :3]) @ axis_angle_to_matrix(pose_gt[..., :3]).transpose(-1, -2)
        joints_rel = joints_rel_gt @ rot.transpose(-1, -2)
        assert_same_shape(joints_rel, joints_rel_gt, "root-relative joints under the predicted root", "joints_gt")
        return (joints_rel - joints_rel_gt).abs().mean(dim=(-2, -1))

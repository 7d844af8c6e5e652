"""LightningModule for hand pose: wires PoseNet, HandPoseLoss and HandPoseMetrics to an AdamW + warmup-cosine run.

Thin by design: the network is handpose.models, the loss handpose.loss, the metrics handpose.metrics. Also
holds the validation image grid (projected predicted vs GT 2D joints) and the warmup-cosine schedule factory.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Mapping

import cv2
import lightning as L
import numpy as np
import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from common.loggers import log_image
from common.mano import JOINT_NAMES_21
from handpose.data.dataset import denormalise
from handpose.loss import HandPoseLoss, camera_space
from handpose.metrics import HandPoseMetrics, mean_mano_params
from handpose.models import HandPrediction, HeatmapKeypointHead, PoseNet

log = logging.getLogger(__name__)

GT_COLOR, PRED_COLOR = (255, 64, 64), (64, 255, 64)  # RGB
MIN_VIS_SIZE = 192  # crops are upscaled to at least this many pixels in the grid
# Skeleton of the 21-joint order: each finger is a chain from the wrist.
SKELETON_PARENTS_21 = tuple(
    -1 if i == 0 else (i - 1 if JOINT_NAMES_21[i - 1].split("_")[0] == name.split("_")[0] else 0)
    for i, name in enumerate(JOINT_NAMES_21)
)


def warmup_cosine(
    optimizer: Optimizer, warmup_steps: int = 1000, total_steps: int | None = None, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warmup from 0 over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""
    if total_steps is None:
        raise ValueError("warmup_cosine: total_steps is required (HandPoseLit fills it from the trainer)")
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def draw_skeleton(canvas: np.ndarray, joints_2d: np.ndarray, color: tuple[int, int, int], zoom: float,
                  thickness: int = 2, radius: int = 3) -> None:
    """Draw a 21-joint skeleton (pixels ``[21, 2]``, scaled by ``zoom``) onto ``canvas`` (in place: the caller's
    own canvas); non-finite joints are drawn off the canvas."""
    pts = np.nan_to_num((joints_2d + 0.5) * zoom - 0.5, nan=-1e4).clip(-1e4, 1e4).round().astype(np.int32)
    for child, parent in enumerate(SKELETON_PARENTS_21):
        if parent >= 0:
            cv2.line(canvas, tuple(pts[parent]), tuple(pts[child]), color, thickness, cv2.LINE_AA)
    for p in pts:
        cv2.circle(canvas, tuple(p), radius, color, -1, cv2.LINE_AA)


def draw_keypoint_grid(
    img: torch.Tensor, joints_2d_gt: torch.Tensor, joints_2d_pred: torch.Tensor, max_items: int = 8
) -> np.ndarray:
    """img [n, 3, H, W] (ImageNet-normalised), joints [n, 21, 2] crop pixels -> uint8 RGB row [H', n W', 3].

    GT skeleton in red, prediction in green.
    """
    n = min(max_items, img.shape[0])
    crops = denormalise(img[:n])  # [n, H, W, 3] uint8
    zoom = max(1, math.ceil(MIN_VIS_SIZE / crops.shape[1]))
    tiles = []
    for crop, gt, pred in zip(crops, joints_2d_gt[:n].detach().cpu().numpy(), joints_2d_pred[:n].detach().cpu().numpy()):
        tile = cv2.resize(crop, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST)
        for points, color in ((gt, GT_COLOR), (pred, PRED_COLOR)):
            draw_skeleton(tile, points, color, zoom, thickness=1, radius=2)
        tiles.append(tile)
    return np.concatenate(tiles, axis=1)


class HandPoseLit(L.LightningModule):
    """Stage 1 / Stage 2 hand pose training.

    Args:
        net: the PoseNet (its stage decides how many frames it takes).
        loss: HandPoseLoss.
        optimizer: partial optimizer (e.g. AdamW with lr, weight_decay), called with two param groups.
        scheduler: partial LR scheduler or None; stepped every optimisation step. If it takes a
            ``total_steps`` that is not set, it gets ``trainer.estimated_stepping_batches``.
        backbone_lr_scale: backbone learning rate = optimizer lr x this.
        stage1_weight: Stage 1 checkpoint loaded into ``net`` when fitting starts (before any resume restores
            this run's own checkpoint); ``None`` trains from the network's initialisation.
        mean_init_batches: without ``stage1_weight``, the decoder's residual origin is set to the mean MANO
            pose and shape of this many training batches when fitting starts (0 = MANO's mean hand).
        num_vis: crops in the validation image grid.
        lift_batch: with the decoder's joint MLP, every training step also trains it and the pose head on this
            many annotations of the training split without images (GT 2D joints + Gaussian noise of
            ``lift_noise`` crop sides -> pose; the ``pose``, ``joints`` (and weighted, ``orient``) terms, weighted
            by ``lift_weight``; with ``decoder.joint_root`` the global orientation is read from the 2D joints too).
            2D -> 3D lifting needs far more samples than the image path can afford on a CPU, and costs no
            convolution. 0 = off. With ``decoder.joint_depth`` the ground-truth relative depths
            (``HeatmapKeypointHead.relative_depths``) plus noise of ``lift_depth_noise`` go in beside them.
        frame_tokens: Stage 2 with a frozen per-frame encoder (``net.freeze_encoder``) and ``stage1_weight``: when
            fitting starts, the encoder runs once over every frame of the training split
            (:mod:`handpose.frame_tokens`) and training windows carry those tokens instead of images, so a step
            costs the temporal encoder, the heads and the loss, not 7 backbone passes. Needs an un-augmented
            training split (``data.augment=null``): the tokens are of the crops the samples describe. Validation
            windows carry tokens too (the same predictions; no keypoint image grid); ``handpose.evaluate``
            encodes each frame once as well, the streaming tracker keeps a ring buffer of tokens.
    """

    def __init__(
        self,
        net: PoseNet,
        loss: HandPoseLoss,
        optimizer: Callable[..., Optimizer],
        scheduler: Callable[..., LRScheduler] | None = None,
        backbone_lr_scale: float = 0.1,
        stage1_weight: str | None = None,
        mean_init_batches: int = 0,
        num_vis: int = 8,
        lift_batch: int = 0,
        lift_noise: float = 0.04,
        lift_weight: float = 1.0,
        lift_depth_noise: float = 0.1,
        joint_hint_prob: float = 0.0,
        joint_hint_noise: float = 0.05,
        frame_tokens: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "loss", "optimizer", "scheduler"])
        self.net = net
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_metrics = HandPoseMetrics()
        self.test_metrics = HandPoseMetrics()
        self._initialised = False

    def setup(self, stage: str) -> None:
        # Runs before Lightning restores a resumed run's checkpoint, which then overrides these weights.
        if stage != "fit" or self._initialised:
            return
        self._initialised = True
        if self.hparams.stage1_weight:
            self.net.load_stage1(self.hparams.stage1_weight)
        elif self.hparams.mean_init_batches:
            self._init_from_data_mean(self.hparams.mean_init_batches)
        if self.hparams.frame_tokens:
            self._use_frame_tokens()

    def _init_from_data_mean(self, num_batches: int) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is None:
            log.warning("mean_init_batches=%d but the trainer has no datamodule: keeping MANO's mean hand", num_batches)
            return
        mean = mean_mano_params(datamodule.train_dataloader(), max_batches=num_batches)
        self.net.decoder.set_mean_init(mean.pose, mean.shape)
        log.info("decoder residual origin set to the mean MANO pose and shape of %d training batches", num_batches)

    def _use_frame_tokens(self) -> None:
        """``frame_tokens``: compute the training split's frame tokens and make its windows carry them."""
        from handpose.frame_tokens import attach_frame_tokens

        if not (self.net.encoder_frozen and self.net.temporal is not None):
            raise ValueError("model.frame_tokens needs a Stage 2 network with a frozen token encoder "
                             "(model.net.stage=stage2, model.net.freeze_encoder=true)")
        if not self.hparams.stage1_weight:
            raise ValueError("model.frame_tokens needs model.stage1_weight: the frozen encoder's weights must be "
                             "loaded before its tokens are computed")
        datamodule = getattr(self.trainer, "datamodule", None)
        datasets = getattr(datamodule, "datasets", {}) if datamodule is not None else {}
        if not hasattr(datasets.get("train"), "use_frame_tokens"):
            raise ValueError("model.frame_tokens needs a hand datamodule (HandDataModule) with a training split")
        self.net.to(self.trainer.strategy.root_device)
        for role in ("train", "val"):  # validation windows too (un-augmented): the same predictions, no images
            if role in datasets:
                attach_frame_tokens(self.net, datasets[role], num_workers=datamodule.num_workers)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> HandPrediction:
        """batch of [b, t, ...] -> HandPrediction of the last frame, [b, 1, ...]. A batch with precomputed frame
        tokens (``frame_tokens``) instead of images skips the per-frame encoder."""
        if "tokens" in batch:
            return self.net.refine_and_decode(batch["tokens"], batch["timestamp"], batch["focal"], batch["princpt"])
        return self.net.predict_mano_param(
            batch["img"], batch["bbox"], batch["focal"], batch["princpt"], batch["timestamp"]
        )

    @torch.no_grad()
    def predict_camera(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """batch of [b, t, ...] -> the last frame's joints [b, 21, 3] and MANO vertices [b, 778, 3], metres, in the
        batch's camera frame (as the dataset loaded it: left hands mirrored). Needs no annotation."""
        pose, shape, trans = (x[:, 0] for x in self(batch).mano)
        joints, verts, _ = camera_space(self.loss.mano, pose, shape, trans, self.loss.norm_by_hand,
                                        self.loss.reference_scale)
        return joints, verts

    def _loss(self, batch: Mapping[str, torch.Tensor]) -> dict:
        # no keypoint head, or precomputed frame tokens (frame_tokens: the frozen encoder has run already)
        if self.net.keypoint_head is None or "tokens" in batch:
            return self.loss(self(batch), batch, self.net.translation)
        inputs = (batch["img"], batch["bbox"], batch["focal"], batch["princpt"], batch["timestamp"])
        if self.loss.weights["heatmap_2d"]:
            pred, keypoints, log_heatmaps, depths = self.net.predict_with_heatmaps(
                *inputs, joint_hint=self._joint_hint(batch))
            return self.loss(pred, batch, self.net.translation, keypoints_2d=keypoints,
                             keypoint_heatmaps=(log_heatmaps, self.net.keypoint_head.cell_centres),
                             joint_depths=depths)
        pred, keypoints = self.net.predict_with_keypoints(*inputs)
        return self.loss(pred, batch, self.net.translation, keypoints_2d=keypoints)

    def _joint_hint(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """In training, with ``joint_hint_prob``: (ground-truth 2D joints plus Gaussian noise of ``joint_hint_noise``
        crop sides [b, t, 21, 2], a Bernoulli(joint_hint_prob) choice per frame [b, t]) for the joint MLP."""
        p = self.hparams.joint_hint_prob
        if not (self.training and p > 0 and self.net.decoder.uses_joints):
            return None
        gt = batch["joints_2d"]
        noisy = gt + self.hparams.joint_hint_noise * self.net.img_size * torch.randn_like(gt)
        return noisy, torch.rand(gt.shape[:2], device=gt.device) < p

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self._loss(batch)
        b = batch["timestamp"].shape[0]
        loss = out["loss"]
        lift = self._lift_terms()
        if lift:
            loss = loss + self.hparams.lift_weight * sum(self.loss.weights[k] * v for k, v in lift.items())
            self.log_dict({f"train/lift_{name}": value for name, value in lift.items()}, batch_size=b)
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log_dict({f"train/{name}": value for name, value in out["terms"].items()}, batch_size=b)
        return loss

    def _lift_terms(self) -> dict[str, torch.Tensor]:
        """The lifting batch's pose / joints terms (see ``lift_batch``), or {} when it is off."""
        n = self.hparams.lift_batch
        if not n or not self.net.decoder.joint_mlp:
            return {}
        datamodule = getattr(self.trainer, "datamodule", None)
        dataset = getattr(datamodule, "datasets", {}).get("train") if datamodule is not None else None
        if not hasattr(dataset, "sample_annotations"):
            if not getattr(self, "_warned_lift", False):
                log.warning("lift_batch=%d but the trainer has no hand datamodule with a train split: no lift batch", n)
                self._warned_lift = True
            return {}
        ann = {k: torch.from_numpy(v).to(self.device) for k, v in dataset.sample_annotations(n).items()}
        positions = HeatmapKeypointHead.relative_positions(ann["joints_2d"], self.net.img_size)
        noisy = positions + self.hparams.lift_noise * torch.randn_like(positions)
        decoder = self.net.decoder
        if decoder.joint_depth:  # ground-truth relative depths plus noise as the third coordinate
            depths = HeatmapKeypointHead.relative_depths(ann["joints_cam"], ann["focal"], self.net.img_size)
            depths = depths + self.hparams.lift_depth_noise * torch.randn_like(depths)
            noisy = torch.cat([noisy, depths[..., None]], dim=-1)
        token = decoder.lift_token(noisy)
        if decoder.finger_token:  # the finger token alone gives the fingers (and with joint_root a root of its own)
            root = (decoder.decode_joint_root(decoder.root_from_joints(noisy)) if decoder.joint_root
                    else ann["mano_pose"][:, :3])
            pose = torch.cat([root, decoder.decode_fingers(token)], dim=-1)
        else:
            (pose, _, _), _ = decoder.decode_token(token, ann["focal"], ann["princpt"])
        depth = (decoder.decode_joint_distance(token), decoder.translation) if decoder.joint_distance else None
        return self.loss.lift_terms(pose, ann, depth)

    def _eval_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int, split: str,
                   metrics: HandPoseMetrics) -> dict[str, torch.Tensor]:
        """-> the last frame's camera-space joints / vertices, predicted and GT ([b, 1, ...], detached), for
        callbacks that keep per-sample results (handpose.evaluate)."""
        out = self._loss(batch)
        b = batch["timestamp"].shape[0]
        self.log(f"{split}/loss", out["loss"], sync_dist=True, batch_size=b)
        valid = batch["valid"][:, -1].bool()
        metrics.update(out["joints_cam_pred"][valid], out["joints_cam_gt"][valid],
                       out["verts_cam_pred"][valid], out["verts_cam_gt"][valid])
        if batch_idx == 0 and self.trainer.is_global_zero and "img" in batch:  # not with precomputed tokens
            grid = draw_keypoint_grid(batch["img"][:, -1], batch["joints_2d"][:, -1], out["joints_2d_pred"][:, 0],
                                      self.hparams.num_vis)
            log_image(self, f"{split}/keypoints", grid, caption="red: GT, green: prediction (last frame)")
        return {k: out[k].detach() for k in ("joints_cam_pred", "joints_cam_gt", "verts_cam_pred", "verts_cam_gt")}

    def _log_metrics(self, split: str, metrics: HandPoseMetrics) -> None:
        if int(metrics.num_samples) == 0 and self.trainer.world_size == 1:
            log.warning("%s: no valid frame to evaluate; metrics not logged", split)
        else:
            self.log_dict({f"{split}/{k}": v for k, v in metrics.compute().items()}, sync_dist=True)
        metrics.reset()

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, batch_idx, "val", self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, batch_idx, "test", self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def configure_optimizers(self):
        backbone_ids = {id(p) for p in self.net.backbone.parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        groups = [{"name": "head", "params": [p for p in trainable if id(p) not in backbone_ids]}]
        backbone = [p for p in trainable if id(p) in backbone_ids]
        if backbone:
            groups.append({"name": "backbone", "params": backbone})
        optimizer = self.optimizer_factory(params=groups)
        for group in optimizer.param_groups:
            if group["name"] == "backbone":
                group["lr"] *= self.hparams.backbone_lr_scale
        if self.scheduler_factory is None:
            return optimizer
        kwargs = {}
        bound = getattr(self.scheduler_factory, "keywords", {}) or {}
        if "total_steps" in inspect.signature(self.scheduler_factory).parameters and bound.get("total_steps") is None:
            kwargs["total_steps"] = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer=optimizer, **kwargs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

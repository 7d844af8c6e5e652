"""Streaming hand tracker: frames arrive one at a time, each costs one backbone + decoder pass.

Per-frame tokens of the last ``num_frame`` frames live in a ring buffer; the temporal encoder refines the newest
frame from them. Crops are made by the dataset's own geometry (``handpose.data.dataset.crop_transform``), so
training and inference see identical inputs. Not a detector: the caller supplies each frame's hand bbox.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import torch

from common.mano import MIRROR_AXIS_ANGLE_SIGNS, ManoLayer
from common.shapes import expect_shape
from handpose.data.dataset import _BLOB_PARAMS, _Jitter, crop_transform
from handpose.loss import camera_space, hand_scale
from handpose.models import HandPrediction, PoseNet

log = logging.getLogger(__name__)

SIDES = ("right", "left")
MIRROR_POINT = np.array([-1.0, 1.0, 1.0], np.float32)  # camera-space x -> -x (a left hand seen as a right one)
MIRROR_POSE = np.tile(np.array(MIRROR_AXIS_ANGLE_SIGNS, np.float32), 16)  # every joint (x, y, z) -> (x, -y, -z)
_NO_JITTER = _Jitter()


@dataclass(frozen=True)
class CropInput:
    """One frame prepared for :meth:`PoseNet.encode_frames` exactly as ``HandWindowDataset`` prepares it.

    ``img [3, S, S]`` ImageNet-normalised RGB; ``bbox [4]`` crop box in the (mirrored) image;
    ``focal``/``princpt [2]`` crop intrinsics; ``orig_princpt [2]`` the (mirrored) image's principal point.
    """

    img: np.ndarray
    bbox: np.ndarray
    focal: np.ndarray
    princpt: np.ndarray
    orig_princpt: np.ndarray


def prepare_crop(
    image_bgr: np.ndarray, bbox: np.ndarray, focal: np.ndarray, princpt: np.ndarray, mirror: bool,
    img_size: int, bbox_scale: float,
) -> CropInput:
    """image [H, W, 3] uint8 BGR, bbox [4] (x0, y0, x1, y1), focal/princpt [2] pixels -> the network's crop.

    Same operations and dtypes as ``HandWindowDataset._frame`` without augmentation (the tests compare them).
    """
    focal32 = np.asarray(focal, np.float32)
    M, _, box, orig_princpt, s = crop_transform(
        np.asarray(bbox, np.float32), focal32, np.asarray(princpt, np.float32), image_bgr.shape[1], mirror,
        img_size, bbox_scale, _NO_JITTER,
    )
    crop = cv2.warpAffine(image_bgr, M[:2], (img_size, img_size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    return CropInput(
        img=cv2.dnn.blobFromImageWithParams(crop, _BLOB_PARAMS)[0],
        bbox=box.astype(np.float32),
        focal=(focal32 * s).astype(np.float32),
        princpt=((orig_princpt - box[:2]) * s).astype(np.float32),
        orig_princpt=orig_princpt.astype(np.float32),
    )


@dataclass(frozen=True)
class TrackResult:
    """The newest frame's hand in the ORIGINAL image's camera (a left hand is a left hand again).

    ``pose [48]`` axis-angle (global orientation first) and ``shape [10]``, ``trans [3]`` of the MANO model of
    ``side`` in the pose convention of the tracker's ``mano`` layer (the data's ``flat_hand_mean``);
    ``joints_cam [21, 3]`` (JOINT_NAMES_21 order) and ``vertices_cam [778, 3]`` in metres, camera space;
    ``joints_2d [21, 2]`` their projection in original image pixels; ``window``: frames the prediction used.
    """

    pose: np.ndarray
    shape: np.ndarray
    trans: np.ndarray
    joints_cam: np.ndarray
    vertices_cam: np.ndarray
    joints_2d: np.ndarray
    side: str
    timestamp: float
    window: int


class HandTracker:
    """Online MANO estimates from a frame stream, one :meth:`update` per frame.

    Args:
        net: a trained :class:`PoseNet` (put in eval mode here). Stage 1 needs ``num_frame=1``.
        num_frame: window length T (Stage 2 was trained with e.g. 7; any T >= 1 runs).
        img_size: crop size; must equal the backbone's (``None`` = take it from ``net``).
        bbox_scale: crop side / longest bbox side, as in the data config.
        mano: right-hand MANO layer for forward kinematics, in the training data's ``flat_hand_mean``
            convention (``None`` = procedural hand, ``flat_hand_mean=False``). Its left twin is implied: left
            hands are mirrored in, predicted as right hands, and mirrored back.
        norm_by_hand: the network's translation is in hand-scale units (``HandPoseLoss(norm_by_hand=True)``);
            it is multiplied by the predicted hand's scale, as the loss does.
        channel_order: ``"rgb"`` (imageio, PIL) or ``"bgr"`` (OpenCV) for the images given to :meth:`update`.

    Window policy: the buffer keeps the tokens of the last T frames (each computed once, when its frame
    arrived). Until T frames have arrived the prediction uses the SHORTER window of all frames so far (no
    padding, no invented frames) — exactly ``net.predict_mano_param`` on that shorter window. Timestamps enter
    relative to the window's first frame, as in the dataset (float64 until then, so absolute clocks are fine);
    they must increase strictly. Frames that skip or drop are fine: the temporal encoder sees real offsets.
    """

    def __init__(
        self,
        net: PoseNet,
        num_frame: int,
        img_size: int | None = None,
        bbox_scale: float = 1.4,
        mano: ManoLayer | None = None,
        norm_by_hand: bool = False,
        channel_order: Literal["rgb", "bgr"] = "rgb",
    ) -> None:
        if num_frame < 1:
            raise ValueError(f"num_frame must be >= 1, got {num_frame}")
        if net.temporal is None and num_frame != 1:
            raise ValueError(f"a {net.stage.value} PoseNet takes one frame (num_frame=1), got num_frame={num_frame}")
        if img_size is not None and img_size != net.img_size:
            raise ValueError(f"img_size {img_size} differs from the backbone's crop size {net.img_size}")
        if channel_order not in ("rgb", "bgr"):
            raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
        self.net = net.eval()
        self.num_frame = num_frame
        self.img_size = net.img_size
        self.bbox_scale = float(bbox_scale)
        self.channel_order = channel_order
        self.norm_by_hand = norm_by_hand
        self.device = next(net.parameters()).device
        mano = mano if mano is not None else ManoLayer()
        if mano.side != "right":
            raise ValueError("mano must be the RIGHT-hand layer (left hands are mirrored to right ones)")
        self.mano = mano.to(self.device).eval()
        with torch.no_grad():
            mean_joints = self.mano(torch.zeros(1, 48, device=self.device), torch.zeros(1, 10, device=self.device))
        self.reference_scale = float(hand_scale(mean_joints.joints, 1.0))
        self.tokens: deque[torch.Tensor] = deque(maxlen=num_frame)  # [d] each, oldest first
        self.timestamps: deque[float] = deque(maxlen=num_frame)

    @classmethod
    def from_lit(cls, lit, num_frame: int, bbox_scale: float = 1.4, **kwargs) -> HandTracker:
        """A tracker with a HandPoseLit's network and its loss's MANO layer and translation convention."""
        return cls(lit.net, num_frame, bbox_scale=bbox_scale, mano=lit.loss.mano,
                   norm_by_hand=lit.loss.norm_by_hand, **kwargs)

    @classmethod
    def from_checkpoint(cls, path, num_frame: int | None = None, device: str | torch.device = "cpu",
                        config=None, **kwargs) -> HandTracker:
        """A tracker from a training run's checkpoint (``outputs/<experiment>/<run>/checkpoints/*.ckpt``): the
        network is rebuilt from the run's ``config.yaml`` and loaded strictly (``handpose.runs``);
        ``num_frame`` and the crop scale default to the run's data settings (``data.num_frame``,
        ``data.bbox_scale``)."""
        from handpose.runs import load_checkpoint

        lit, cfg = load_checkpoint(path, config)
        lit = lit.to(device)
        kwargs.setdefault("bbox_scale", float(cfg.data.get("bbox_scale", 1.4)))
        return cls.from_lit(lit, int(num_frame if num_frame is not None else cfg.data.num_frame), **kwargs)

    def reset(self) -> None:
        """Forget all frames (start of a new sequence / a lost track)."""
        self.tokens.clear()
        self.timestamps.clear()

    def __len__(self) -> int:
        """Frames in the buffer (at most ``num_frame``)."""
        return len(self.tokens)

    def _check(self, image: np.ndarray, bbox, focal, princpt, timestamp: float, side: str) -> tuple:
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
            got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"HandTracker.update: image must be uint8 [H, W, 3], got {got}")
        if side not in SIDES:
            raise ValueError(f"HandTracker.update: side must be one of {SIDES}, got {side!r}")
        bbox, focal, princpt = (np.asarray(v, np.float64).reshape(-1) for v in (bbox, focal, princpt))
        for name, value, size in (("bbox", bbox, 4), ("focal", focal, 2), ("princpt", princpt, 2)):
            if value.shape != (size,) or not np.isfinite(value).all():
                raise ValueError(f"HandTracker.update: {name} must be {size} finite numbers, got {value.tolist()}")
        if not (bbox[2] > bbox[0] and bbox[3] > bbox[1]):
            raise ValueError(f"HandTracker.update: empty bbox (x1 <= x0 or y1 <= y0): {bbox.tolist()}")
        if (focal <= 0).any():
            raise ValueError(f"HandTracker.update: focal must be positive, got {focal.tolist()}")
        if self.timestamps and not timestamp > self.timestamps[-1]:
            raise ValueError(f"HandTracker.update: timestamp {timestamp} does not increase (previous "
                             f"{self.timestamps[-1]}); call reset() to start a new sequence")
        return bbox, focal, princpt

    def prepare(self, image: np.ndarray, bbox, focal, princpt, side: str) -> CropInput:
        """The network input of one frame (right-hand view), in the tracker's channel order."""
        bgr = image if self.channel_order == "bgr" else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        return prepare_crop(bgr, bbox, focal, princpt, side == "left", self.img_size, self.bbox_scale)

    @torch.inference_mode()
    def update(
        self, image: np.ndarray, bbox, focal, princpt, timestamp: float, side: Literal["right", "left"] = "right",
    ) -> TrackResult:
        """image [H, W, 3] uint8, bbox [4] (x0, y0, x1, y1 pixels), focal [2], princpt [2] (pixels, of this
        image), timestamp (seconds) -> the newest frame's :class:`TrackResult`."""
        bbox, focal, princpt = self._check(image, bbox, focal, princpt, float(timestamp), side)
        crop = self.prepare(image, bbox, focal, princpt, side)

        def one(x: np.ndarray) -> torch.Tensor:  # [...] -> [1, 1, ...]
            return torch.from_numpy(x).to(self.device)[None, None]

        token = self.net.encode_frames(one(crop.img), one(crop.bbox), one(crop.focal), one(crop.princpt))
        self.tokens.append(expect_shape(token, (1, 1, self.net.token_dim), "frame token")[0, 0])
        self.timestamps.append(float(timestamp))
        pred = self.net.refine_and_decode(torch.stack(tuple(self.tokens))[None], self.window_timestamps(),
                                          one(crop.focal), one(crop.princpt))
        return self._result(pred, side, float(timestamp), focal, princpt)

    def window_timestamps(self) -> torch.Tensor:
        """The buffer's timestamps relative to its first frame, [1, t] float32 (the dataset's convention)."""
        ts = np.asarray(self.timestamps, np.float64)
        return torch.from_numpy((ts - ts[0]).astype(np.float32)).to(self.device)[None]

    def _result(self, pred: HandPrediction, side: str, timestamp: float, focal: np.ndarray,
                princpt: np.ndarray) -> TrackResult:
        pose, shape, trans = (x[:, 0] for x in pred.mano)  # [1, ...]: the newest frame
        joints, verts, trans_metric = camera_space(self.mano, pose, shape, trans, self.norm_by_hand,
                                                   self.reference_scale)
        joints, verts = joints[0].cpu().numpy(), verts[0].cpu().numpy()
        pose_np, shape_np, trans_np = (x[0].cpu().numpy() for x in (pose, shape, trans_metric))
        if side == "left":  # the network saw the mirrored image: mirror its right hand back
            pose_np, trans_np = pose_np * MIRROR_POSE, trans_np * MIRROR_POINT
            joints, verts = joints * MIRROR_POINT, verts * MIRROR_POINT
        uv = joints[:, :2] / np.clip(joints[:, 2:], 1e-6, None) * focal + princpt
        return TrackResult(pose_np, shape_np, trans_np, joints, verts, uv.astype(np.float32), side, timestamp,
                           len(self.tokens))

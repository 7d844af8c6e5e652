"""The 320-d per-frame gesture vector on MHR parameters, and the per-clip constants that are never predicted.

The one source of truth for which SAM-3D-Body output lands where: import ``PARTS`` / ``pack`` / ``unpack`` rather
than re-typing slices. Works on numpy arrays and torch tensors with any leading dims.

    body   [0:130)    body_pose_params[:130]
    hand   [130:238)  hand_pose_params (2 x 54 PCA, left then right)
    face   [238:313)  expr_params (72) then jaw = body_pose_params[130:133]
    global [313:320)  global_rot (3, Euler ZYX) then foot contact (4, CONTACT_JOINTS order)

``cam_t`` is *not* in the vector (a per-clip constant, see ``ClipConstants``): learnt per frame, it makes the
rendered camera zoom in and out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

BODY_DIM = 130
JAW_DIM = 3
HAND_DIM = 108  # 2 x 54 PCA coefficients, left then right
HAND_PCA_DIM = 54
EXPR_DIM = 72
FACE_DIM = EXPR_DIM + JAW_DIM  # 75
GLOBAL_ROT_DIM = 3
CONTACT_DIM = 4
GLOBAL_DIM = GLOBAL_ROT_DIM + CONTACT_DIM  # 7
POSE_DIM = BODY_DIM + HAND_DIM + FACE_DIM + GLOBAL_DIM  # 320

PARTS: dict[str, slice] = {
    "body": slice(0, BODY_DIM),
    "hand": slice(BODY_DIM, BODY_DIM + HAND_DIM),
    "face": slice(BODY_DIM + HAND_DIM, BODY_DIM + HAND_DIM + FACE_DIM),
    "global": slice(BODY_DIM + HAND_DIM + FACE_DIM, POSE_DIM),
}
# Finer named slices (absolute indices into the 320-d vector).
SUB_SLICES: dict[str, slice] = {
    "body": PARTS["body"],
    "hand_left": slice(PARTS["hand"].start, PARTS["hand"].start + HAND_PCA_DIM),
    "hand_right": slice(PARTS["hand"].start + HAND_PCA_DIM, PARTS["hand"].stop),
    "expr": slice(PARTS["face"].start, PARTS["face"].start + EXPR_DIM),
    "jaw": slice(PARTS["face"].start + EXPR_DIM, PARTS["face"].stop),
    "global_rot": slice(PARTS["global"].start, PARTS["global"].start + GLOBAL_ROT_DIM),
    "contact": slice(PARTS["global"].start + GLOBAL_ROT_DIM, PARTS["global"].stop),
}
VQ_PARTS: tuple[str, ...] = ("face", "body", "hand")  # parts with a VQ-VAE; "global" is regressed directly

# Foot contact channels, MHR70 keypoint indices (sam_3d_body/metadata/mhr70.py): the same joints and order as
# EMAGE's SMPL-X contact (left ankle, right ankle, left foot, right foot).
CONTACT_JOINTS: dict[str, int] = {"left_ankle": 13, "right_ankle": 14, "left_big_toe": 15, "right_big_toe": 18}

# SAM-3D-Body output keys and their per-frame sizes, as produced by ``unpack``.
FRAME_KEYS: dict[str, int] = {
    "body_pose_params": BODY_DIM + JAW_DIM,
    "hand_pose_params": HAND_DIM,
    "expr_params": EXPR_DIM,
    "global_rot": GLOBAL_ROT_DIM,
}

Array = np.ndarray | torch.Tensor


def _cat(parts: list[Array], like: Array) -> Array:
    if isinstance(like, torch.Tensor):
        return torch.cat([torch.as_tensor(p, dtype=like.dtype, device=like.device) for p in parts], dim=-1)
    return np.concatenate([np.asarray(p, dtype=like.dtype) for p in parts], axis=-1)


def _check_last(x: Array, size: int, name: str) -> None:
    if x.shape[-1] != size:
        raise ValueError(f"{name}: expected last dim {size}, got shape {tuple(x.shape)}")


def pack(frames: Mapping[str, Array], contact: Array) -> Array:
    """SAM-3D-Body per-frame outputs -> layout vector: ``{key: [..., d]}``, contact ``[..., 4]`` -> ``[..., 320]``.

    ``frames`` needs ``body_pose_params [..., 133]``, ``hand_pose_params [..., 108]``, ``expr_params [..., 72]``,
    ``global_rot [..., 3]``; extra keys are ignored. Output type/dtype follow ``body_pose_params``.
    """
    for key, size in FRAME_KEYS.items():
        if key not in frames:
            raise KeyError(f"pack: missing key {key!r}")
        _check_last(frames[key], size, key)
    _check_last(contact, CONTACT_DIM, "contact")
    body = frames["body_pose_params"]
    lead = tuple(body.shape[:-1])
    for key in (*FRAME_KEYS, "contact"):
        x = contact if key == "contact" else frames[key]
        if tuple(x.shape[:-1]) != lead:
            raise ValueError(f"pack: {key} has leading shape {tuple(x.shape[:-1])}, body_pose_params has {lead}")
    out = _cat(
        [body[..., :BODY_DIM], frames["hand_pose_params"], frames["expr_params"], body[..., BODY_DIM:],
         frames["global_rot"], contact],
        like=body,
    )
    assert out.shape[-1] == POSE_DIM
    return out


def unpack(vec: Array) -> dict[str, Array]:
    """Layout vector -> SAM-3D-Body keys: ``[..., 320]`` -> ``body_pose_params [..., 133]``,
    ``hand_pose_params [..., 108]``, ``expr_params [..., 72]``, ``global_rot [..., 3]``, ``contact [..., 4]``.

    Returns new arrays (never views into ``vec``), so editing the result cannot change the input.
    """
    _check_last(vec, POSE_DIM, "vec")
    s = SUB_SLICES
    body = _cat([vec[..., s["body"]], vec[..., s["jaw"]]], like=vec)
    copy = (lambda x: x.clone()) if isinstance(vec, torch.Tensor) else (lambda x: x.copy())
    return {
        "body_pose_params": body,
        "hand_pose_params": copy(vec[..., PARTS["hand"]]),
        "expr_params": copy(vec[..., s["expr"]]),
        "global_rot": copy(vec[..., s["global_rot"]]),
        "contact": copy(vec[..., s["contact"]]),
    }


@dataclass(frozen=True)
class ClipConstants:
    """What a renderer needs besides the predicted frames; constant over a clip and never predicted.

    ``cam_t`` is the mean of ``pred_cam_t`` over the clip's frames; ``focal_length`` the mean per-frame focal.
    """

    cam_t: tuple[float, float, float]
    focal_length: float
    scale_params: tuple[float, ...] = field(repr=False)  # 28
    shape_params: tuple[float, ...] = field(repr=False)  # 45
    width: int
    height: int
    fps: float

    SCALE_DIM = 28
    SHAPE_DIM = 45

    def __post_init__(self) -> None:
        if len(self.cam_t) != 3:
            raise ValueError(f"cam_t must have 3 values, got {len(self.cam_t)}")
        if len(self.scale_params) != self.SCALE_DIM:
            raise ValueError(f"scale_params must have {self.SCALE_DIM} values, got {len(self.scale_params)}")
        if len(self.shape_params) != self.SHAPE_DIM:
            raise ValueError(f"shape_params must have {self.SHAPE_DIM} values, got {len(self.shape_params)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (lists of floats)."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClipConstants:
        def floats(x) -> tuple[float, ...]:
            return tuple(float(v) for v in np.asarray(x, dtype=np.float64).reshape(-1))

        return cls(
            cam_t=floats(d["cam_t"]),  # type: ignore[arg-type]
            focal_length=float(np.asarray(d["focal_length"]).reshape(-1)[0]),
            scale_params=floats(d["scale_params"]),
            shape_params=floats(d["shape_params"]),
            width=int(np.asarray(d["width"]).reshape(-1)[0]),
            height=int(np.asarray(d["height"]).reshape(-1)[0]),
            fps=float(np.asarray(d["fps"]).reshape(-1)[0]),
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays with the SAM-3D-Body key names, for writing next to predictions (``np.savez``)."""
        return {
            "cam_t": np.asarray(self.cam_t, dtype=np.float32),
            "focal_length": np.asarray(self.focal_length, dtype=np.float32),
            "scale_params": np.asarray(self.scale_params, dtype=np.float32),
            "shape_params": np.asarray(self.shape_params, dtype=np.float32),
            "width": np.asarray(self.width, dtype=np.int64),
            "height": np.asarray(self.height, dtype=np.int64),
            "fps": np.asarray(self.fps, dtype=np.float32),
        }

"""MHR's 204 model parameters from the per-frame parameters the generator predicts, composed as SAM-3D-Body's head
composes them before it calls MHR (``mhr_forward`` of its MHR head), so that generated motion can be drawn with
MHR (``MHR.forward(identity=shape_params [B, 45], model_params [B, 204], face_expr=expr_params [B, 72])``).

``model_params = [global_trans * 10 (3, zero: the camera carries the translation), global_rot (3, the Euler angles
as predicted), body_pose_params[:130] with each hand's 27 joint parameters replaced, scales (68)]`` where

- scales = ``scale_mean + scale_params @ scale_comps`` ([28] -> [68]);
- a hand's 27 parameters come from its 54 PCA coefficients: ``hand_pose_mean + coeffs @ hand_pose_comps`` is a
  continuous vector per hand joint (6 numbers, two rotation-matrix columns, for a 3-DoF joint; sin, cos for each
  of the 1- and 2-DoF joints), turned into XYZ Euler angles / angles (``hand_cont_to_model_params``), written at
  ``hand_joint_idxs_left`` / ``_right`` of the 136 pose parameters.

The bases are the head's buffers, read from a SAM-3D-Body checkpoint (``HeadBases.from_checkpoint``; they are not
in this repository and not downloadable here). Rotation matrices and Euler angles go through roma.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import roma
import torch

from common.checkpoint import read_state_dict
from common.shapes import expect_shape

# Degrees of freedom of MHR's 16 hand joints in model-parameter order (27 in all).
HAND_DOFS = (3, 1, 1, 3, 1, 1, 3, 1, 1, 3, 1, 1, 2, 3, 1, 1)
HAND_CONT_DIM, HAND_PARAM_DIM, POSE_PARAM_DIM, SCALE_DIM = 54, 27, 136, 68
BUFFERS = ("scale_mean", "scale_comps", "hand_pose_mean", "hand_pose_comps", "hand_joint_idxs_left",
           "hand_joint_idxs_right")
HEAD_PREFIX = "head_pose."  # SAM-3D-Body's body head (its hand-crop head is head_pose_hand.)


@dataclass(frozen=True)
class HeadBases:
    scale_mean: torch.Tensor  # [68]
    scale_comps: torch.Tensor  # [28, 68]
    hand_pose_mean: torch.Tensor  # [54]
    hand_pose_comps: torch.Tensor  # [54, 54]
    hand_joint_idxs_left: torch.Tensor  # [27] long, into the 136 pose parameters
    hand_joint_idxs_right: torch.Tensor  # [27] long

    def __post_init__(self) -> None:
        expect_shape(self.scale_mean, (SCALE_DIM,), "scale_mean")
        expect_shape(self.scale_comps, (28, SCALE_DIM), "scale_comps")
        expect_shape(self.hand_pose_mean, (HAND_CONT_DIM,), "hand_pose_mean")
        expect_shape(self.hand_pose_comps, (HAND_CONT_DIM, HAND_CONT_DIM), "hand_pose_comps")
        for side in ("left", "right"):
            idx = expect_shape(getattr(self, f"hand_joint_idxs_{side}"), (HAND_PARAM_DIM,), f"hand_joint_idxs_{side}")
            if idx.min() < 0 or idx.max() >= POSE_PARAM_DIM:
                raise ValueError(f"hand_joint_idxs_{side}: indices must lie in [0, {POSE_PARAM_DIM})")

    @classmethod
    def from_checkpoint(cls, path: str | Path, prefix: str = HEAD_PREFIX) -> HeadBases:
        """The bases of a SAM-3D-Body checkpoint (``model.ckpt``; keys ``head_pose.<buffer>``)."""
        state = read_state_dict(path)
        missing = [prefix + name for name in BUFFERS if prefix + name not in state]
        if missing:
            raise KeyError(f"{path}: not a SAM-3D-Body checkpoint with its MHR head: missing {missing}")
        return cls(**{name: state[prefix + name].detach().cpu() for name in BUFFERS})


def _masks() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    three_cont = torch.cat([torch.full((2 * k,), k == 3) for k in HAND_DOFS])
    one_cont = torch.cat([torch.full((2 * k,), k in (1, 2)) for k in HAND_DOFS])
    three_param = torch.cat([torch.full((k,), k == 3) for k in HAND_DOFS])
    one_param = torch.cat([torch.full((k,), k in (1, 2)) for k in HAND_DOFS])
    return three_cont, one_cont, three_param, one_param


def hand_cont_to_model_params(cont: torch.Tensor) -> torch.Tensor:
    """A hand's continuous pose ``[..., 54]`` -> its 27 MHR model parameters ``[..., 27]``: per 3-DoF joint the
    XYZ Euler angles of the rotation whose first two columns are its 6 numbers (Gram-Schmidt), per 1-DoF angle
    ``atan2(sin, cos)`` of its pair."""
    expect_shape(cont, (*cont.shape[:-1], HAND_CONT_DIM), "hand continuous pose")
    three_cont, one_cont, three_param, one_param = (m.to(cont.device) for m in _masks())
    six = cont[..., three_cont].unflatten(-1, (-1, 2, 3))  # [..., 4, 2, 3]: two columns per joint
    matrix = roma.special_gramschmidt(six.transpose(-1, -2))  # [..., 4, 3, 3]
    euler = roma.rotmat_to_euler("xyz", matrix)  # extrinsic x, y, z: R = Rz Ry Rx
    sincos = cont[..., one_cont].unflatten(-1, (-1, 2))
    out = cont.new_zeros(*cont.shape[:-1], HAND_PARAM_DIM)
    out[..., three_param] = euler.flatten(-2)
    out[..., one_param] = torch.atan2(sincos[..., 0], sincos[..., 1])
    return out


def compose_model_params(global_rot: torch.Tensor, body_pose: torch.Tensor, hand_pose: torch.Tensor,
                         scale_params: torch.Tensor, bases: HeadBases) -> torch.Tensor:
    """Per-frame ``global_rot [N, 3]``, ``body_pose_params [N, 133]`` (130 body + jaw), ``hand_pose_params
    [N, 108]`` (left then right, 54 PCA each) and ``scale_params [N or 1, 28]`` -> MHR ``model_params [N, 204]``
    (a new tensor)."""
    n = global_rot.shape[0]
    expect_shape(global_rot, (n, 3), "global_rot")
    expect_shape(body_pose, (n, 133), "body_pose_params")
    expect_shape(hand_pose, (n, 2 * HAND_CONT_DIM), "hand_pose_params")
    scales = bases.scale_mean.to(scale_params) + scale_params @ bases.scale_comps.to(scale_params)
    scales = expect_shape(scales.expand(n, SCALE_DIM), (n, SCALE_DIM), "scales")
    pose = torch.cat([torch.zeros_like(global_rot), global_rot, body_pose[:, :130]], dim=1)  # [N, 136]
    comps, mean = bases.hand_pose_comps.to(hand_pose), bases.hand_pose_mean.to(hand_pose)
    for side, coeffs in zip(("left", "right"), hand_pose.split(HAND_CONT_DIM, dim=1)):
        idx = getattr(bases, f"hand_joint_idxs_{side}").to(pose.device).long()
        pose[:, idx] = hand_cont_to_model_params(mean + coeffs @ comps)
    return torch.cat([pose, scales], dim=1)

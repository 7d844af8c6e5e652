"""Forward kinematics and linear blend skinning for SMPL-family models (MANO here), batched over any dims.

Same semantics and tensor layouts as ``smplx.lbs`` (checked against it in tests/test_kinematics.py), but
without smplx's single batch dim. Rotation conversions live in common.rotations; model loading elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from common.rotations import axis_angle_to_matrix
from common.shapes import ShapeError, expect_shape

__all__ = [
    "blend_shapes",
    "forward_kinematics",
    "linear_blend_skinning",
    "validate_parents",
    "vertices_to_joints",
]


def validate_parents(parents: Sequence[int] | torch.Tensor, num_joints: int | None = None) -> list[int]:
    """Check a kinematic tree and return it as a list: parents[0] == -1 and 0 <= parents[i] < i.

    The parent-before-child order is what lets forward kinematics run in one pass over the joints.
    """
    parent_list = [int(p) for p in (parents.tolist() if isinstance(parents, torch.Tensor) else parents)]
    if num_joints is not None and len(parent_list) != num_joints:
        raise ValueError(f"parents: expected {num_joints} entries (one per joint), got {len(parent_list)}")
    if not parent_list or parent_list[0] != -1:
        raise ValueError(f"parents[0] must be -1 (the root), got {parent_list[:1]}")
    for i, p in enumerate(parent_list[1:], start=1):
        if not 0 <= p < i:
            raise ValueError(
                f"parents[{i}] = {p}: every joint's parent must come before it (0 <= parent < index); "
                "reorder the joints topologically"
            )
    return parent_list


def forward_kinematics(
    rot_mats: torch.Tensor, rest_joints: torch.Tensor, parents: Sequence[int] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """rot_mats [..., J, 3, 3] (local), rest_joints [..., J, 3] -> (posed_joints [..., J, 3], rel_transforms [..., J, 4, 4]).

    As ``smplx.lbs.batch_rigid_transform``: rel_transforms are the global joint transforms with the rest
    position removed (G_j @ translate(-rest_j)), i.e. what skinning applies to rest-pose vertices. Leading
    dims of the two inputs broadcast (e.g. one rest skeleton [J, 3] for a batch of poses).
    """
    num_joints = rot_mats.shape[-3] if rot_mats.dim() >= 3 else -1
    expect_shape(rot_mats, (*rot_mats.shape[:-3], num_joints, 3, 3), "rot_mats")
    expect_shape(rest_joints, (*rest_joints.shape[:-2], num_joints, 3), "rest_joints")
    parent_list = validate_parents(parents, num_joints)

    batch_shape = torch.broadcast_shapes(rot_mats.shape[:-3], rest_joints.shape[:-2])
    rot_mats_b = rot_mats.expand(*batch_shape, num_joints, 3, 3)
    rest_joints_b = rest_joints.expand(*batch_shape, num_joints, 3)

    # Each joint's offset from its parent in the rest pose; the root keeps its absolute position.
    offsets = torch.cat(
        [rest_joints_b[..., :1, :], rest_joints_b[..., 1:, :] - rest_joints_b[..., parent_list[1:], :]],
        dim=-2,
    )
    local = _rigid_transform(rot_mats_b, offsets)  # [..., J, 4, 4]
    chain = [local[..., 0, :, :]]
    for i in range(1, num_joints):
        chain.append(chain[parent_list[i]] @ local[..., i, :, :])
    transforms = torch.stack(chain, dim=-3)  # [..., J, 4, 4] global

    posed_joints = transforms[..., :3, 3]
    rotated_rest = (transforms[..., :3, :3] @ rest_joints_b[..., None]).squeeze(-1)
    rel_transforms = _rigid_transform(transforms[..., :3, :3], posed_joints - rotated_rest)
    return posed_joints, rel_transforms


def _rigid_transform(rot: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """rot [..., 3, 3], trans [..., 3] -> homogeneous [..., 4, 4]."""
    top = torch.cat([rot, trans[..., None]], dim=-1)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1
    return torch.cat([top, bottom], dim=-2)


def blend_shapes(betas: torch.Tensor, shapedirs: torch.Tensor) -> torch.Tensor:
    """betas [..., S], shapedirs [V, 3, S] -> per-vertex displacement [..., V, 3]."""
    expect_shape(shapedirs, (None, 3, betas.shape[-1]), "shapedirs")
    return torch.einsum("...s,vcs->...vc", betas, shapedirs)


def vertices_to_joints(J_regressor: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    """J_regressor [J, V], vertices [..., V, 3] -> joints [..., J, 3]."""
    expect_shape(J_regressor, (None, vertices.shape[-2]), "J_regressor")
    expect_shape(vertices, (*vertices.shape[:-1], 3), "vertices")
    return torch.einsum("jv,...vc->...jc", J_regressor, vertices)


def linear_blend_skinning(
    betas: torch.Tensor,
    pose: torch.Tensor,
    v_template: torch.Tensor,
    shapedirs: torch.Tensor,
    posedirs: torch.Tensor,
    J_regressor: torch.Tensor,
    parents: Sequence[int] | torch.Tensor,
    lbs_weights: torch.Tensor,
    pose2rot: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """betas [..., S], pose [..., J*3] -> (vertices [..., V, 3], joints [..., J, 3]); as ``smplx.lbs.lbs``.

    Model tensors (smplx layout): v_template [V, 3], shapedirs [V, 3, S], posedirs [(J-1)*9, V*3],
    J_regressor [J, V], lbs_weights [V, J]. With ``pose2rot=False`` pose is local rotations [..., J, 3, 3].
    Leading dims of betas and pose broadcast (e.g. betas [b, 1, S] with pose [b, t, J*3]).
    """
    num_verts, num_joints = lbs_weights.shape[0], J_regressor.shape[0]
    expect_shape(v_template, (num_verts, 3), "v_template")
    expect_shape(shapedirs, (num_verts, 3, betas.shape[-1]), "shapedirs")
    expect_shape(posedirs, ((num_joints - 1) * 9, num_verts * 3), "posedirs")
    expect_shape(J_regressor, (num_joints, num_verts), "J_regressor")
    expect_shape(lbs_weights, (num_verts, num_joints), "lbs_weights")
    if pose2rot:
        expect_shape(pose, (*pose.shape[:-1], num_joints * 3), "pose (axis-angle)")
        rot_mats = axis_angle_to_matrix(pose.unflatten(-1, (num_joints, 3)))
    else:
        expect_shape(pose, (*pose.shape[:-3], num_joints, 3, 3), "pose (rotation matrices)")
        rot_mats = pose
    try:
        torch.broadcast_shapes(betas.shape[:-1], rot_mats.shape[:-3])
    except RuntimeError as err:
        raise ShapeError(
            f"betas {tuple(betas.shape)} and pose {tuple(pose.shape)}: leading dims do not broadcast"
        ) from err

    v_shaped = v_template + blend_shapes(betas, shapedirs)  # [...b, V, 3]
    rest_joints = vertices_to_joints(J_regressor, v_shaped)  # [...b, J, 3]

    eye = torch.eye(3, dtype=rot_mats.dtype, device=rot_mats.device)
    pose_feature = (rot_mats[..., 1:, :, :] - eye).flatten(-3)  # [...p, (J-1)*9]
    pose_offsets = (pose_feature @ posedirs).unflatten(-1, (num_verts, 3))
    v_posed = v_shaped + pose_offsets  # [..., V, 3]

    posed_joints, rel_transforms = forward_kinematics(rot_mats, rest_joints, parents)
    per_vertex = torch.einsum("vj,...jab->...vab", lbs_weights, rel_transforms)  # [..., V, 4, 4]
    vertices = (per_vertex[..., :3, :3] @ v_posed[..., None]).squeeze(-1) + per_vertex[..., :3, 3]
    return vertices, posed_joints

"""common.kinematics against smplx.lbs on small random models (J=16, V=100), batched over extra dims."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from smplx.lbs import batch_rigid_transform, lbs

from common import kinematics as kin
from common.rotations import axis_angle_to_matrix
from common.shapes import ShapeError

NUM_JOINTS, NUM_VERTS, NUM_BETAS = 16, 100, 10


@dataclass
class RandomModel:
    v_template: torch.Tensor
    shapedirs: torch.Tensor
    posedirs: torch.Tensor
    J_regressor: torch.Tensor
    parents: torch.Tensor
    lbs_weights: torch.Tensor

    def to(self, dtype: torch.dtype) -> RandomModel:
        return RandomModel(**{k: v if k == "parents" else v.to(dtype) for k, v in vars(self).items()})

    def as_args(self) -> tuple:
        return (
            self.v_template,
            self.shapedirs,
            self.posedirs,
            self.J_regressor,
            self.parents,
            self.lbs_weights,
        )


def _random_parents(num_joints: int, gen: torch.Generator) -> torch.Tensor:
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, num_joints)]
    return torch.tensor(parents, dtype=torch.long)


@pytest.fixture(scope="module")
def model() -> RandomModel:
    gen = torch.Generator().manual_seed(0)
    regressor = torch.rand(NUM_JOINTS, NUM_VERTS, generator=gen, dtype=torch.float64)
    weights = torch.rand(NUM_VERTS, NUM_JOINTS, generator=gen, dtype=torch.float64) ** 4  # peaky, like real
    return RandomModel(
        v_template=torch.randn(NUM_VERTS, 3, generator=gen, dtype=torch.float64) * 0.1,
        shapedirs=torch.randn(NUM_VERTS, 3, NUM_BETAS, generator=gen, dtype=torch.float64) * 0.01,
        posedirs=torch.randn((NUM_JOINTS - 1) * 9, NUM_VERTS * 3, generator=gen, dtype=torch.float64) * 0.01,
        J_regressor=regressor / regressor.sum(-1, keepdim=True),
        parents=_random_parents(NUM_JOINTS, gen),
        lbs_weights=weights / weights.sum(-1, keepdim=True),
    )


def _random_inputs(lead: tuple[int, ...], seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    betas = torch.randn(*lead, NUM_BETAS, generator=gen, dtype=torch.float64)
    pose = torch.randn(*lead, NUM_JOINTS * 3, generator=gen, dtype=torch.float64) * 0.8
    return betas.to(dtype), pose.to(dtype)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-6)])
def test_lbs_matches_smplx_with_leading_dims(model, dtype, tol):
    m = model.to(dtype)
    betas, pose = _random_inputs((2, 3), seed=1, dtype=dtype)
    verts, joints = kin.linear_blend_skinning(betas, pose, *m.as_args())
    assert verts.shape == (2, 3, NUM_VERTS, 3) and joints.shape == (2, 3, NUM_JOINTS, 3)
    assert verts.dtype == dtype
    ref_verts, ref_joints = lbs(betas.reshape(6, -1), pose.reshape(6, -1), *m.as_args())
    # smplx's batch_rodrigues adds 1e-8 to the axis-angle, hence no tighter than ~1e-7 with pose2rot=True.
    torch.testing.assert_close(verts.reshape(6, NUM_VERTS, 3), ref_verts, atol=tol, rtol=0)
    torch.testing.assert_close(joints.reshape(6, NUM_JOINTS, 3), ref_joints, atol=tol, rtol=0)


def test_lbs_with_rotation_matrices_matches_smplx_to_float64_precision(model):
    betas, pose = _random_inputs((2, 3), seed=2, dtype=torch.float64)
    rot_mats = axis_angle_to_matrix(pose.unflatten(-1, (NUM_JOINTS, 3)))  # [2, 3, J, 3, 3]
    verts, joints = kin.linear_blend_skinning(betas, rot_mats, *model.as_args(), pose2rot=False)
    ref_verts, ref_joints = lbs(
        betas.reshape(6, -1), rot_mats.reshape(6, NUM_JOINTS, 3, 3), *model.as_args(), pose2rot=False
    )
    torch.testing.assert_close(verts.reshape(6, NUM_VERTS, 3), ref_verts, atol=1e-12, rtol=0)
    torch.testing.assert_close(joints.reshape(6, NUM_JOINTS, 3), ref_joints, atol=1e-12, rtol=0)


def test_lbs_broadcasts_shared_betas_over_time(model):
    betas, pose = _random_inputs((2, 4), seed=3, dtype=torch.float64)
    betas_per_seq = betas[:, :1]  # [2, 1, S]: one shape per sequence
    verts, joints = kin.linear_blend_skinning(betas_per_seq, pose, *model.as_args())
    expanded, _ = kin.linear_blend_skinning(betas_per_seq.expand(2, 4, -1), pose, *model.as_args())
    assert verts.shape == (2, 4, NUM_VERTS, 3)
    torch.testing.assert_close(verts, expanded, atol=1e-12, rtol=0)


def test_zero_pose_zero_betas_gives_template_and_regressed_joints(model):
    betas = torch.zeros(1, NUM_BETAS, dtype=torch.float64)
    pose = torch.zeros(1, NUM_JOINTS * 3, dtype=torch.float64)
    verts, joints = kin.linear_blend_skinning(betas, pose, *model.as_args())
    torch.testing.assert_close(verts[0], model.v_template, atol=1e-12, rtol=0)
    torch.testing.assert_close(joints[0], model.J_regressor @ model.v_template, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_kinematics_matches_smplx_batch_rigid_transform(model, dtype):
    gen = torch.Generator().manual_seed(4)
    rot_mats = axis_angle_to_matrix(torch.randn(2, 3, NUM_JOINTS, 3, generator=gen, dtype=torch.float64))
    rest_joints = torch.randn(2, 3, NUM_JOINTS, 3, generator=gen, dtype=torch.float64)
    rot_mats, rest_joints = rot_mats.to(dtype), rest_joints.to(dtype)
    posed, rel = kin.forward_kinematics(rot_mats, rest_joints, model.parents)
    assert posed.shape == (2, 3, NUM_JOINTS, 3) and rel.shape == (2, 3, NUM_JOINTS, 4, 4)
    ref_posed, ref_rel = batch_rigid_transform(
        rot_mats.reshape(6, NUM_JOINTS, 3, 3),
        rest_joints.reshape(6, NUM_JOINTS, 3),
        model.parents,
        dtype=dtype,
    )
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(posed.reshape(6, NUM_JOINTS, 3), ref_posed, atol=tol, rtol=0)
    torch.testing.assert_close(rel.reshape(6, NUM_JOINTS, 4, 4), ref_rel, atol=tol, rtol=0)


def test_forward_kinematics_accepts_list_parents_and_shared_rest_skeleton(model):
    gen = torch.Generator().manual_seed(5)
    rot_mats = axis_angle_to_matrix(torch.randn(4, NUM_JOINTS, 3, generator=gen, dtype=torch.float64))
    rest = torch.randn(NUM_JOINTS, 3, generator=gen, dtype=torch.float64)
    posed, rel = kin.forward_kinematics(rot_mats, rest, model.parents.tolist())
    ref_posed, ref_rel = batch_rigid_transform(
        rot_mats, rest.expand(4, -1, -1), model.parents, dtype=torch.float64
    )
    torch.testing.assert_close(posed, ref_posed, atol=1e-12, rtol=0)
    torch.testing.assert_close(rel, ref_rel, atol=1e-12, rtol=0)


def test_blend_shapes_and_vertices_to_joints_match_smplx(model):
    from smplx.lbs import blend_shapes, vertices2joints

    betas, _ = _random_inputs((5,), seed=6, dtype=torch.float64)
    offsets = kin.blend_shapes(betas, model.shapedirs)
    torch.testing.assert_close(offsets, blend_shapes(betas, model.shapedirs), atol=1e-12, rtol=0)
    verts = torch.randn(2, 5, NUM_VERTS, 3, dtype=torch.float64)
    joints = kin.vertices_to_joints(model.J_regressor, verts)
    ref = vertices2joints(model.J_regressor, verts.reshape(10, NUM_VERTS, 3))
    torch.testing.assert_close(joints.reshape(10, NUM_JOINTS, 3), ref, atol=1e-12, rtol=0)


def test_gradients_flow_through_lbs_at_zero_pose(model):
    betas = torch.zeros(2, NUM_BETAS, dtype=torch.float64, requires_grad=True)
    pose = torch.zeros(2, NUM_JOINTS * 3, dtype=torch.float64, requires_grad=True)
    verts, joints = kin.linear_blend_skinning(betas, pose, *model.as_args())
    (verts.square().sum() + joints.sum()).backward()
    assert torch.isfinite(pose.grad).all() and pose.grad.abs().sum() > 0
    assert torch.isfinite(betas.grad).all() and betas.grad.abs().sum() > 0


def test_inputs_are_not_modified(model):
    betas, pose = _random_inputs((3,), seed=7, dtype=torch.float64)
    args = model.as_args()
    saved = [t.clone() for t in (betas, pose, *args)]
    kin.linear_blend_skinning(betas, pose, *args)
    for before, after in zip(saved, (betas, pose, *args)):
        assert torch.equal(before, after)


@pytest.mark.parametrize(
    ("parents", "message"),
    [
        ([-1, 0, 3, 1], r"parents\[2\] = 3"),  # child before its parent
        ([-1, 0, 2, 1], r"parents\[2\] = 2"),  # self-loop
        ([0, -1, 1, 2], r"parents\[0\] must be -1"),
        ([-1, 0, 1], "expected 4 entries"),
    ],
)
def test_invalid_parents_raise(parents, message):
    rot_mats = torch.eye(3).expand(4, 3, 3)
    with pytest.raises(ValueError, match=message):
        kin.forward_kinematics(rot_mats, torch.zeros(4, 3), parents)


def test_bad_model_shapes_raise(model):
    betas, pose = _random_inputs((2,), seed=8, dtype=torch.float64)
    with pytest.raises(ShapeError, match="pose"):
        kin.linear_blend_skinning(betas, pose[:, :-3], *model.as_args())
    bad_posedirs = model.posedirs[:-9]
    args = list(model.as_args())
    args[2] = bad_posedirs
    with pytest.raises(ShapeError, match="posedirs"):
        kin.linear_blend_skinning(betas, pose, *args)
    with pytest.raises(ShapeError, match="leading dims"):
        kin.linear_blend_skinning(
            betas[:, None].expand(2, 3, -1), pose[:, None].expand(2, 2, -1), *model.as_args()
        )

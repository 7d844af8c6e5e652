"""common.rotations against scipy's Rotation (and roma as a second reference), at 0, near pi and in between."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import roma
import torch
from scipy.spatial.transform import Rotation

from common import rotations as rot
from common.shapes import ShapeError

F64 = torch.float64


def _random_axis_angle(n: int, seed: int, max_angle: float = math.pi) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    axis = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen, dtype=F64), dim=-1)
    angle = torch.rand(n, 1, generator=gen, dtype=F64) * max_angle
    return axis * angle


def _scipy_matrix(aa: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(Rotation.from_rotvec(aa.reshape(-1, 3).numpy()).as_matrix()).reshape(*aa.shape, 3)


def _unit_axes(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, 3, generator=gen, dtype=F64), dim=-1)


# ---------------------------------------------------------------- against scipy, random rotations


def test_axis_angle_to_matrix_matches_scipy_with_leading_dims():
    aa = _random_axis_angle(30, seed=0, max_angle=3 * math.pi).reshape(2, 3, 5, 3)
    R = rot.axis_angle_to_matrix(aa)
    assert R.shape == (2, 3, 5, 3, 3) and R.dtype == F64
    torch.testing.assert_close(R, _scipy_matrix(aa), atol=1e-12, rtol=0)


def test_matrix_to_axis_angle_matches_scipy_rotvec():
    aa = _random_axis_angle(200, seed=1)
    R = _scipy_matrix(aa)
    expected = torch.from_numpy(Rotation.from_matrix(R.numpy()).as_rotvec())
    torch.testing.assert_close(rot.matrix_to_axis_angle(R), expected, atol=1e-12, rtol=0)


def test_quaternion_to_matrix_matches_scipy_and_normalises():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(50, 4, generator=gen, dtype=F64) * 3  # deliberately not unit
    q_xyzw = q[:, [1, 2, 3, 0]].numpy()
    expected = torch.from_numpy(Rotation.from_quat(q_xyzw).as_matrix())
    torch.testing.assert_close(rot.quaternion_to_matrix(q), expected, atol=1e-12, rtol=0)


def test_matrix_to_quaternion_matches_scipy_with_nonnegative_w():
    aa = _random_axis_angle(200, seed=3)
    R = _scipy_matrix(aa)
    q = rot.matrix_to_quaternion(R)
    expected_xyzw = Rotation.from_matrix(R.numpy()).as_quat(canonical=True)
    expected = torch.from_numpy(expected_xyzw[:, [3, 0, 1, 2]])
    assert (q[:, 0] >= 0).all()
    torch.testing.assert_close(q, expected, atol=1e-12, rtol=0)


def test_axis_angle_to_quaternion_matches_scipy():
    aa = _random_axis_angle(100, seed=4)
    expected = torch.from_numpy(Rotation.from_rotvec(aa.numpy()).as_quat(canonical=True)[:, [3, 0, 1, 2]])
    torch.testing.assert_close(rot.axis_angle_to_quaternion(aa), expected, atol=1e-12, rtol=0)


def test_roma_agrees_on_axis_angle_and_quaternion():
    aa = _random_axis_angle(100, seed=5)
    torch.testing.assert_close(rot.axis_angle_to_matrix(aa), roma.rotvec_to_rotmat(aa), atol=1e-12, rtol=0)
    q_wxyz = rot.axis_angle_to_quaternion(aa)
    torch.testing.assert_close(q_wxyz[:, [1, 2, 3, 0]], roma.rotvec_to_unitquat(aa), atol=1e-12, rtol=0)


def test_float32_matches_scipy_and_keeps_dtype():
    aa = _random_axis_angle(100, seed=6).float()
    R = rot.axis_angle_to_matrix(aa)
    assert R.dtype == torch.float32
    torch.testing.assert_close(R.double(), _scipy_matrix(aa.double()), atol=1e-6, rtol=0)
    back = rot.matrix_to_axis_angle(R)
    assert back.dtype == torch.float32
    torch.testing.assert_close(back.double(), aa.double(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- near zero


@pytest.mark.parametrize("magnitude", [0.0, 1e-12, 1e-8, 1e-4, 1e-2])
def test_small_angles_match_scipy_and_round_trip(magnitude):
    aa = _unit_axes(20, seed=7) * magnitude
    R = rot.axis_angle_to_matrix(aa)
    torch.testing.assert_close(R, _scipy_matrix(aa), atol=1e-15, rtol=0)
    # Relative accuracy of the recovered vector, not just absolute: the axis must survive tiny angles.
    torch.testing.assert_close(rot.matrix_to_axis_angle(R), aa, atol=1e-15, rtol=1e-7)
    q = rot.axis_angle_to_quaternion(aa)
    torch.testing.assert_close(rot.quaternion_to_axis_angle(q), aa, atol=1e-20, rtol=1e-12)


def test_exact_zero_gives_identity_and_zero():
    zeros = torch.zeros(4, 3, dtype=F64)
    eye = torch.eye(3, dtype=F64).expand(4, 3, 3)
    torch.testing.assert_close(rot.axis_angle_to_matrix(zeros), eye, atol=0, rtol=0)
    torch.testing.assert_close(rot.matrix_to_axis_angle(eye), zeros, atol=0, rtol=0)
    q_identity = torch.tensor([[1.0, 0, 0, 0]], dtype=F64)
    torch.testing.assert_close(rot.axis_angle_to_quaternion(zeros[:1]), q_identity, atol=0, rtol=0)
    torch.testing.assert_close(rot.matrix_to_quaternion(eye[:1]), q_identity, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_are_finite_at_exact_zero(dtype):
    functions = {
        "axis_angle_to_matrix": rot.axis_angle_to_matrix,
        "axis_angle_to_quaternion": rot.axis_angle_to_quaternion,
        "axis_angle_to_rotation_6d": rot.axis_angle_to_rotation_6d,
        "quaternion round trip": lambda a: rot.quaternion_to_axis_angle(rot.axis_angle_to_quaternion(a)),
        "matrix round trip": lambda a: rot.matrix_to_axis_angle(rot.axis_angle_to_matrix(a)),
        "6d round trip": lambda a: rot.rotation_6d_to_axis_angle(rot.axis_angle_to_rotation_6d(a)),
    }
    for name, fn in functions.items():
        aa = torch.zeros(2, 3, dtype=dtype, requires_grad=True)
        out = fn(aa)
        weights = torch.linspace(-1, 1, out.numel(), dtype=dtype).reshape(out.shape)
        (grad,) = torch.autograd.grad((out * weights).sum(), aa)
        assert torch.isfinite(grad).all(), f"{name}: non-finite gradient at zero: {grad}"
        assert grad.abs().sum() > 0, f"{name}: gradient vanished at zero"


def test_round_trip_jacobian_is_identity_at_zero():
    aa = torch.zeros(3, dtype=F64, requires_grad=True)
    jac = torch.autograd.functional.jacobian(
        lambda a: rot.matrix_to_axis_angle(rot.axis_angle_to_matrix(a)), aa
    )
    torch.testing.assert_close(jac, torch.eye(3, dtype=F64), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "point",
    [[0.0, 0.0, 0.0], [1e-9, -2e-9, 3e-9], [3e-3, -4e-3, 1e-3], [0.3, -1.2, 0.5], [2.0, 1.0, -1.5]],
)
def test_gradcheck_axis_angle_to_matrix(point):
    aa = torch.tensor(point, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(rot.axis_angle_to_matrix, (aa,))


@pytest.mark.parametrize("point", [[0.0, 0.0, 0.0], [1e-9, 2e-9, 0.0], [0.4, 0.2, -0.7]])
def test_gradcheck_quaternion_paths(point):
    aa = torch.tensor(point, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(rot.axis_angle_to_quaternion, (aa,))
    q = rot.axis_angle_to_quaternion(aa.detach()).requires_grad_(True)
    assert torch.autograd.gradcheck(rot.quaternion_to_axis_angle, (q,))


# ---------------------------------------------------------------- near pi


@pytest.mark.parametrize("angle", [math.pi - 1e-6, math.pi - 1e-10, math.pi])
def test_near_pi_matrix_to_axis_angle(angle):
    axes = _unit_axes(50, seed=8)
    aa = axes * angle
    R = _scipy_matrix(aa)
    out = rot.matrix_to_axis_angle(R)
    norms = out.norm(dim=-1)
    assert (norms <= math.pi + 1e-12).all()
    torch.testing.assert_close(norms, torch.full_like(norms, angle), atol=1e-9, rtol=0)
    torch.testing.assert_close(rot.axis_angle_to_matrix(out), R, atol=1e-12, rtol=0)
    if angle < math.pi - 1e-8:  # the axis sign is determined: compare directly with scipy and the input
        torch.testing.assert_close(out, torch.from_numpy(Rotation.from_matrix(R.numpy()).as_rotvec()))
        torch.testing.assert_close(out, aa, atol=1e-9, rtol=0)
    else:  # at pi, +axis and -axis are the same rotation
        sign = torch.sign((out * aa).sum(-1, keepdim=True))
        torch.testing.assert_close(out * sign, aa, atol=1e-7, rtol=0)


def test_near_pi_float32_round_trip():
    aa = (_unit_axes(50, seed=9) * (math.pi - 1e-6)).float()
    R = rot.axis_angle_to_matrix(aa)
    out = rot.matrix_to_axis_angle(R)
    assert (out.norm(dim=-1) <= math.pi + 1e-6).all()
    torch.testing.assert_close(rot.axis_angle_to_matrix(out), R, atol=2e-6, rtol=0)


def test_angles_beyond_pi_wrap_into_zero_to_pi():
    axes = _unit_axes(20, seed=10)
    aa = axes * 4.0
    out = rot.matrix_to_axis_angle(rot.axis_angle_to_matrix(aa))
    torch.testing.assert_close(out, -axes * (2 * math.pi - 4.0), atol=1e-12, rtol=0)
    out_q = rot.quaternion_to_axis_angle(rot.axis_angle_to_quaternion(aa))
    torch.testing.assert_close(out_q, -axes * (2 * math.pi - 4.0), atol=1e-12, rtol=0)


# ---------------------------------------------------------------- 6D and round trips


def test_rotation_6d_is_first_two_columns():
    aa = _random_axis_angle(20, seed=11)
    R = _scipy_matrix(aa)
    d6 = rot.matrix_to_rotation_6d(R)
    torch.testing.assert_close(d6[:, :3], R[:, :, 0], atol=0, rtol=0)
    torch.testing.assert_close(d6[:, 3:], R[:, :, 1], atol=0, rtol=0)
    torch.testing.assert_close(rot.rotation_6d_to_matrix(d6), R, atol=1e-12, rtol=0)


def test_rotation_6d_gram_schmidt_projects_to_rotation():
    gen = torch.Generator().manual_seed(12)
    d6 = torch.randn(2, 3, 5, 6, generator=gen, dtype=F64)
    R = rot.rotation_6d_to_matrix(d6)
    eye = torch.eye(3, dtype=F64).expand_as(R)
    torch.testing.assert_close(R.transpose(-1, -2) @ R, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(2, 3, 5, dtype=F64), atol=1e-12, rtol=0)
    # First column is the normalised first input column; second lies in the span of the two inputs.
    torch.testing.assert_close(R[..., :, 0], torch.nn.functional.normalize(d6[..., :3], dim=-1))
    normal = torch.linalg.cross(d6[..., :3], d6[..., 3:], dim=-1)
    assert (R[..., :, 1] * normal).sum(-1).abs().max() < 1e-10


def test_nearest_rotation_of_the_mean_matrix_is_scipys_chordal_mean():
    rots = Rotation.random(200, random_state=3)
    chordal = rot.nearest_rotation(torch.from_numpy(rots.as_matrix()).mean(0))
    np.testing.assert_allclose(chordal.numpy(), rots.mean().as_matrix(), atol=1e-10)
    # batched, and a rotation is its own nearest rotation
    many = torch.from_numpy(Rotation.random(7, random_state=4).as_matrix())
    torch.testing.assert_close(rot.nearest_rotation(many), many)


def test_round_trips_among_all_representations():
    aa = _random_axis_angle(60, seed=13).reshape(2, 3, 10, 3)
    R = rot.axis_angle_to_matrix(aa)
    q = rot.axis_angle_to_quaternion(aa)
    d6 = rot.axis_angle_to_rotation_6d(aa)
    torch.testing.assert_close(rot.quaternion_to_matrix(q), R, atol=1e-12, rtol=0)
    torch.testing.assert_close(rot.matrix_to_quaternion(R), q * torch.sign(q[..., :1]), atol=1e-12, rtol=0)
    torch.testing.assert_close(rot.quaternion_to_axis_angle(q), aa, atol=1e-12, rtol=0)
    torch.testing.assert_close(rot.rotation_6d_to_matrix(d6), R, atol=1e-12, rtol=0)
    torch.testing.assert_close(rot.rotation_6d_to_axis_angle(d6), aa, atol=1e-12, rtol=0)
    torch.testing.assert_close(rot.matrix_to_axis_angle(R), aa, atol=1e-12, rtol=0)
    for order in ("xyz", "ZYX", "zxz"):
        torch.testing.assert_close(
            rot.euler_to_matrix(rot.matrix_to_euler(R, order), order), R, atol=1e-12, rtol=0
        )


def test_inputs_are_not_modified():
    aa = _random_axis_angle(10, seed=14)
    R = rot.axis_angle_to_matrix(aa)
    q = -rot.axis_angle_to_quaternion(aa)  # w < 0: the sign flip must not be written back
    saved = (aa.clone(), R.clone(), q.clone())
    rot.matrix_to_axis_angle(R)
    rot.matrix_to_euler(R, "xyz")
    rot.quaternion_to_axis_angle(q)
    rot.quaternion_to_matrix(q)
    for before, after in zip(saved, (aa, R, q)):
        assert torch.equal(before, after)


# ---------------------------------------------------------------- Euler


EULER_ORDERS = ["xyz", "XYZ", "zyx", "ZYX", "yxz", "XZY", "zxz", "XYX", "yzy"]


@pytest.mark.parametrize("order", EULER_ORDERS)
def test_euler_matches_scipy(order):
    gen = torch.Generator().manual_seed(15)
    angles = (torch.rand(40, 3, generator=gen, dtype=F64) * 2 - 1) * math.pi
    expected_R = torch.from_numpy(Rotation.from_euler(order, angles.numpy()).as_matrix())
    torch.testing.assert_close(rot.euler_to_matrix(angles, order), expected_R, atol=1e-12, rtol=0)
    expected_angles = torch.from_numpy(Rotation.from_matrix(expected_R.numpy()).as_euler(order))
    torch.testing.assert_close(rot.matrix_to_euler(expected_R, order), expected_angles, atol=1e-10, rtol=0)


@pytest.mark.parametrize("order", ["xyz", "ZYX", "zxz", "XZX"])
def test_euler_gimbal_lock_matches_scipy(order):
    middle = [0.0, math.pi / 2, -math.pi / 2] if order.lower()[0] != order.lower()[2] else [0.0, math.pi]
    angles = torch.tensor([[0.3, m, -1.1] for m in middle], dtype=F64)
    R = torch.from_numpy(Rotation.from_euler(order, angles.numpy()).as_matrix())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # scipy's gimbal-lock warning
        expected = torch.from_numpy(Rotation.from_matrix(R.numpy()).as_euler(order))
    out = rot.matrix_to_euler(R, order)
    # Compare modulo 2 pi: a middle angle of pi may come out as -pi on either side.
    wrapped_diff = torch.remainder(out - expected + math.pi, 2 * math.pi) - math.pi
    torch.testing.assert_close(wrapped_diff, torch.zeros_like(out), atol=1e-6, rtol=0)
    torch.testing.assert_close(rot.euler_to_matrix(out, order), R, atol=1e-12, rtol=0)


@pytest.mark.parametrize(("order", "angles"), [("zxz", [0.0, 0.0, 0.0]), ("xyz", [0.3, math.pi / 2, 0.0])])
def test_euler_gradients_are_finite_at_gimbal_lock(order, angles):
    R = rot.euler_to_matrix(torch.tensor(angles, dtype=F64), order).requires_grad_(True)
    (grad,) = torch.autograd.grad(rot.matrix_to_euler(R, order).sum(), R)
    assert torch.isfinite(grad).all()


def test_euler_float32_with_leading_dims():
    gen = torch.Generator().manual_seed(16)
    angles = ((torch.rand(2, 3, 5, 3, generator=gen) * 2 - 1) * 1.4).float()
    R = rot.euler_to_matrix(angles, "ZYX")
    assert R.shape == (2, 3, 5, 3, 3) and R.dtype == torch.float32
    expected = Rotation.from_euler("ZYX", angles.reshape(-1, 3).double().numpy()).as_matrix()
    np.testing.assert_allclose(R.reshape(-1, 3, 3).double().numpy(), expected, atol=1e-6)
    torch.testing.assert_close(rot.matrix_to_euler(R, "ZYX"), angles, atol=1e-5, rtol=0)


def test_sam3d_body_global_rot_convention():
    # SAM-3D-Body builds its global rotation with roma.euler_to_rotmat("xyz", global_rot): R = Rz Ry Rx.
    g = torch.tensor([[0.2, -0.7, 1.3]], dtype=F64)
    R = rot.euler_to_matrix(g, rot.SAM3D_BODY_GLOBAL_ROT_ORDER)
    torch.testing.assert_close(R, roma.euler_to_rotmat("xyz", g), atol=1e-12, rtol=0)
    rx, ry, rz = (
        rot.euler_to_matrix(torch.tensor([[a if i == k else 0.0 for k in range(3)]], dtype=F64), "xyz")
        for i, a in enumerate(g[0].tolist())
    )
    torch.testing.assert_close(R, rz @ ry @ rx, atol=1e-12, rtol=0)
    torch.testing.assert_close(R, rot.euler_to_matrix(g.flip(-1), "ZYX"), atol=1e-12, rtol=0)


# ---------------------------------------------------------------- bad input


def test_bad_shapes_and_orders_raise():
    with pytest.raises(ShapeError, match="axis_angle"):
        rot.axis_angle_to_matrix(torch.zeros(5, 4))
    with pytest.raises(ShapeError, match="rotation matrix"):
        rot.matrix_to_axis_angle(torch.zeros(5, 3, 4))
    with pytest.raises(ShapeError, match="rotation_6d"):
        rot.rotation_6d_to_matrix(torch.zeros(5, 9))
    with pytest.raises(ValueError, match="mixed"):
        rot.euler_to_matrix(torch.zeros(3), "xYz")
    with pytest.raises(ValueError, match="consecutive"):
        rot.matrix_to_euler(torch.eye(3), "xxz")
    with pytest.raises(ValueError, match="3 axes"):
        rot.euler_to_matrix(torch.zeros(3), "xy")

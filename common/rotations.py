"""Rotation conversions in PyTorch: axis-angle, matrix, quaternion (wxyz), 6D (first two columns), Euler.

Every function is batched over leading dims, differentiable, dtype-preserving (float32/float64), and keeps
finite gradients at the identity (Taylor branches). Skinning is smplx's (common.mano).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from common.shapes import ShapeError

__all__ = [
    "SAM3D_BODY_GLOBAL_ROT_ORDER",
    "axis_angle_to_matrix",
    "axis_angle_to_quaternion",
    "axis_angle_to_rotation_6d",
    "euler_to_matrix",
    "matrix_to_axis_angle",
    "matrix_to_euler",
    "matrix_to_quaternion",
    "matrix_to_rotation_6d",
    "nearest_rotation",
    "quaternion_to_axis_angle",
    "quaternion_to_matrix",
    "rotation_6d_to_axis_angle",
    "rotation_6d_to_matrix",
]

# SAM-3D-Body's `global_rot` [3] is called "Euler ZYX": R = Rz(g[2]) @ Ry(g[1]) @ Rx(g[0]). Its code calls
# roma.euler_to_rotmat("xyz", global_rot), i.e. scipy Rotation.from_euler("xyz", g) (extrinsic x, y, z),
# which equals scipy "ZYX" (intrinsic) applied to the reversed angles g[::-1].
SAM3D_BODY_GLOBAL_ROT_ORDER = "xyz"

# Below this squared argument the Taylor branches are used; their truncation error (~x^8 / 9) is below
# float64 resolution, and the closed forms above it have no cancellation worth mentioning.
_TAYLOR_THRESHOLD_SQ = 1e-4
# Same tolerance as scipy for detecting gimbal lock in matrix_to_euler.
_GIMBAL_EPS = 1e-7


def _check_last_dims(x: torch.Tensor, dims: tuple[int, ...], name: str) -> None:
    if x.dim() < len(dims) or tuple(x.shape[x.dim() - len(dims) :]) != dims:
        want = ("...", *dims)
        raise ShapeError(f"{name}: expected shape {want}, got {tuple(x.shape)}")


def _taylor_or_closed(
    x_sq: torch.Tensor,
    taylor: Callable[[torch.Tensor], torch.Tensor],
    closed: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Evaluate ``f(x)`` given ``x_sq = x**2``: ``taylor(x_sq)`` near 0, ``closed(x)`` elsewhere.

    The closed form only ever sees a safe ``x`` (1 where the Taylor branch is taken) so that neither
    branch produces inf/NaN gradients that ``torch.where`` would multiply by zero into NaN.
    """
    small = x_sq < _TAYLOR_THRESHOLD_SQ
    x_safe = torch.sqrt(torch.where(small, torch.ones_like(x_sq), x_sq))
    return torch.where(small, taylor(x_sq), closed(x_safe))


def _sinc_from_sq(x_sq: torch.Tensor) -> torch.Tensor:
    """sin(x) / x as a function of x^2."""
    return _taylor_or_closed(
        x_sq,
        lambda t: 1 - t / 6 * (1 - t / 20 * (1 - t / 42)),
        lambda x: torch.sin(x) / x,
    )


def _cos_half_from_sq(x_sq: torch.Tensor) -> torch.Tensor:
    """cos(x / 2) as a function of x^2."""
    return _taylor_or_closed(
        x_sq,
        lambda t: 1 - t / 8 * (1 - t / 48 * (1 - t / 120)),
        lambda x: torch.cos(x / 2),
    )


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt(max(x, 0)) with a zero (not inf) gradient where x <= 0."""
    positive = x > 0
    return torch.where(
        positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x)
    )


def _safe_atan2(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """atan2 with value and gradient 0 (not NaN) at y = x = 0."""
    both_zero = (x == 0) & (y == 0)
    return torch.where(
        both_zero, torch.zeros_like(x), torch.atan2(y, torch.where(both_zero, torch.ones_like(x), x))
    )


def _skew(v: torch.Tensor) -> torch.Tensor:
    """v [..., 3] -> [v]x [..., 3, 3] (cross-product matrix)."""
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], dim=-1).unflatten(-1, (3, 3))


def axis_angle_to_matrix(aa: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula. aa [..., 3] (axis * angle, radians) -> R [..., 3, 3].

    R = I + sinc(t) K + (1 - cos t) / t^2 K^2 with K = [aa]x, t = |aa|; the second coefficient is
    written as sinc(t/2)^2 / 2 to avoid cancellation.
    """
    _check_last_dims(aa, (3,), "axis_angle")
    angle_sq = (aa * aa).sum(-1)[..., None, None]
    k = _skew(aa)
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device)
    return eye + _sinc_from_sq(angle_sq) * k + 0.5 * _sinc_from_sq(angle_sq / 4) ** 2 * (k @ k)


def axis_angle_to_quaternion(aa: torch.Tensor) -> torch.Tensor:
    """aa [..., 3] -> unit quaternion q [..., 4] (w, x, y, z).

    Smooth in aa, so w < 0 when the angle exceeds pi (q and -q are the same rotation).
    """
    _check_last_dims(aa, (3,), "axis_angle")
    angle_sq = (aa * aa).sum(-1, keepdim=True)
    w = _cos_half_from_sq(angle_sq)
    xyz = 0.5 * _sinc_from_sq(angle_sq / 4) * aa  # sin(t/2) / t * aa
    return torch.cat([w, xyz], dim=-1)


def quaternion_to_axis_angle(q: torch.Tensor) -> torch.Tensor:
    """q [..., 4] (w, x, y, z), any non-zero norm -> aa [..., 3] with angle in [0, pi]."""
    _check_last_dims(q, (4,), "quaternion")
    q_pos = torch.where(q[..., :1] < 0, -q, q)  # w >= 0 puts the angle in [0, pi]
    w, xyz = q_pos[..., 0], q_pos[..., 1:]
    xyz_sq = (xyz * xyz).sum(-1)
    # scale = angle / |xyz| = 2 atan2(|xyz|, w) / |xyz|; near the identity use 2/w * atan(s)/s, s = |xyz|/w.
    small = xyz_sq < _TAYLOR_THRESHOLD_SQ * w * w
    w_safe = torch.where(small, w, torch.ones_like(w))
    ratio_sq = torch.where(small, xyz_sq, torch.zeros_like(xyz_sq)) / (w_safe * w_safe)
    scale_small = 2 / w_safe * (1 - ratio_sq / 3 + ratio_sq**2 / 5 - ratio_sq**3 / 7)
    norm_safe = torch.sqrt(torch.where(small, torch.ones_like(xyz_sq), xyz_sq))
    scale_large = 2 * torch.atan2(norm_safe, w) / norm_safe
    return torch.where(small, scale_small, scale_large)[..., None] * xyz


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """q [..., 4] (w, x, y, z), normalised here (must be non-zero) -> R [..., 3, 3]."""
    _check_last_dims(q, (4,), "quaternion")
    w, x, y, z = q.unbind(-1)
    two_s = 2.0 / (q * q).sum(-1)  # dividing by |q|^2 is the normalisation
    entries = (
        1 - two_s * (y * y + z * z),
        two_s * (x * y - z * w),
        two_s * (x * z + y * w),
        two_s * (x * y + z * w),
        1 - two_s * (x * x + z * z),
        two_s * (y * z - x * w),
        two_s * (x * z - y * w),
        two_s * (y * z + x * w),
        1 - two_s * (x * x + y * y),
    )
    return torch.stack(entries, dim=-1).unflatten(-1, (3, 3))


def matrix_to_quaternion(R: torch.Tensor) -> torch.Tensor:
    """R [..., 3, 3] -> unit quaternion q [..., 4] (w, x, y, z) with w >= 0.

    Of the four algebraically equivalent formulas (one per dividing component) the one with the largest
    divisor is used, so the result is accurate everywhere, including angles near pi.
    """
    _check_last_dims(R, (3, 3), "rotation matrix")
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = R.flatten(-2).unbind(-1)
    # 4 * (w^2, x^2, y^2, z^2) for an exact rotation.
    four_sq = torch.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1
    )
    # Row i is 4 * q_i * (w, x, y, z).
    rows = torch.stack(
        [
            torch.stack([four_sq[..., 0], m21 - m12, m02 - m20, m10 - m01], dim=-1),
            torch.stack([m21 - m12, four_sq[..., 1], m10 + m01, m02 + m20], dim=-1),
            torch.stack([m02 - m20, m10 + m01, four_sq[..., 2], m12 + m21], dim=-1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, four_sq[..., 3]], dim=-1),
        ],
        dim=-2,
    )
    # The best divisor is >= 1 (the squares sum to 4); the clamp only keeps unused rows finite.
    candidates = rows / (2 * _safe_sqrt(four_sq).clamp_min(0.1))[..., None]
    best = four_sq.argmax(dim=-1)
    index = best[..., None, None].expand(*best.shape, 1, 4)
    q = torch.gather(candidates, -2, index).squeeze(-2)
    q_pos = torch.where(q[..., :1] < 0, -q, q)
    return F.normalize(q_pos, dim=-1)


def matrix_to_axis_angle(R: torch.Tensor) -> torch.Tensor:
    """R [..., 3, 3] -> aa [..., 3] with angle in [0, pi] (via the quaternion, so robust near pi)."""
    return quaternion_to_axis_angle(matrix_to_quaternion(R))


def rotation_6d_to_matrix(d6: torch.Tensor) -> torch.Tensor:
    """d6 [..., 6] -> R [..., 3, 3] by Gram-Schmidt (Zhou et al. 2019).

    Layout: d6[..., :3] is the first column of R and d6[..., 3:] the second (columns, not rows).
    """
    _check_last_dims(d6, (6,), "rotation_6d")
    b1 = F.normalize(d6[..., :3], dim=-1)
    a2 = d6[..., 3:]
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


def matrix_to_rotation_6d(R: torch.Tensor) -> torch.Tensor:
    """R [..., 3, 3] -> d6 [..., 6] = (first column, second column)."""
    _check_last_dims(R, (3, 3), "rotation matrix")
    return torch.cat([R[..., :, 0], R[..., :, 1]], dim=-1)


def nearest_rotation(M: torch.Tensor) -> torch.Tensor:
    """M [..., 3, 3] (any matrix) -> the rotation closest to it in Frobenius norm, by SVD with det fixed to +1.

    Applied to the mean of rotation matrices this is their chordal L2 mean (scipy's ``Rotation.mean``).
    """
    _check_last_dims(M, (3, 3), "matrix")
    U, _, Vh = torch.linalg.svd(M)
    det = torch.linalg.det(U @ Vh)
    ones = torch.ones_like(det)
    return U @ torch.diag_embed(torch.stack([ones, ones, det], dim=-1)) @ Vh


def rotation_6d_to_axis_angle(d6: torch.Tensor) -> torch.Tensor:
    """d6 [..., 6] -> aa [..., 3] (angle in [0, pi])."""
    return matrix_to_axis_angle(rotation_6d_to_matrix(d6))


def axis_angle_to_rotation_6d(aa: torch.Tensor) -> torch.Tensor:
    """aa [..., 3] -> d6 [..., 6]."""
    return matrix_to_rotation_6d(axis_angle_to_matrix(aa))


def _parse_euler_order(order: str) -> tuple[list[int], bool]:
    """scipy-style order -> (axis indices in the given order, intrinsic?)."""
    if not isinstance(order, str) or len(order) != 3:
        raise ValueError(f"Euler order must be a string of 3 axes, got {order!r}")
    intrinsic = all(c in "XYZ" for c in order)
    if not intrinsic and not all(c in "xyz" for c in order):
        raise ValueError(
            f"Euler order {order!r}: use only 'xyz' letters (extrinsic) or only 'XYZ' (intrinsic), not mixed"
        )
    if order[0] == order[1] or order[1] == order[2]:
        raise ValueError(f"Euler order {order!r}: consecutive axes must differ")
    return ["xyz".index(c) for c in order.lower()], intrinsic


def _elementary_rotation(axis: int, angle: torch.Tensor) -> torch.Tensor:
    """Rotation by angle [...] about basis axis 0/1/2 -> [..., 3, 3]."""
    c, s = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(angle), torch.zeros_like(angle)
    if axis == 0:
        entries = (one, zero, zero, zero, c, -s, zero, s, c)
    elif axis == 1:
        entries = (c, zero, s, zero, one, zero, -s, zero, c)
    else:
        entries = (c, -s, zero, s, c, zero, zero, zero, one)
    return torch.stack(entries, dim=-1).unflatten(-1, (3, 3))


def euler_to_matrix(angles: torch.Tensor, order: str) -> torch.Tensor:
    """angles [..., 3] (radians) -> R [..., 3, 3], same as scipy ``Rotation.from_euler(order, angles)``.

    Uppercase order = intrinsic (R = R_a0 @ R_a1 @ R_a2), lowercase = extrinsic (R = R_a2 @ R_a1 @ R_a0).
    SAM-3D-Body's "Euler ZYX" global_rot is ``order="xyz"`` (see SAM3D_BODY_GLOBAL_ROT_ORDER).
    """
    _check_last_dims(angles, (3,), "euler angles")
    axes, intrinsic = _parse_euler_order(order)
    r0, r1, r2 = (_elementary_rotation(a, t) for a, t in zip(axes, angles.unbind(-1)))
    return r0 @ r1 @ r2 if intrinsic else r2 @ r1 @ r0


def matrix_to_euler(R: torch.Tensor, order: str) -> torch.Tensor:
    """R [..., 3, 3] -> angles [..., 3] in [-pi, pi), same as scipy ``Rotation.as_euler(order)``.

    Quaternion method of Bernardes & Viollet (2022), as in scipy, valid for all 12 axis sequences. The
    middle angle is in [-pi/2, pi/2] (Tait-Bryan, e.g. "xyz") or [0, pi] (proper Euler, e.g. "zxz"). At
    gimbal lock the angle that scipy zeroes is zero here too (silently); gradients there stay finite but are
    only one choice among many (the decomposition is not differentiable there).
    """
    _check_last_dims(R, (3, 3), "rotation matrix")
    axes, intrinsic = _parse_euler_order(order)
    i, j, k = axes[::-1] if intrinsic else axes
    symmetric = i == k
    if symmetric:
        k = 3 - i - j
    sign = (i - j) * (j - k) * (k - i) // 2  # +1 for an even permutation of (x, y, z), -1 for odd

    q = matrix_to_quaternion(R)
    w, qi, qj, qk = q[..., 0], q[..., 1 + i], q[..., 1 + j], q[..., 1 + k]
    if symmetric:
        a, b, c, d = w, qi, qj, qk * sign
    else:
        a, b, c, d = w - qj, qi + qk * sign, qj + w, qk * sign - qi

    # Safe variants: at gimbal lock one pair is (0, 0); its branch is unused but must not yield NaN grads.
    middle = 2 * torch.atan2(_safe_sqrt(c * c + d * d), _safe_sqrt(a * a + b * b))
    half_sum = _safe_atan2(b, a)
    half_diff = _safe_atan2(d, c)
    near_zero = middle.abs() <= _GIMBAL_EPS
    near_pi = (middle - math.pi).abs() <= _GIMBAL_EPS
    regular = ~(near_zero | near_pi)

    degenerate = torch.where(near_zero, 2 * half_sum, 2 * half_diff * (1 if intrinsic else -1))
    first = torch.where(regular, half_sum - half_diff, degenerate if not intrinsic else torch.zeros_like(a))
    third = torch.where(regular, half_sum + half_diff, degenerate if intrinsic else torch.zeros_like(a))
    if not symmetric:
        third = third * sign
        middle = middle - math.pi / 2
    # `first`/`third` refer to the extrinsic sequence; an intrinsic sequence is the reversed extrinsic one.
    ordered = (third, middle, first) if intrinsic else (first, middle, third)
    angles = torch.stack(ordered, dim=-1)
    return torch.remainder(angles + math.pi, 2 * math.pi) - math.pi

"""A deterministic, licence-free stand-in for MANO: same topology counts, joint tree and fingertip ids.

Built from generalised cylinders (palm tube, five three-segment digits) in metres, right hand, wrist near the
origin, fingers along +x, palm facing -y, thumb on the -z side. Not a scan of a hand: it exists so tests,
synthetic data and demos run without the licence-gated official files. Use :func:`procedural_mano_arrays`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from common.geometry import vertex_normals
from common.mano_topology import (
    FINGERTIP_NAMES,
    FINGERTIP_VERTEX_IDS,
    MANO_PARENTS,
    MIRROR_AXIS_ANGLE_SIGNS,
    NUM_FACES,
    NUM_VERTS,
)

log = logging.getLogger(__name__)

NUM_JOINTS = 16

# Resolution. With these counts the mesh has exactly 778 vertices; Euler (one 16-edge hole) then forces 1538
# faces: V = 2*16 (wrist) + 8*40 - 2 (palm, thumb hole) + 4*(8*10 + 7 + 1) + (7*10 + 5 + 1).
_WRIST_RING = 16
_PALM_RING = 40
_PALM_RINGS = 8
_DIGIT_RING = 10
_HOLE_RING = 2  # palm ring whose two side vertices are removed to open the thumb hole
_HOLE_SLOTS = (_PALM_RING // 2 - 1, _PALM_RING // 2)  # the -z side edge of the palm ring
_WEB_FRACTION = 0.3  # finger webs (the palm's last ring) sit this far along the proximal phalanx
_PRETIP_BACK = 0.0017  # the small ring before a fingertip apex sits this far behind it (m)
_SKIN_SMOOTH_STEPS = 4
_EX, _EY, _EZ = np.eye(3)


@dataclass(frozen=True)
class _Digit:
    name: str
    joints: tuple[int, int, int]  # MANO native ids, proximal to distal
    base: tuple[float, float, float]  # MCP (fingers) or CMC (thumb) centre
    direction: tuple[float, float, float]
    lengths: tuple[float, float, float]  # joint-to-joint, the last one to the fingertip
    radius: float  # at the first ring
    tip_radius: float
    ring_params: tuple[float, ...]  # ring positions as fractions of the digit length from `base`
    pretip_ring: int  # vertex count of the last, small ring before the apex
    palm_group: int = -1  # which quarter of the palm's distal ring the finger grows from (0 = +z side)


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _finger_dir(degrees: float) -> tuple[float, float, float]:
    a = np.deg2rad(degrees)
    return (float(np.cos(a)), 0.0, float(np.sin(a)))


def _finger_rings(lengths) -> tuple[float, ...]:
    """Eight rings: 2 on the proximal phalanx, PIP, 1, DIP, 1 on the distal phalanx, 2 on the rounded tip."""
    l1, l2, l3 = lengths
    total = l1 + l2 + l3
    t = (0.45 * l1, 0.75 * l1, l1, l1 + 0.5 * l2, l1 + l2, l1 + l2 + 0.4 * l3, total - 0.0075, total - 0.0042)
    return tuple(x / total for x in t)


def _thumb_rings(lengths) -> tuple[float, ...]:
    """Seven rings: 2 on the metacarpal outside the palm, MCP, 1, IP, 1 on the distal phalanx, 1 on the tip."""
    l1, l2, l3 = lengths
    total = l1 + l2 + l3
    t = (0.62 * l1, 0.84 * l1, l1, l1 + 0.5 * l2, l1 + l2, l1 + l2 + 0.45 * l3, total - 0.0045)
    return tuple(x / total for x in t)


_FINGER_LENGTHS = {
    "index": (0.040, 0.024, 0.021),
    "middle": (0.045, 0.028, 0.022),
    "ring": (0.042, 0.027, 0.021),
    "pinky": (0.033, 0.020, 0.019),
}
_THUMB_LENGTHS = (0.044, 0.031, 0.027)

# Build order = vertex order before the fingertips are moved to their smplx ids.
_DIGITS = (
    _Digit("index", (1, 2, 3), (0.086, 0.0, -0.027), _finger_dir(-6), _FINGER_LENGTHS["index"],
           0.0090, 0.0075, _finger_rings(_FINGER_LENGTHS["index"]), 7, palm_group=3),
    _Digit("middle", (4, 5, 6), (0.090, 0.0, -0.009), _finger_dir(-1), _FINGER_LENGTHS["middle"],
           0.0092, 0.0077, _finger_rings(_FINGER_LENGTHS["middle"]), 7, palm_group=2),
    _Digit("ring", (10, 11, 12), (0.086, 0.0, 0.009), _finger_dir(4), _FINGER_LENGTHS["ring"],
           0.0087, 0.0072, _finger_rings(_FINGER_LENGTHS["ring"]), 7, palm_group=1),
    _Digit("pinky", (7, 8, 9), (0.078, 0.0, 0.026), _finger_dir(10), _FINGER_LENGTHS["pinky"],
           0.0078, 0.0064, _finger_rings(_FINGER_LENGTHS["pinky"]), 7, palm_group=0),
    _Digit("thumb", (13, 14, 15), (0.021, -0.006, -0.022), tuple(_unit((0.68, -0.30, -0.67))), _THUMB_LENGTHS,
           0.0118, 0.0088, _thumb_rings(_THUMB_LENGTHS), 5),
)


class _MeshBuilder:
    def __init__(self) -> None:
        self.points: list[np.ndarray] = []
        self.faces: list[tuple[int, int, int]] = []
        self.count = 0

    def add(self, pts: np.ndarray) -> np.ndarray:
        pts = np.atleast_2d(pts)
        ids = np.arange(self.count, self.count + len(pts))
        self.points.append(pts)
        self.count += len(pts)
        return ids

    def pos(self) -> np.ndarray:
        return np.concatenate(self.points, axis=0)

    def quad(self, a: int, b: int, c: int, d: int) -> None:
        """Quad a-b-c-d (counter-clockwise seen from outside) as two triangles."""
        self.faces += [(a, b, c), (a, c, d)]

    def loft(self, ring_a: np.ndarray, ring_b: np.ndarray) -> None:
        """Band between closed loops (same rotational sense, right-handed about proximal -> distal).

        Both loops are parametrised by arc length; ring_b is rolled to line up best with ring_a, then the
        vertices are merged in parameter order: len(ring_a) + len(ring_b) triangles for any ring sizes.
        """
        pos = self.pos()
        n, m = len(ring_a), len(ring_b)
        frac_a, frac_b = _arc_fractions(pos[ring_a]), _arc_fractions(pos[ring_b])
        costs = []
        for r in range(m):
            rolled = np.roll(ring_b, -r)
            frac = np.roll(frac_b, -r) - frac_b[r]
            nearest_a = ring_a[np.round((frac % 1.0) * n).astype(int) % n]
            costs.append(np.linalg.norm(pos[rolled] - pos[nearest_a], axis=1).sum())
        r = int(np.argmin(costs))
        ring_b = np.roll(ring_b, -r)
        frac_b = (np.roll(frac_b, -r) - frac_b[r]) % 1.0
        i = j = 0
        while i < n or j < m:
            ai, ai1 = ring_a[i % n], ring_a[(i + 1) % n]
            bj, bj1 = ring_b[j % m], ring_b[(j + 1) % m]
            next_a = frac_a[i + 1] if i + 1 < n else 1.0
            next_b = frac_b[j + 1] if j + 1 < m else 1.0
            if j == m or (i < n and next_a <= next_b):
                self.faces.append((ai, ai1, bj))
                i += 1
            else:
                self.faces.append((ai, bj1, bj))
                j += 1

    def cap(self, ring: np.ndarray, apex: int) -> None:
        self.faces += [(ring[k], ring[(k + 1) % len(ring)], apex) for k in range(len(ring))]


def _arc_fractions(loop: np.ndarray) -> np.ndarray:
    """Arc-length position of each vertex of a closed loop, 0 at the first vertex, in [0, 1)."""
    seg = np.linalg.norm(np.roll(loop, -1, axis=0) - loop, axis=1)
    return np.concatenate([[0.0], np.cumsum(seg)[:-1]]) / seg.sum()


def _ellipse_ring(center, axis, ru: float, rv: float, n: int) -> np.ndarray:
    """n points on an ellipse around `axis`; vertex k at angle 2pi(k+.5)/n from u (~ +z) towards v (~ -y)."""
    axis = _unit(axis)
    u = _unit(_EZ - (_EZ @ axis) * axis)
    v = np.cross(axis, u)
    phi = 2 * np.pi * (np.arange(n) + 0.5) / n
    return np.asarray(center) + ru * np.cos(phi)[:, None] * u + rv * np.sin(phi)[:, None] * v


def _palm_profile(i: int) -> tuple[float, float, float]:
    """Half-width (z), half-thickness (y) and superellipse power of palm ring i (wrist -> knuckles)."""
    half_width = (0.030, 0.034, 0.0375, 0.0395, 0.040, 0.040, 0.039, 0.036)[i]
    half_thick = (0.0165, 0.0160, 0.0155, 0.0150, 0.0145, 0.0135, 0.0120, 0.0095)[i]
    power = (2.5, 3.0, 3.5, 4.0, 4.0, 4.0, 4.0, 4.0)[i]
    return half_width, half_thick, power


def _palm_ring(i: int, web_x: np.ndarray) -> np.ndarray:
    """Palm ring i: 20 palm-side vertices (z decreasing) then 20 back vertices (z increasing).

    Same rotational sense as :func:`_ellipse_ring` about +x. `web_x[k]` is the x of slot k on the last ring.
    """
    half_width, half_thick, power = _palm_profile(i)
    half = _PALM_RING // 2
    zs = half_width * (1 - (2 * np.arange(half) + 1) / half)
    ys = half_thick * (1 - np.abs(zs / half_width) ** power) ** (1 / power)
    z = np.concatenate([zs, -zs])
    y = np.concatenate([-ys, ys])
    x0 = 0.006
    s = i / (_PALM_RINGS - 1)
    x = x0 + s * (web_x - x0)
    pts = np.stack([x, y, z], axis=1)
    # Thenar (thumb side) and hypothenar pads: palm-side bulges away from the palm's centre line.
    palm_side = np.clip(-y / half_thick, 0.0, 1.0)
    outward = np.stack([np.zeros_like(x), y, z], axis=1) / np.hypot(y, z)[:, None]
    pad = 0.0050 * np.exp(-0.5 * (((x - 0.030) / 0.018) ** 2 + ((z + 0.030) / 0.014) ** 2))
    pad += 0.0025 * np.exp(-0.5 * (((x - 0.045) / 0.020) ** 2 + ((z - 0.030) / 0.012) ** 2))
    return pts + (pad * palm_side)[:, None] * outward


def _digit_radius(d: _Digit, t: float) -> float:
    """Radius at distance t from the digit base: taper, knuckle bulges, hemispherical tip."""
    l1, l2, _ = d.lengths
    total = sum(d.lengths)
    cap = d.tip_radius
    r = d.radius + (d.tip_radius - d.radius) * min(t / (total - cap), 1.0)
    for joint_t in (l1, l1 + l2):
        r *= 1 + 0.05 * np.exp(-0.5 * ((t - joint_t) / 0.004) ** 2)
    if t > total - cap:
        s = (total - t) / cap
        r *= np.sqrt(max(s * (2 - s), 0.0))
    return float(r)


def _build_right() -> dict[str, np.ndarray]:
    mb = _MeshBuilder()

    # Wrist stub: the open 16-edge loop, then one more ring.
    wrist_rings = [mb.add(_ellipse_ring((x, 0.0, 0.0), _EX, 0.029, 0.0175, _WRIST_RING)) for x in (-0.016, -0.006)]
    mb.loft(wrist_rings[0], wrist_rings[1])

    # Palm: 8 rings of 40. Each finger grows from 5 palm-side + 5 back slots of the last ring.
    web_x = np.zeros(_PALM_RING)
    for d in _DIGITS:
        if d.palm_group >= 0:
            web_x[_group_slots(d.palm_group)] = d.base[0] + _WEB_FRACTION * d.lengths[0]
    palm_ids = np.full((_PALM_RINGS, _PALM_RING), -1)
    for i in range(_PALM_RINGS):
        ring = _palm_ring(i, web_x)
        keep = np.ones(_PALM_RING, dtype=bool)
        if i == _HOLE_RING:
            keep[list(_HOLE_SLOTS)] = False
        palm_ids[i, keep] = mb.add(ring[keep])
    mb.loft(wrist_rings[1], palm_ids[0])
    hole_quads = {(r, k) for r in (_HOLE_RING - 1, _HOLE_RING) for k in range(_HOLE_SLOTS[0] - 1, _HOLE_SLOTS[1] + 1)}
    for i in range(_PALM_RINGS - 1):
        for k in range(_PALM_RING):
            if (i, k) in hole_quads:
                continue
            k1 = (k + 1) % _PALM_RING
            mb.quad(palm_ids[i, k], palm_ids[i, k1], palm_ids[i + 1, k1], palm_ids[i + 1, k])
    last = palm_ids[-1]
    # Webs between neighbouring fingers close the slot between their base rings.
    for g in range(3):
        b1, b2 = last[5 * g + 4], last[5 * g + 5]
        t1, t2 = last[_PALM_RING - 5 - 5 * g], last[_PALM_RING - 6 - 5 * g]
        mb.quad(b1, b2, t2, t1)

    # Thumb hole: the palm's boundary loop around the removed vertices, reversed so that it turns
    # right-handed about the outward (thumb) direction like every other ring.
    hole_vertices = {int(palm_ids[r, k]) for r, k in _hole_corners(palm_ids)}
    hole_loop = _boundary_loop_through(np.asarray(mb.faces), hole_vertices)[::-1]

    digit_rings: dict[str, list[tuple[float, np.ndarray]]] = {}
    tips: dict[str, int] = {}
    for d in _DIGITS:
        base = np.asarray(d.base)
        axis = np.asarray(d.direction)
        total = sum(d.lengths)
        if d.palm_group >= 0:
            first = last[_group_slots(d.palm_group)]
            first_t = _WEB_FRACTION * d.lengths[0]
        else:
            first = np.asarray(hole_loop)
            first_t = 0.0
        rings = [(first_t, first)]
        prev = first
        for frac in d.ring_params:
            t = frac * total
            r = _digit_radius(d, t)
            ring = mb.add(_ellipse_ring(base + t * axis, axis, r, 0.88 * r, _DIGIT_RING))
            mb.loft(prev, ring)
            rings.append((t, ring))
            prev = ring
        t = total - _PRETIP_BACK
        r = _digit_radius(d, t)
        ring = mb.add(_ellipse_ring(base + t * axis, axis, r, 0.88 * r, d.pretip_ring))
        mb.loft(prev, ring)
        rings.append((t, ring))
        apex = int(mb.add(base + total * axis)[0])
        mb.cap(ring, apex)
        rings.append((total, np.array([apex])))
        digit_rings[d.name] = rings
        tips[d.name] = apex

    v = mb.pos()
    f = np.asarray(mb.faces, dtype=np.int64)
    if len(v) != NUM_VERTS or len(f) != NUM_FACES:
        raise AssertionError(f"procedural MANO: built {len(v)} vertices / {len(f)} faces")

    joints = _design_joints()
    j_regressor = _joint_regressor(v, joints, wrist_rings[1], palm_ids, hole_loop, digit_rings)
    weights = _skinning_weights(f, palm_ids, digit_rings)
    normals = vertex_normals(v, f)
    shapedirs = _shape_blendshapes(v, normals, weights, joints)
    posedirs = _pose_blendshapes(v, normals, weights, joints)
    hands_components, hands_mean = _hand_pose_prior(joints)

    # Move the fingertip apexes to their smplx ids; every other vertex keeps its build order.
    old_tips = np.array([tips[name] for name in FINGERTIP_NAMES])
    new_of_old = np.full(NUM_VERTS, -1)
    new_of_old[old_tips] = FINGERTIP_VERTEX_IDS
    free_new = np.setdiff1d(np.arange(NUM_VERTS), FINGERTIP_VERTEX_IDS)
    new_of_old[np.setdiff1d(np.arange(NUM_VERTS), old_tips)] = free_new
    old_of_new = np.argsort(new_of_old)

    kintree = np.stack([np.asarray(MANO_PARENTS), np.arange(NUM_JOINTS)]).astype(np.int64)
    return {
        "v_template": v[old_of_new],
        "shapedirs": shapedirs[old_of_new],
        "posedirs": posedirs[old_of_new],
        "J_regressor": j_regressor[:, old_of_new],
        "kintree_table": kintree,
        "weights": weights[old_of_new],
        "f": new_of_old[f],
        "hands_components": hands_components,
        "hands_mean": hands_mean,
    }


def _group_slots(group: int) -> np.ndarray:
    """Slots of finger group g (0 = +z side) on a palm ring, in ring order: 5 palm-side then 5 back."""
    palm_side = np.arange(5 * group, 5 * group + 5)
    return np.concatenate([palm_side, _PALM_RING - 1 - palm_side[::-1]])


def _hole_corners(palm_ids: np.ndarray):
    """(ring, slot) of the 10 vertices around the two removed palm vertices."""
    r0, r1 = _HOLE_RING - 1, _HOLE_RING + 1
    k0, k1 = _HOLE_SLOTS[0] - 1, _HOLE_SLOTS[1] + 1
    return [(r, k) for r in range(r0, r1 + 1) for k in range(k0, k1 + 1) if palm_ids[r, k] >= 0]


def _boundary_loop_through(faces: np.ndarray, vertices: set[int]) -> list[int]:
    """The boundary loop (in the faces' edge direction) made of `vertices`."""
    directed = {(int(a), int(b)) for tri in faces for a, b in ((tri[0], tri[1]), (tri[1], tri[2]), (tri[2], tri[0]))}
    nxt = {a: b for a, b in directed if (b, a) not in directed and a in vertices and b in vertices}
    if len(nxt) != len(vertices):
        raise AssertionError("thumb hole is not a single boundary loop")
    start = min(nxt)
    loop = [start]
    while nxt[loop[-1]] != start:
        loop.append(nxt[loop[-1]])
    return loop


def _design_joints() -> np.ndarray:
    joints = np.zeros((NUM_JOINTS, 3))
    for d in _DIGITS:
        base, axis = np.asarray(d.base), np.asarray(d.direction)
        l1, l2, _ = d.lengths
        joints[list(d.joints)] = [base, base + l1 * axis, base + (l1 + l2) * axis]
    return joints


def _regress_onto(points: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Non-negative weights summing to 1 with weights @ points == target, as close to uniform as possible.

    Minimum-norm correction of the uniform weights; vertices driven negative are dropped and it is re-solved.
    """
    n = len(points)
    constraints = np.concatenate([points.T, np.ones((1, n))])  # [4, n]
    goal = np.concatenate([target, [1.0]])
    free = np.ones(n, dtype=bool)
    while True:
        a = constraints[:, free]
        uniform = np.full(free.sum(), 1.0 / n)
        w_free = uniform + a.T @ np.linalg.pinv(a @ a.T) @ (goal - a @ uniform)
        if w_free.min() >= 0:
            break
        free[np.flatnonzero(free)[w_free < 0]] = False
    w = np.zeros(n)
    w[free] = w_free
    if np.abs(constraints @ w - goal).max() > 1e-9:
        raise AssertionError("procedural MANO: joint centre outside its vertex ring")
    return w


def _joint_regressor(v, joints, wrist_ring, palm_ids, hole_loop, digit_rings) -> np.ndarray:
    reg = np.zeros((NUM_JOINTS, NUM_VERTS))

    def set_row(j: int, ids) -> None:
        ids = np.unique(np.asarray(ids))
        reg[j, ids] = _regress_onto(v[ids], joints[j])

    set_row(0, np.concatenate([wrist_ring, palm_ids[0]]))
    for d in _DIGITS:
        rings = dict((round(t, 9), ids) for t, ids in digit_rings[d.name])
        l1, l2, _ = d.lengths
        if d.palm_group >= 0:
            slots = _group_slots(d.palm_group)
            set_row(d.joints[0], np.concatenate([palm_ids[-2, slots], palm_ids[-1, slots]]))
        else:
            near = palm_ids[_HOLE_RING - 1: _HOLE_RING + 2].ravel()
            near = near[near >= 0]
            near = near[np.linalg.norm(v[near] - joints[d.joints[0]], axis=1) < 0.022]
            set_row(d.joints[0], np.concatenate([hole_loop, near]))
        set_row(d.joints[1], rings[round(l1, 9)])
        set_row(d.joints[2], rings[round(l1 + l2, 9)])
    return reg


def _adjacency(f: np.ndarray, n: int) -> sp.csr_matrix:
    i = np.concatenate([f[:, 0], f[:, 1], f[:, 2], f[:, 1], f[:, 2], f[:, 0]])
    j = np.concatenate([f[:, 1], f[:, 2], f[:, 0], f[:, 0], f[:, 1], f[:, 2]])
    adj = sp.coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)).tocsr()
    adj.data[:] = 1.0
    return sp.diags(1.0 / np.asarray(adj.sum(axis=1)).ravel()) @ adj


def _skinning_weights(f, palm_ids, digit_rings) -> np.ndarray:
    """Hard part labels (half/half on joint rings), then a few steps of neighbour averaging on the mesh."""
    w = np.zeros((NUM_VERTS, NUM_JOINTS))
    w[palm_ids[palm_ids >= 0], 0] = 1.0
    for d in _DIGITS:
        l1, l2, _ = d.lengths
        j1, j2, j3 = d.joints
        for t, ids in digit_rings[d.name]:
            row = np.zeros(NUM_JOINTS)
            if abs(t - l1) < 1e-9:
                row[[j1, j2]] = 0.5
            elif abs(t - l1 - l2) < 1e-9:
                row[[j2, j3]] = 0.5
            else:
                row[j1 if t < l1 else j2 if t < l1 + l2 else j3] = 1.0
            w[ids] = row  # a digit's first ring (palm knuckle slots or thumb hole) goes to its first joint
    unlabelled = w.sum(axis=1) == 0
    w[unlabelled, 0] = 1.0  # the wrist stub
    step = _adjacency(f, NUM_VERTS)
    for _ in range(_SKIN_SMOOTH_STEPS):
        w = 0.5 * w + 0.5 * (step @ w)
    return w / w.sum(axis=1, keepdims=True)


def _digit_membership(weights: np.ndarray) -> dict[str, np.ndarray]:
    return {d.name: weights[:, list(d.joints)].sum(axis=1) for d in _DIGITS}


def _shape_blendshapes(v, normals, weights, joints) -> np.ndarray:
    """Ten smooth displacement fields [778, 3, 10] in metres per unit beta (about one standard deviation)."""
    member = _digit_membership(weights)
    palm = weights[:, 0]
    digits = {d.name: d for d in _DIGITS}

    def length_field(name: str) -> np.ndarray:
        d = digits[name]
        axis = np.asarray(d.direction)
        along = np.clip((v - np.asarray(d.base)) @ axis, 0.0, None)
        return member[name][:, None] * along[:, None] * axis

    def radial_field(name: str) -> np.ndarray:
        d = digits[name]
        axis = np.asarray(d.direction)
        rel = v - np.asarray(d.base)
        return member[name][:, None] * (rel - (rel @ axis)[:, None] * axis)

    fingers = ("index", "middle", "ring", "pinky")
    base_z = sum(member[n] * digits[n].base[2] for n in digits)
    base_x = sum(member[n] * digits[n].base[0] for n in digits)
    dirs = [
        0.05 * v,  # overall size
        0.07 * sum(length_field(n) for n in fingers),  # finger length
        0.07 * (palm * v[:, 2] + base_z)[:, None] * _EZ,  # palm width / finger spacing
        0.10 * sum(radial_field(n) for n in digits) + 0.05 * (palm * v[:, 1])[:, None] * _EY,  # thickness
        0.06 * (palm * np.clip(v[:, 0], 0, None) + base_x)[:, None] * _EX,  # palm length
        0.08 * member["thumb"][:, None] * (v - joints[13]),  # thumb size
        0.0012 * normals,  # fleshiness
        0.07 * (length_field("index") - length_field("ring")),  # index vs ring length
        0.10 * length_field("pinky"),  # little finger length
        0.0025 * (palm * np.clip(-normals[:, 1], 0, None))[:, None] * normals,  # palm-side padding
    ]
    return np.stack(dirs, axis=2)


def _flexion_axes(joints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per joint (1..15): unit flexion axis and the direction the child bone moves on flexion."""
    axes = np.zeros((NUM_JOINTS, 3))
    bend = np.zeros((NUM_JOINTS, 3))
    for d in _DIGITS:
        axis = np.asarray(d.direction)
        toward = -_EY if d.palm_group >= 0 else _unit(-_EY + 0.6 * _EZ)
        toward = _unit(toward - (toward @ axis) * axis)
        axes[list(d.joints)] = np.cross(axis, toward)
        bend[list(d.joints)] = toward
    return axes, bend


def _pose_blendshapes(v, normals, weights, joints) -> np.ndarray:
    """posedirs [778, 3, 135] on features (R_j - I) for joints 1..15 (smplx order j, row, col).

    Skin bulges outwards around a bent joint (diagonal terms, any bending direction) and the flexion side
    bulges while the extension side flattens (antisymmetric terms, sign of the flexion). Both act only where
    the joint's and its parent's skinning weights overlap.
    """
    axes, bend = _flexion_axes(joints)
    posedirs = np.zeros((NUM_VERTS, 3, 15, 3, 3))
    for j in range(1, NUM_JOINTS):
        region = np.clip(4.0 * weights[:, j] * weights[:, MANO_PARENTS[j]], 0.0, 1.0)
        bulge = -0.0010 * region[:, None] * normals  # (R-I)_ii sum to 2(cos - 1) <= 0
        for r in range(3):
            posedirs[:, :, j - 1, r, r] = bulge
        a = axes[j]
        side = 0.0015 * (region * (normals @ bend[j]))[:, None] * normals
        # 0.5 * (R - R^T) . a = sin(theta) * (axis . a): the signed flexion.
        for (r, c), s in {(2, 1): a[0], (1, 2): -a[0], (0, 2): a[1], (2, 0): -a[1], (1, 0): a[2], (0, 1): -a[2]}.items():
            posedirs[:, :, j - 1, r, c] = 0.5 * s * side
    return posedirs.reshape(NUM_VERTS, 3, 135)


def _hand_pose_prior(joints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """hands_components [45, 45] (orthonormal rows, first ones meaningful) and hands_mean [45] (mild curl)."""
    axes, _ = _flexion_axes(joints)
    curl = np.zeros((15, 3))
    spread = np.zeros((15, 3))
    claw = np.zeros((15, 3))
    mean = np.zeros((15, 3))
    for d in _DIGITS:
        j1, j2, j3 = (j - 1 for j in d.joints)
        curl[[j1, j2, j3]] = axes[d.joints[0]] * np.array([[1.0], [1.0], [0.7]])
        claw[[j1, j2, j3]] = axes[d.joints[0]] * np.array([[-1.0], [0.7], [0.7]])
        side = {"index": 1.0, "middle": 0.3, "ring": -0.4, "pinky": -1.0, "thumb": 0.6}[d.name]
        spread[j1] = side * _EY
        flex = {"index": (0.10, 0.18, 0.08), "middle": (0.12, 0.22, 0.10), "ring": (0.16, 0.26, 0.12),
                "pinky": (0.22, 0.30, 0.14), "thumb": (0.05, 0.10, 0.12)}[d.name]
        mean[[j1, j2, j3]] = axes[d.joints[0]] * np.asarray(flex)[:, None]
    meaningful = np.stack([curl.ravel(), spread.ravel(), claw.ravel()], axis=1)
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(np.concatenate([meaningful, rng.standard_normal((45, 42))], axis=1))
    signs = np.sign(np.sum(basis[:, :3] * meaningful, axis=0))
    basis[:, :3] *= signs
    return basis.T.copy(), mean.ravel()


def _mirror_to_left(right: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Left hand = right mirrored in x, laid out like the official MANO_LEFT file.

    Like the official file, shapedirs keep the right hand's x sign (the known left-hand bug), so the same
    `shapedirs[:, 0, :] *= -1` fix turns them into the exact mirror of the right hand's shape space.
    """
    m = np.array([-1.0, 1.0, 1.0])
    # (R_L - I) = M (R_R - I) M and offsets mirror by M: entry (k, j, r, c) flips by m_k m_r m_c.
    pose_sign = np.einsum("k,r,c->krc", m, m, m)[:, None]  # [3, 1, 3, 3]
    posedirs = right["posedirs"].reshape(NUM_VERTS, 3, 15, 3, 3) * pose_sign
    aa_sign = np.tile(MIRROR_AXIS_ANGLE_SIGNS, 15)
    return {
        "v_template": right["v_template"] * m,
        "shapedirs": right["shapedirs"].copy(),
        "posedirs": posedirs.reshape(NUM_VERTS, 3, 135),
        "J_regressor": right["J_regressor"].copy(),
        "kintree_table": right["kintree_table"].copy(),
        "weights": right["weights"].copy(),
        "f": right["f"][:, ::-1].copy(),
        "hands_components": right["hands_components"] * aa_sign,
        "hands_mean": right["hands_mean"] * aa_sign,
    }


def build_procedural_mano(side: str = "right") -> dict[str, np.ndarray]:
    """Build the procedural model from scratch (deterministic, ~0.1 s). Prefer :func:`procedural_mano_arrays`."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    right = _build_right()
    return right if side == "right" else _mirror_to_left(right)


@functools.lru_cache(maxsize=2)
def _cached(side: str) -> dict[str, np.ndarray]:
    arrays = build_procedural_mano(side)
    for a in arrays.values():
        a.flags.writeable = False
    log.debug("built procedural MANO (%s hand)", side)
    return arrays


def procedural_mano_arrays(side: str = "right") -> dict[str, np.ndarray]:
    """The procedural model's arrays (fresh writable copies of an in-process cache), MANO file keys."""
    return {k: a.copy() for k, a in _cached(side).items()}

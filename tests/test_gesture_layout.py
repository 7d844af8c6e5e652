"""The 320-d gesture layout against the SAM-3D-Body key table written out by hand (issue #4, section 1)."""

import numpy as np
import pytest
import torch

from gesture.layout import PARTS, POSE_DIM, SUB_SLICES, VQ_PARTS, ClipConstants, pack, unpack

# The spec, as literal index ranges: (key, source slice within the key, destination range in the vector).
SPEC = [
    ("body_pose_params", slice(0, 130), range(0, 130)),
    ("hand_pose_params", slice(0, 108), range(130, 238)),
    ("expr_params", slice(0, 72), range(238, 310)),
    ("body_pose_params", slice(130, 133), range(310, 313)),
    ("global_rot", slice(0, 3), range(313, 316)),
    ("contact", slice(0, 4), range(316, 320)),
]
SIZES = {"body_pose_params": 133, "hand_pose_params": 108, "expr_params": 72, "global_rot": 3, "contact": 4}


def _marked(lead=(5,)):
    """Each key filled with values that encode (key, index), so a misplaced value is identifiable."""
    rng = np.random.default_rng(0)
    return {k: (1000 * (i + 1) + np.arange(n) + rng.random(lead + (n,))).astype(np.float64)
            for i, (k, n) in enumerate(SIZES.items())}


def test_parts_partition_0_to_320_exactly():
    spans = sorted((s.start, s.stop) for s in PARTS.values())
    assert spans[0][0] == 0 and spans[-1][1] == POSE_DIM == 320
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert {k: (s.start, s.stop) for k, s in PARTS.items()} == {
        "body": (0, 130), "hand": (130, 238), "face": (238, 313), "global": (313, 320)}
    assert set(VQ_PARTS) == {"face", "body", "hand"}
    sub = sorted((s.start, s.stop) for k, s in SUB_SLICES.items())
    assert sub[0][0] == 0 and sub[-1][1] == 320 and all(a[1] == b[0] for a, b in zip(sub, sub[1:]))


def test_pack_places_every_key_where_the_spec_says():
    frames = _marked()
    vec = pack({k: v for k, v in frames.items() if k != "contact"}, frames["contact"])
    assert vec.shape == (5, 320)
    for key, src, dst in SPEC:
        np.testing.assert_array_equal(vec[:, list(dst)], frames[key][:, src], err_msg=key)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_unpack_inverts_pack_with_leading_dims(backend):
    frames = _marked(lead=(2, 3))
    if backend == "torch":
        frames = {k: torch.from_numpy(v) for k, v in frames.items()}
    vec = pack({k: v for k, v in frames.items() if k != "contact"}, frames["contact"])
    assert tuple(vec.shape) == (2, 3, 320) and type(vec) is type(frames["contact"])
    out = unpack(vec)
    assert set(out) == set(SIZES)
    for k, v in frames.items():
        assert tuple(out[k].shape) == (2, 3, SIZES[k])
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(v), err_msg=k)


def test_unpack_returns_copies_not_views():
    vec = np.arange(320, dtype=np.float32)[None].repeat(2, 0)
    out = unpack(vec)
    out["hand_pose_params"][:] = -1
    out["global_rot"][:] = -1
    np.testing.assert_array_equal(vec[0], np.arange(320, dtype=np.float32))


def test_pack_rejects_wrong_sizes_and_missing_keys():
    frames = _marked()
    contact = frames.pop("contact")
    with pytest.raises(ValueError, match="hand_pose_params"):
        pack({**frames, "hand_pose_params": frames["hand_pose_params"][:, :100]}, contact)
    with pytest.raises(KeyError, match="expr_params"):
        pack({k: v for k, v in frames.items() if k != "expr_params"}, contact)
    with pytest.raises(ValueError, match="contact"):
        pack(frames, contact[:, :3])
    with pytest.raises(ValueError, match="leading shape"):
        pack({**frames, "global_rot": frames["global_rot"][:4]}, contact)


def test_clip_constants_round_trip_and_validation():
    c = ClipConstants(cam_t=(0.1, 0.2, 4.0), focal_length=1200.0, scale_params=tuple(np.linspace(0, 1, 28)),
                      shape_params=tuple(np.linspace(-1, 1, 45)), width=1920, height=1080, fps=30.0)
    assert ClipConstants.from_dict(c.to_dict()) == c
    assert ClipConstants.from_dict(c.to_arrays()).cam_t == pytest.approx(c.cam_t)
    with pytest.raises(ValueError, match="shape_params"):
        ClipConstants(cam_t=(0, 0, 1), focal_length=1.0, scale_params=(0.0,) * 28, shape_params=(0.0,) * 10,
                      width=1, height=1, fps=30.0)

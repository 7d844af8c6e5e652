"""MANO layer: chumpy-free pickle loading, npz export, the procedural hand's topology, and the layer's maths
checked against smplx.lbs.lbs run directly on the arrays (float64)."""

from __future__ import annotations

import collections
import importlib.util
import pickle
import sys
import time
import types

import numpy as np
import pytest
import scipy.sparse
import torch
from smplx.lbs import lbs

from common import mano_procedural
from common.mano import (
    FINGERTIP_NAMES,
    FINGERTIP_VERTEX_IDS,
    JOINT_NAMES_21,
    MANO_KEYS,
    MANO_NATIVE_JOINTS,
    MANO_PARENTS,
    NATIVE16_TIPS_TO_21,
    NUM_FACES,
    NUM_VERTS,
    ManoLayer,
    convert_mano_pkl_to_npz,
    load_mano_arrays,
    main,
    mirror_hand_pose,
)
from common.shapes import ShapeError

MIRROR = np.array([-1.0, 1.0, 1.0])


def _random_inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pose = 0.4 * torch.randn(n, 48, generator=g)
    shape = torch.randn(n, 10, generator=g)
    trans = 0.1 * torch.randn(n, 3, generator=g)
    return pose, shape, trans


def _reference(arrays, pose, shape, trans, flat_hand_mean: bool):
    """Independent float64 forward: smplx.lbs.lbs on the raw arrays, tips and reorder done by joint name."""
    pose = pose.double()
    if not flat_hand_mean:
        pose = pose + torch.cat([torch.zeros(3), torch.from_numpy(arrays["hands_mean"])])
    posedirs = torch.from_numpy(arrays["posedirs"].reshape(-1, 135).T.copy())
    verts, joints16 = lbs(
        shape.double(), pose, torch.from_numpy(arrays["v_template"]), torch.from_numpy(arrays["shapedirs"]),
        posedirs, torch.from_numpy(arrays["J_regressor"]), torch.from_numpy(arrays["kintree_table"][0]),
        torch.from_numpy(arrays["weights"]),
    )
    native_to_21 = {"wrist": "wrist", "thumb1": "thumb_cmc", "thumb2": "thumb_mcp", "thumb3": "thumb_ip"}
    for finger in ("index", "middle", "ring", "pinky"):
        native_to_21.update({f"{finger}{k}": f"{finger}_{name}" for k, name in ((1, "mcp"), (2, "pip"), (3, "dip"))})
    by_name = {native_to_21[name]: joints16[:, k] for k, name in enumerate(MANO_NATIVE_JOINTS)}
    by_name.update({f"{finger}_tip": verts[:, vid] for finger, vid in zip(FINGERTIP_NAMES, FINGERTIP_VERTEX_IDS)})
    joints21 = torch.stack([by_name[name] for name in JOINT_NAMES_21], dim=1)
    return verts + trans.double()[:, None], joints21 + trans.double()[:, None]


def _perturbed_arrays(seed: int = 1) -> dict[str, np.ndarray]:
    """Procedural arrays nudged so that a file source is distinguishable from the default model."""
    rng = np.random.default_rng(seed)
    arrays = mano_procedural.procedural_mano_arrays("right")
    arrays["v_template"] = arrays["v_template"] + 1e-3 * rng.standard_normal((NUM_VERTS, 3))
    arrays["shapedirs"] = arrays["shapedirs"] * 1.1
    arrays["hands_mean"] = arrays["hands_mean"] + 0.05
    return arrays


# ---------------------------------------------------------------------------------------------------- constants


def test_native16_tips_to_21_matches_joint_names():
    source = list(MANO_NATIVE_JOINTS) + [f"{f}_tip" for f in FINGERTIP_NAMES]
    rename = {"thumb1": "thumb_cmc", "thumb2": "thumb_mcp", "thumb3": "thumb_ip"}
    for finger in ("index", "middle", "ring", "pinky"):
        rename.update({f"{finger}1": f"{finger}_mcp", f"{finger}2": f"{finger}_pip", f"{finger}3": f"{finger}_dip"})
    expected = [[rename.get(s, s) for s in source].index(name) for name in JOINT_NAMES_21]
    assert list(NATIVE16_TIPS_TO_21) == expected
    assert len(JOINT_NAMES_21) == 21 and JOINT_NAMES_21[0] == "wrist"


# ---------------------------------------------------------------------------------------------------- procedural


@pytest.fixture(scope="module")
def right():
    return load_mano_arrays(None, "right")


def test_procedural_counts_tree_and_normalised_weights(right):
    assert right["v_template"].shape == (NUM_VERTS, 3)
    assert right["f"].shape == (NUM_FACES, 3)
    assert right["J_regressor"].shape == (16, NUM_VERTS)
    assert tuple(right["kintree_table"][0]) == MANO_PARENTS
    for key in ("J_regressor", "weights"):
        assert right[key].min() >= 0
    np.testing.assert_allclose(right["J_regressor"].sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(right["weights"].sum(axis=1), 1.0, atol=1e-12)
    comps = right["hands_components"]
    np.testing.assert_allclose(comps @ comps.T, np.eye(45), atol=1e-10)
    mean_angles = np.linalg.norm(right["hands_mean"].reshape(15, 3), axis=1)
    assert 0.0 < mean_angles.max() < 0.5  # a mild curl, not a fist
    assert 0 < np.abs(right["posedirs"]).max() < 5e-3  # small but present pose correctives
    assert (np.abs(right["shapedirs"]).reshape(-1, 10).max(axis=0) > 1e-4).all()  # ten live betas


def test_procedural_joints_are_hand_like(right):
    joints = right["J_regressor"] @ right["v_template"]
    np.testing.assert_allclose(joints[0], 0.0, atol=1e-9)  # wrist at the origin
    tips = right["v_template"][list(FINGERTIP_VERTEX_IDS)]
    middle_length = np.linalg.norm(tips[2] - joints[0])
    assert 0.16 < middle_length < 0.21  # an adult hand, in metres
    assert (tips[1:, 0] > 0.1).all()  # fingers along +x
    # Bones from 1.5 cm (a little finger's middle phalanx is about 2 cm: the procedural one is exactly that,
    # so 2 cm must lie inside the bound, not on it) to 10 cm (wrist to a finger's MCP).
    for a, b in zip(MANO_PARENTS[1:], range(1, 16)):
        assert 0.015 < np.linalg.norm(joints[b] - joints[a]) < 0.1


def _edge_counts(faces):
    directed = collections.Counter(
        (int(a), int(b)) for tri in faces for a, b in ((tri[0], tri[1]), (tri[1], tri[2]), (tri[2], tri[0]))
    )
    undirected = collections.Counter(tuple(sorted(e)) for e in directed.elements())
    return directed, undirected


def test_procedural_mesh_is_oriented_disk_with_one_16_edge_wrist_hole(right):
    v, f = right["v_template"], right["f"]
    assert (np.sort(f, axis=1)[:, :-1] != np.sort(f, axis=1)[:, 1:]).all()  # no degenerate faces
    assert set(np.unique(f)) == set(range(NUM_VERTS))
    directed, undirected = _edge_counts(f)
    assert max(directed.values()) == 1  # consistently oriented
    assert max(undirected.values()) <= 2  # every edge borders at most two faces
    boundary = [e for e, c in undirected.items() if c == 1]
    assert len(boundary) == 16
    assert NUM_VERTS - len(undirected) + len(f) == 1  # Euler characteristic of a disk
    # The 16 boundary edges form one simple loop.
    neighbours = collections.defaultdict(list)
    for a, b in boundary:
        neighbours[a].append(b)
        neighbours[b].append(a)
    assert all(len(n) == 2 for n in neighbours.values()) and len(neighbours) == 16
    loop, prev = [boundary[0][0]], None
    while len(loop) < 17:
        nxt = [n for n in neighbours[loop[-1]] if n != prev][0]
        prev = loop[-1]
        loop.append(nxt)
        if nxt == loop[0]:
            break
    assert len(loop) == 17 and loop[-1] == loop[0]
    # Vertex-manifold: the faces around each vertex form a single fan.
    faces_of = collections.defaultdict(list)
    for k, tri in enumerate(f):
        for x in tri:
            faces_of[int(x)].append(k)
    for x, ks in faces_of.items():
        links = [tuple(int(y) for y in f[k] if y != x) for k in ks]
        graph = collections.defaultdict(set)
        for a, b in links:
            graph[a].add(b)
            graph[b].add(a)
        seen, todo = set(), [links[0][0]]
        while todo:
            y = todo.pop()
            if y not in seen:
                seen.add(y)
                todo.extend(graph[y])
        assert seen == set(graph), f"vertex {x} is not manifold"
    # Outward normals: capped at the wrist loop, the enclosed volume is positive (and hand-sized).
    centre = v[[a for a, _ in boundary]].mean(axis=0)
    closed = np.concatenate([v, centre[None]])
    cap = [(b, a, NUM_VERTS) for a, b in directed if (b, a) not in directed]
    tris = closed[np.concatenate([f, np.array(cap)])]
    volume = np.einsum("ij,ij->i", tris[:, 0], np.cross(tris[:, 1], tris[:, 2])).sum() / 6
    assert 2e-4 < volume < 6e-4  # 200 - 600 ml


def test_procedural_fingertips_are_finger_extremities(right):
    v, w = right["v_template"], right["weights"]
    joints = right["J_regressor"] @ v
    distal = {"thumb": (14, 15), "index": (2, 3), "middle": (5, 6), "ring": (11, 12), "pinky": (8, 9)}
    for finger, tip_id in zip(FINGERTIP_NAMES, FINGERTIP_VERTEX_IDS):
        middle_joint, last_joint = distal[finger]
        direction = joints[last_joint] - joints[middle_joint]
        own = np.flatnonzero(w.argmax(axis=1) == last_joint)
        assert own[np.argmax(v[own] @ direction)] == tip_id, finger
        assert own[np.argmax(np.linalg.norm(v[own] - joints[0], axis=1))] == tip_id, finger


def test_procedural_is_deterministic_cached_and_fast():
    start = time.perf_counter()
    first = mano_procedural.build_procedural_mano("right")
    assert time.perf_counter() - start < 1.0
    second = mano_procedural.build_procedural_mano("right")
    for key in MANO_KEYS:
        assert np.array_equal(first[key], second[key]), key
    cached = mano_procedural._cached("right")
    assert not cached["v_template"].flags.writeable
    copy = mano_procedural.procedural_mano_arrays("right")
    copy["v_template"][0] += 1.0  # callers own their copies
    assert np.array_equal(mano_procedural.procedural_mano_arrays("right")["v_template"], first["v_template"])


def test_procedural_left_is_mirror_of_right(right):
    left = load_mano_arrays(None, "left")
    np.testing.assert_array_equal(left["v_template"], right["v_template"] * MIRROR)
    np.testing.assert_array_equal(left["f"], right["f"][:, ::-1])
    pose, shape, trans = _random_inputs(4, seed=3)
    mirror_pose = mirror_hand_pose(pose)
    torch.testing.assert_close(mirror_hand_pose(mirror_pose), pose)
    mirror_trans = trans * torch.from_numpy(MIRROR).float()
    out_r = ManoLayer(side="right")(pose, shape, trans)
    out_l = ManoLayer(side="left")(mirror_pose, shape, mirror_trans)
    m = torch.from_numpy(MIRROR).float()
    torch.testing.assert_close(out_l.vertices, out_r.vertices * m, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_l.joints, out_r.joints * m, atol=1e-5, rtol=0)


def test_left_shapedirs_fix_applies_to_left_only_and_not_in_place(tmp_path):
    fixed = load_mano_arrays(None, "left", fix_left_shapedirs=True)["shapedirs"]
    raw = load_mano_arrays(None, "left", fix_left_shapedirs=False)["shapedirs"]
    np.testing.assert_array_equal(fixed[:, 0], -raw[:, 0])
    np.testing.assert_array_equal(fixed[:, 1:], raw[:, 1:])
    np.testing.assert_array_equal(load_mano_arrays(None, "left", fix_left_shapedirs=False)["shapedirs"], raw)
    right_a = load_mano_arrays(None, "right", fix_left_shapedirs=True)["shapedirs"]
    right_b = load_mano_arrays(None, "right", fix_left_shapedirs=False)["shapedirs"]
    np.testing.assert_array_equal(right_a, right_b)
    # From a file: the fix is applied to the loaded copy; the file keeps the raw values.
    path = tmp_path / "MANO_LEFT.npz"
    np.savez(path, **load_mano_arrays(None, "left", fix_left_shapedirs=False))
    np.testing.assert_array_equal(load_mano_arrays(path, "left")["shapedirs"], fixed)
    with np.load(path) as stored:
        np.testing.assert_array_equal(stored["shapedirs"], raw)


# ---------------------------------------------------------------------------------------------------- layer


@pytest.mark.parametrize("flat_hand_mean", [False, True])
def test_layer_matches_smplx_lbs_reference(right, flat_hand_mean):
    pose, shape, trans = _random_inputs(5)
    out = ManoLayer(flat_hand_mean=flat_hand_mean)(pose, shape, trans)
    ref_verts, ref_joints = _reference(right, pose, shape, trans, flat_hand_mean)
    torch.testing.assert_close(out.vertices.double(), ref_verts, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.joints.double(), ref_joints, atol=1e-5, rtol=0)


def test_layer_keeps_leading_dims():
    layer = ManoLayer()
    pose, shape, trans = _random_inputs(6, seed=2)
    out = layer(pose.reshape(2, 3, 48), shape.reshape(2, 3, 10), trans.reshape(2, 3, 3))
    assert out.vertices.shape == (2, 3, NUM_VERTS, 3) and out.joints.shape == (2, 3, 21, 3)
    flat = layer(pose, shape, trans)
    torch.testing.assert_close(out.vertices.reshape(6, NUM_VERTS, 3), flat.vertices)
    torch.testing.assert_close(out.joints.reshape(6, 21, 3), flat.joints)
    single = layer(pose[0], shape[0], trans[0])
    assert single.vertices.shape == (NUM_VERTS, 3)
    torch.testing.assert_close(single.joints, flat.joints[0])


def test_zero_pose_gives_rest_template_and_joints(right):
    out = ManoLayer(flat_hand_mean=True)(torch.zeros(1, 48), torch.zeros(1, 10))
    rest = right["v_template"]
    joints16 = right["J_regressor"] @ rest
    expected = np.concatenate([joints16, rest[list(FINGERTIP_VERTEX_IDS)]])[list(NATIVE16_TIPS_TO_21)]
    np.testing.assert_allclose(out.vertices[0].numpy(), rest, atol=1e-6)
    np.testing.assert_allclose(out.joints[0].numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(out.joints[0, 0].numpy(), joints16[0], atol=1e-6)  # index 0 is the wrist


def test_layer_rejects_bad_shapes():
    layer = ManoLayer()
    with pytest.raises(ShapeError, match="pose"):
        layer(torch.zeros(2, 45), torch.zeros(2, 10))
    with pytest.raises(ShapeError, match="shape"):
        layer(torch.zeros(2, 3, 48), torch.zeros(2, 10))  # no broadcasting of betas over time
    with pytest.raises(ShapeError, match="trans"):
        layer(torch.zeros(2, 48), torch.zeros(2, 10), torch.zeros(3))


def test_layer_buffers_move_but_stay_out_of_checkpoints():
    layer = ManoLayer()
    assert layer.faces.shape == (NUM_FACES, 3) and layer.faces.dtype == torch.long
    assert list(layer.parameters()) == []
    assert layer.state_dict() == {}  # licence-gated arrays never enter a checkpoint
    layer64 = layer.to(torch.float64)
    out = layer64(torch.zeros(1, 48, dtype=torch.float64), torch.zeros(1, 10, dtype=torch.float64))
    assert out.vertices.dtype == torch.float64
    assert layer64.mano.v_template.dtype == torch.float64


# ---------------------------------------------------------------------------------------------------- files


def _fake_chumpy_ch_class() -> type:
    """A class that pickles like chumpy.ch.Ch: new-style object, state dict with the array under 'x'."""

    def __init__(self, x):
        self.x = np.asarray(x)

    def __getstate__(self):
        return {"x": self.x, "_dirty_vars": set(), "_itr": None, "_depends_on_deps": {},
                "_make_dense": False, "_make_sparse": False}

    return type("Ch", (), {"__module__": "chumpy.ch", "__init__": __init__, "__getstate__": __getstate__})


def _write_chumpy_pickle(path, arrays) -> None:
    """Write a pickle shaped like the official MANO file; chumpy is importable only while dumping."""
    ch_class = _fake_chumpy_ch_class()
    chumpy, chumpy_ch = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")
    chumpy_ch.Ch, chumpy.ch = ch_class, chumpy_ch
    data = {
        "v_template": ch_class(arrays["v_template"]),
        "shapedirs": ch_class(arrays["shapedirs"]),
        "posedirs": arrays["posedirs"],
        "J_regressor": scipy.sparse.csc_matrix(arrays["J_regressor"]),
        "kintree_table": arrays["kintree_table"].astype(np.uint32),  # root parent stored as 2**32 - 1
        "weights": arrays["weights"],
        "f": arrays["f"].astype(np.uint32),
        "hands_components": arrays["hands_components"],
        "hands_mean": arrays["hands_mean"],
        "hands_coeffs": np.zeros((3, 45)),
        "J": ch_class(arrays["J_regressor"] @ arrays["v_template"]),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = chumpy, chumpy_ch
    try:
        stream = pickle.dumps(data, protocol=2)
    finally:
        del sys.modules["chumpy"], sys.modules["chumpy.ch"]
    # Protocol 2 names classes as plain text ("module\nname\n"): use the module paths of the Python 2 era file.
    legacy = stream.replace(b"numpy._core.", b"numpy.core.").replace(b"scipy.sparse._csc\n", b"scipy.sparse.csc\n")
    assert legacy != stream
    path.write_bytes(legacy)


def test_chumpy_pickle_loads_without_chumpy_and_converts_to_npz(tmp_path):
    source = _perturbed_arrays()
    pkl = tmp_path / "MANO_RIGHT.pkl"
    _write_chumpy_pickle(pkl, source)
    assert importlib.util.find_spec("chumpy") is None and "chumpy" not in sys.modules
    assert b"chumpy.ch\nCh\n" in pkl.read_bytes() and b"scipy.sparse.csc\ncsc_matrix\n" in pkl.read_bytes()
    loaded = load_mano_arrays(pkl, "right")
    assert set(loaded) == set(MANO_KEYS)
    for key in MANO_KEYS:
        np.testing.assert_array_equal(loaded[key], source[key], err_msg=key)
    assert loaded["kintree_table"][0, 0] == -1

    npz = convert_mano_pkl_to_npz(pkl, tmp_path / "converted" / "MANO_RIGHT.npz")
    assert npz.is_file()
    pose, shape, trans = _random_inputs(3, seed=4)
    out_pkl = ManoLayer(pkl)(pose, shape, trans)
    out_npz = ManoLayer(npz)(pose, shape, trans)
    assert torch.equal(out_pkl.vertices, out_npz.vertices) and torch.equal(out_pkl.joints, out_npz.joints)
    out_default = ManoLayer()(pose, shape, trans)
    assert not torch.allclose(out_pkl.vertices, out_default.vertices)  # the file was really used
    ref_verts, _ = _reference(source, pose, shape, trans, flat_hand_mean=False)
    torch.testing.assert_close(out_npz.vertices.double(), ref_verts, atol=1e-5, rtol=0)


def test_cli_convert_and_info(tmp_path, capsys):
    pkl = tmp_path / "MANO_RIGHT.pkl"
    _write_chumpy_pickle(pkl, _perturbed_arrays())
    assert main(["convert", str(pkl), str(tmp_path / "MANO_RIGHT.npz")]) == 0
    assert main(["info", str(tmp_path)]) == 0  # a folder: MANO_RIGHT.npz preferred
    printed = capsys.readouterr().out
    assert "MANO_RIGHT.npz" in printed and "vertices: 778" in printed and "faces: 1538" in printed
    assert "boundary edges: 16" in printed


def test_pickle_with_foreign_class_is_refused(tmp_path):
    path = tmp_path / "MANO_RIGHT.pkl"
    path.write_bytes(pickle.dumps({"v_template": collections.OrderedDict()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="collections.OrderedDict"):
        load_mano_arrays(path)


def test_npz_source_round_trips(tmp_path):
    source = _perturbed_arrays(seed=5)
    path = tmp_path / "hand.npz"
    np.savez(path, **source)
    loaded = load_mano_arrays(path)
    for key in MANO_KEYS:
        np.testing.assert_array_equal(loaded[key], source[key], err_msg=key)


def test_bad_npz_names_file_and_key(tmp_path):
    source = _perturbed_arrays()
    del source["posedirs"]
    path = tmp_path / "broken.npz"
    np.savez(path, **source)
    with pytest.raises(ValueError, match=r"broken\.npz.*'posedirs'"):
        load_mano_arrays(path)
    source = _perturbed_arrays()
    source["weights"] = source["weights"][:, :15]
    np.savez(path, **source)
    with pytest.raises(ValueError, match=r"'weights' has shape \(778, 15\)"):
        load_mano_arrays(path)


def test_missing_configured_path_names_it_and_where_to_get_mano(tmp_path):
    missing = tmp_path / "nowhere" / "MANO_RIGHT.pkl"
    with pytest.raises(FileNotFoundError) as err:
        ManoLayer(model_path=missing)
    assert str(missing) in str(err.value) and "https://mano.is.tue.mpg.de" in str(err.value)
    with pytest.raises(FileNotFoundError, match="MANO_LEFT"):
        load_mano_arrays(tmp_path, "left")  # an existing folder without the files


def test_file_named_for_other_hand_is_refused(tmp_path):
    path = tmp_path / "MANO_LEFT.npz"
    np.savez(path, **_perturbed_arrays())
    with pytest.raises(ValueError, match="left hand"):
        load_mano_arrays(path, "right")


def test_truncated_mano_npz_is_an_error_naming_the_file(tmp_path):
    from common.mano import load_mano_arrays

    path = tmp_path / "MANO_RIGHT.npz"
    np.savez(path, **load_mano_arrays(None, "right"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"MANO model file .*MANO_RIGHT\.npz: unreadable"):
        load_mano_arrays(path, "right")

"""MANO hand layer (right and left) on `smplx.MANO`: 48-d axis-angle pose + 10 betas -> 778 vertices, 21 joints.

Model sources: the official licence-gated `MANO_{RIGHT,LEFT}.pkl` (read without chumpy), an `.npz` export of it,
or the procedural stand-in of :mod:`common.mano_procedural` when no file is configured. Not a fitting or
rendering module. CLI: `python -m common.mano convert SRC.pkl DST.npz` and `python -m common.mano info [PATH]`.

Joints come out in :data:`JOINT_NAMES_21` order (OpenPose/FreiHAND): the 16 joints regressed by MANO, reordered,
plus 5 fingertip vertices (smplx ids :data:`FINGERTIP_VERTEX_IDS`). Everything is in metres.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import scipy.sparse
import smplx
import torch
from einops import pack, unpack
from torch import nn

from common.mano_topology import (  # noqa: F401 - re-exported: common.mano is where callers import them
    FINGERTIP_NAMES,
    FINGERTIP_VERTEX_IDS,
    JOINT_NAMES_21,
    MANO_NATIVE_JOINTS,
    MANO_PARENTS,
    MIRROR_AXIS_ANGLE_SIGNS,
    NATIVE16_TIPS_TO_21,
    NUM_BETAS,
    NUM_FACES,
    NUM_VERTS,
    POSE_DIM,
)
from common.shapes import expect_shape

log = logging.getLogger(__name__)

MANO_URL = "https://mano.is.tue.mpg.de"

MANO_KEYS = (
    "v_template", "shapedirs", "posedirs", "J_regressor", "kintree_table", "weights", "f",
    "hands_components", "hands_mean",
)
_EXPECTED_SHAPES = {
    "v_template": (NUM_VERTS, 3),
    "shapedirs": (NUM_VERTS, 3, NUM_BETAS),
    "posedirs": (NUM_VERTS, 3, 135),
    "J_regressor": (16, NUM_VERTS),
    "kintree_table": (2, 16),
    "weights": (NUM_VERTS, 16),
    "f": (NUM_FACES, 3),
    "hands_components": (45, 45),
    "hands_mean": (45,),
}
_SIDES = ("right", "left")


# --------------------------------------------------------------------------------------------------------------
# Reading model files


class _ChumpyObject:
    """Stand-in for a pickled chumpy object: keeps its state dict; a plain `Ch` stores its array under 'x'."""

    chumpy_class = "chumpy.?"

    def __setstate__(self, state: dict) -> None:
        self.state = state


_CHUMPY_STAND_INS: dict[str, type] = {}
# What an official MANO pickle may reference. Anything else is refused: unpickling runs code by design.
_SAFE_BUILTINS = {"set", "frozenset", "object", "dict", "list", "tuple", "slice", "complex", "bytearray",
                  "int", "float", "str", "bool", "bytes"}


class _ManoUnpickler(pickle.Unpickler):
    """Unpickles an official MANO/SMPL pickle without chumpy (chumpy 0.70 breaks on numpy >= 1.24)."""

    def find_class(self, module: str, name: str):
        if module == "chumpy" or module.startswith("chumpy."):
            key = f"{module}.{name}"
            if key not in _CHUMPY_STAND_INS:
                _CHUMPY_STAND_INS[key] = type(name, (_ChumpyObject,), {"chumpy_class": key})
            return _CHUMPY_STAND_INS[key]
        if module.startswith("scipy.sparse"):
            # Python 2 era pickles name private modules (scipy.sparse.csc) that newer scipy may drop.
            cls = getattr(scipy.sparse, name, None)
            if isinstance(cls, type):
                return cls
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return super().find_class(module, name)
        if module.split(".")[0] in ("numpy", "copy_reg", "copyreg", "_codecs"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: not part of a MANO model file")


def _to_numpy(value, key: str, path: Path):
    if isinstance(value, _ChumpyObject):
        if "x" not in value.state:
            raise ValueError(
                f"{path}: key {key!r} is a {value.chumpy_class} expression, not a stored array "
                "(re-save it with chumpy's `.r` on a machine where chumpy works)"
            )
        return _to_numpy(value.state["x"], key, path)
    if scipy.sparse.issparse(value):
        return value.toarray()
    return value


def read_mano_pkl(path: str | Path) -> dict[str, np.ndarray]:
    """All entries of an official MANO pickle as plain numpy (chumpy arrays unwrapped, sparse densified)."""
    path = Path(path)
    with path.open("rb") as fh:
        data = _ManoUnpickler(fh, encoding="latin1").load()
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a pickled dict of MANO arrays, got {type(data).__name__}")
    return {key: _to_numpy(value, key, path) for key, value in data.items()}


def _checked_arrays(raw, source: str) -> dict[str, np.ndarray]:
    """The nine MANO arrays with checked shapes, float64 / int64 dtypes and root parent -1 (new arrays)."""
    out = {}
    for key in MANO_KEYS:
        if key not in raw:
            raise ValueError(f"{source}: missing key {key!r} (a MANO model needs {', '.join(MANO_KEYS)})")
        arr = np.asarray(raw[key])
        if arr.shape != _EXPECTED_SHAPES[key]:
            raise ValueError(f"{source}: {key!r} has shape {arr.shape}, expected {_EXPECTED_SHAPES[key]}")
        integer = key in ("f", "kintree_table")
        out[key] = arr.astype(np.int64 if integer else np.float64, copy=True)
    # The official files store the root's parent as uint32 -1 = 4294967295.
    out["kintree_table"][0, 0] = -1
    if tuple(out["kintree_table"][0]) != MANO_PARENTS or tuple(out["kintree_table"][1]) != tuple(range(16)):
        raise ValueError(f"{source}: kintree_table {out['kintree_table'].tolist()} is not MANO's joint tree")
    if out["f"].min() < 0 or out["f"].max() >= NUM_VERTS:
        raise ValueError(f"{source}: 'f' indexes vertices outside [0, {NUM_VERTS})")
    return out


def _side_from_name(path: Path) -> str | None:
    name = path.name.upper()
    found = [side for side in _SIDES if side.upper() in name]
    return found[0] if len(found) == 1 else None


def _missing_model_message(what: str) -> str:
    return (
        f"{what}. MANO is licence-gated and never shipped with this repository: register and download it at "
        f"{MANO_URL}, then point the MANO path setting at MANO_RIGHT.pkl / MANO_LEFT.pkl (or a folder holding "
        "them, or their .npz made by `python -m common.mano convert SRC.pkl DST.npz`). "
        "Leave the setting empty (null) to use the procedural stand-in hand."
    )


def resolve_mano_path(model_path: str | Path | None, side: str = "right") -> Path | None:
    """The model file for `side`; None (or "") means the procedural model.

    `model_path` is a .pkl/.npz file or a folder with MANO_RIGHT/LEFT.{npz,pkl} (npz preferred). A configured
    path that does not exist raises FileNotFoundError naming it; a file named for the other hand raises.
    """
    if side not in _SIDES:
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if model_path is None or str(model_path) == "":
        return None
    path = Path(model_path).expanduser()
    if path.is_dir():
        candidates = [path / f"MANO_{side.upper()}{ext}" for ext in (".npz", ".pkl")]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(_missing_model_message(
                f"MANO folder {path} has neither {candidates[0].name} nor {candidates[1].name}"))
        path = found[0]
    elif not path.is_file():
        raise FileNotFoundError(_missing_model_message(f"MANO model file {path} does not exist"))
    named = _side_from_name(path)
    if named is not None and named != side:
        raise ValueError(f"{path} is named for the {named} hand but side={side!r} was requested")
    if path.suffix.lower() not in (".pkl", ".npz"):
        raise ValueError(f"{path}: unknown MANO file type {path.suffix!r} (expected .pkl or .npz)")
    return path


def _read_model_file(path: Path) -> dict[str, np.ndarray]:
    if path.suffix.lower() == ".pkl":
        raw = read_mano_pkl(path)
    else:
        try:
            with np.load(path, allow_pickle=False) as npz:
                raw = {key: npz[key] for key in npz.files}
        except Exception as err:  # noqa: BLE001 - numpy / zipfile / zlib errors of a truncated or corrupt file
            raise ValueError(f"MANO model file {path}: unreadable ({type(err).__name__}: {err})") from err
    return _checked_arrays(raw, str(path))


def load_mano_arrays(
    model_path: str | Path | None = None, side: str = "right", fix_left_shapedirs: bool = True
) -> dict[str, np.ndarray]:
    """MANO arrays (fresh, writable) keyed like the official file; `model_path` None -> procedural model.

    Keys: v_template [778,3], shapedirs [778,3,10], posedirs [778,3,135], J_regressor [16,778] (dense),
    kintree_table [2,16] (root parent -1), weights [778,16], f [1538,3], hands_components [45,45],
    hands_mean [45]. `fix_left_shapedirs` negates shapedirs[:, 0, :] of the left hand (known bug of the
    official left file, reproduced by the procedural left hand); the right hand is never touched.
    """
    path = resolve_mano_path(model_path, side)
    if path is None:
        from common.mano_procedural import procedural_mano_arrays

        arrays = _checked_arrays(procedural_mano_arrays(side), f"procedural MANO ({side})")
    else:
        arrays = _read_model_file(path)
    if side == "left" and fix_left_shapedirs:
        fixed = arrays["shapedirs"].copy()
        fixed[:, 0, :] *= -1
        arrays["shapedirs"] = fixed
    return arrays


def convert_mano_pkl_to_npz(src: str | Path, dst: str | Path) -> Path:
    """One-time conversion of an official MANO pickle to an .npz of the nine arrays (no left-hand fix baked in).

    The .npz loads without pickle (allow_pickle=False). It holds licence-gated data: never commit it.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(_missing_model_message(f"MANO pickle {src} does not exist"))
    arrays = _checked_arrays(read_mano_pkl(src), str(src))
    dst.parent.mkdir(parents=True, exist_ok=True)
    np.savez(dst, **arrays)
    log.info("converted %s -> %s", src, dst)
    return dst


# --------------------------------------------------------------------------------------------------------------
# The layer


def mirror_hand_pose(pose: torch.Tensor) -> torch.Tensor:
    """pose [..., 48] of one hand -> [..., 48] of the other hand mirrored in x (an involution).

    Exactly for the procedural model (left = right mirrored): the left layer fed `mirror_hand_pose(p)` gives
    the right layer's output for `p` with x negated. Use it to train one-handed models on both hands.
    """
    expect_shape(pose, (*pose.shape[:-1], POSE_DIM), "pose")
    signs = pose.new_tensor(MIRROR_AXIS_ANGLE_SIGNS).repeat(POSE_DIM // 3)
    return pose * signs


class ManoOutput(NamedTuple):
    vertices: torch.Tensor  # [..., 778, 3] metres
    joints: torch.Tensor  # [..., 21, 3] metres, JOINT_NAMES_21 order (0 = wrist)


class ManoLayer(nn.Module):
    """MANO forward kinematics (smplx.MANO, use_pca=False) with any leading dims and 21 OpenPose-order joints.

    `pose[..., :3]` is the global orientation, `pose[..., 3:]` the 15 finger joints (MANO native order),
    axis-angle in radians; with `flat_hand_mean=False` the model's hands_mean is added to the finger pose
    (smplx semantics, zero pose = relaxed hand). All model arrays are non-persistent buffers: they follow
    `.to(device)` but never enter a checkpoint (the official ones are licence-gated).
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        side: str = "right",
        flat_hand_mean: bool = False,
        fix_left_shapedirs: bool = True,
    ) -> None:
        super().__init__()
        path = resolve_mano_path(model_path, side)
        arrays = load_mano_arrays(path, side, fix_left_shapedirs)
        self.side = side
        self.flat_hand_mean = flat_hand_mean
        self.source = "procedural" if path is None else str(path)
        with contextlib.redirect_stdout(io.StringIO()):  # smplx prints a warning for 10-beta models
            self.mano = smplx.MANO(
                model_path="",
                is_rhand=side == "right",
                data_struct=SimpleNamespace(**arrays),
                use_pca=False,
                flat_hand_mean=flat_hand_mean,
                create_global_orient=False,
                create_hand_pose=False,
                create_betas=False,
                create_transl=False,
                create_body_pose=False,
            )
        for module in self.mano.modules():
            for name, buf in list(module.named_buffers(recurse=False)):
                module.register_buffer(name, buf, persistent=False)
        self.register_buffer("faces", torch.as_tensor(arrays["f"], dtype=torch.long), persistent=False)
        self.register_buffer("tip_ids", torch.tensor(FINGERTIP_VERTEX_IDS, dtype=torch.long), persistent=False)
        self.register_buffer("order_21", torch.tensor(NATIVE16_TIPS_TO_21, dtype=torch.long), persistent=False)
        log.debug("ManoLayer(%s hand) from %s", side, self.source)

    def extra_repr(self) -> str:
        return f"side={self.side}, flat_hand_mean={self.flat_hand_mean}, source={self.source}"

    def forward(self, pose: torch.Tensor, shape: torch.Tensor, trans: torch.Tensor | None = None) -> ManoOutput:
        """pose [..., 48], shape [..., 10], trans [..., 3] | None -> vertices [..., 778, 3], joints [..., 21, 3]."""
        lead = tuple(pose.shape[:-1])
        expect_shape(pose, (*lead, POSE_DIM), "pose")
        expect_shape(shape, (*lead, NUM_BETAS), "shape")
        pose_flat, packed_shape = pack([pose], "* d")
        shape_flat, _ = pack([shape], "* d")
        out = self.mano(betas=shape_flat, global_orient=pose_flat[:, :3], hand_pose=pose_flat[:, 3:])
        joints_native_tips = torch.cat([out.joints, out.vertices[:, self.tip_ids]], dim=1)
        joints = joints_native_tips[:, self.order_21]
        vertices = out.vertices
        if trans is not None:
            expect_shape(trans, (*lead, 3), "trans")
            trans_flat, _ = pack([trans], "* d")
            vertices = vertices + trans_flat[:, None]
            joints = joints + trans_flat[:, None]
        [vertices] = unpack(vertices, packed_shape, "* v c")
        [joints] = unpack(joints, packed_shape, "* j c")
        return ManoOutput(vertices=vertices, joints=joints)


# --------------------------------------------------------------------------------------------------------------
# CLI


def _info(path: str | None, side: str | None) -> str:
    resolved_side = side or (_side_from_name(Path(path)) if path else None) or "right"
    arrays = load_mano_arrays(path, resolved_side)
    v, f = arrays["v_template"], arrays["f"]
    edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    _, edge_count = np.unique(edges, axis=0, return_counts=True)
    joints = arrays["J_regressor"] @ v
    lines = [
        f"source: {resolve_mano_path(path, resolved_side) or 'procedural'} ({resolved_side} hand)",
        f"vertices: {len(v)}  faces: {len(f)}  edges: {len(edge_count)}  boundary edges: {(edge_count == 1).sum()}",
        f"joints: {arrays['J_regressor'].shape[0]} regressed + {len(FINGERTIP_VERTEX_IDS)} fingertips "
        f"(vertex ids {FINGERTIP_VERTEX_IDS})",
        f"betas: {arrays['shapedirs'].shape[-1]}  pose basis: {arrays['posedirs'].shape[-1]}  "
        f"pose PCA: {arrays['hands_components'].shape[0]}",
        f"template extent (m): {np.round(v.max(0) - v.min(0), 4).tolist()}  "
        f"wrist -> middle tip: {np.linalg.norm(v[FINGERTIP_VERTEX_IDS[2]] - joints[0]):.4f} m",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.mano", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="convert an official MANO .pkl to .npz (no chumpy needed)")
    convert.add_argument("src")
    convert.add_argument("dst")
    info = sub.add_parser("info", help="print counts of a MANO model (procedural if no PATH)")
    info.add_argument("path", nargs="?", default=None)
    info.add_argument("--side", choices=_SIDES, default=None, help="default: from the file name, else right")
    args = parser.parse_args(argv)
    if args.command == "convert":
        print(f"wrote {convert_mano_pkl_to_npz(args.src, args.dst)}")
    else:
        print(_info(args.path, args.side))
    return 0


if __name__ == "__main__":
    sys.exit(main())

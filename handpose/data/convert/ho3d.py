"""HO3D v3 -> the sequence format: right hands grasping objects, 640 x 480 frames, MANO relative to the flat hand.

Layout read (the dataset as distributed, and as its toolkit ``shreyashampali/ho3d`` reads it)::

    SRC/train.txt, SRC/evaluation.txt     one "<SEQ>/<frame id>" per line: the frames of each split, in order
    SRC/{train,evaluation}/<SEQ>/rgb/<id>.jpg      (v3; v2 has .png)
    SRC/{train,evaluation}/<SEQ>/meta/<id>.pkl     a dict per frame:
        camMat [3, 3]        intrinsics (pixels)
        handPose [48]        axis-angle, global orientation first, finger pose relative to the FLAT hand
                             (the toolkit builds MANO with flat_hand_mean=True), OpenGL camera axes
        handBeta [10], handTrans [3]   (metres, OpenGL axes: verts = MANO(pose, beta) + trans)
        handJoints3D [21, 3] metres, OpenGL axes (x right, y up, the hand at negative z), MANO's native 16 joints
                             then the fingertips (thumb, index, middle, ring, pinky: vertices 744, 333, 444, 555,
                             672 of the toolkit's MANO); in the evaluation split only the root (wrist) [3]
        handBoundingBox [4]  evaluation split: x0, y0, x1, y1 of the hand (pixels)
      A training frame whose hand annotation is missing has handPose None.

Conversion: OpenGL -> OpenCV is the rigid change ``R = diag(1, -1, -1)``: the global orientation becomes
``R @ R_g``, ``trans`` becomes ``R @ (J0 + t) - J0`` (MANO rotates about the rest-pose root joint ``J0``), joints
``R @ X`` reordered to ``common.mano.JOINT_NAMES_21``. One sequence per ``<SEQ>`` folder and split; timestamps are
``frame id / 30`` s (gaps in the ids are dropped frames). ``train`` -> our train split except the sequences named in
``--val-seqs`` (default: the last two in name order) -> val; ``evaluation`` -> test, with ``valid`` false on every
frame (no public hand pose: placeholders at the given root joint, the given box; ``handpose.evaluate --format ho3d``
writes the server's submission for it). ``ROOT/ho3d_evaluation.txt`` keeps the evaluation order. The joint check
allows a few millimetres at the fingertips, whose vertices differ from ``common.mano``'s (index: 333 vs 320).
"""

from __future__ import annotations

import argparse
import functools
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import torch

from common.data.pickles import read_pickle
from common.mano import ManoLayer
from common.mano_topology import NATIVE16_TIPS_TO_21
from handpose.data.convert import Job, check_joints, fill_from_nearest_valid, run_jobs, vertex_bbox
from handpose.data.dataset import rotate_camera
from handpose.data.format import RIGHT, write_sequence

log = logging.getLogger(__name__)

SETS = {"train": "train", "evaluation": "test"}  # HO3D split -> ours (val is carved out of train)
OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0])  # a rotation by pi about x: its own inverse
HO3D_TO_21 = np.asarray(NATIVE16_TIPS_TO_21)  # HO3D joints: MANO native 16 + tips, as common.mano builds them
FPS = 30.0
DEFAULT_TOLERANCE_MM = 12.0  # the toolkit's fingertip vertices (index 333 vs 320) differ from common.mano's
EVALUATION_ORDER_FILE = "ho3d_evaluation.txt"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--val-seqs", default=None,
                   help="comma-separated training sequences held out as val (default: the last two by name)")


def read_split_file(src: Path, set_name: str) -> dict[str, list[str]] | None:
    """``SRC/<set>.txt`` -> ``{SEQ: [frame ids in file order]}``, or None when the split is absent."""
    path = src / f"{set_name}.txt"
    if not path.is_file():
        if set_name == "train":
            raise FileNotFoundError(f"HO3D: {path} is missing (is --src the dataset's root?)")
        log.info("HO3D: no %s: the %s split is not converted", path, set_name)
        return None
    frames: dict[str, list[str]] = {}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.count("/") != 1:
            raise ValueError(f"HO3D: {path} line {line_no}: expected '<SEQ>/<frame id>', got {line!r}")
        seq, frame = line.split("/")
        frames.setdefault(seq, []).append(frame)
    return frames


def _frame_file(folder: Path, frame: str) -> Path:
    for suffix in (".jpg", ".png"):
        path = folder / "rgb" / f"{frame}{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(f"HO3D: no image {folder / 'rgb' / frame}.jpg (or .png)")


def write_ho3d_sequence(out: Path, *, src: str, set_name: str, seq: str, frames: list[str], name: str,
                        mano_model_path: str | None) -> Path:
    """One HO3D sequence folder (``SRC/<set>/<seq>``, ``frames`` in order) in the sequence format."""
    folder = Path(src) / set_name / seq
    metas = [read_pickle(folder / "meta" / f"{f}.pkl") for f in frames]
    n = len(frames)
    layer = ManoLayer(mano_model_path, side="right", flat_hand_mean=True)
    no_camera = [f for f, m in zip(frames, metas) if np.size(m.get("camMat")) != 9]
    if no_camera:
        raise ValueError(f"HO3D {set_name}/{seq}: meta of frames {no_camera[:5]} has no 3 x 3 camMat")
    K = np.stack([np.asarray(m["camMat"], np.float64).reshape(3, 3) for m in metas])
    focal, princpt = np.stack([K[:, 0, 0], K[:, 1, 1]], 1), K[:, :2, 2]
    image_paths = [_frame_file(folder, f) for f in frames]
    first = cv2.imread(str(image_paths[0]), cv2.IMREAD_UNCHANGED)
    if first is None:
        raise ValueError(f"HO3D: cannot read {image_paths[0]}")
    image_size = (first.shape[1], first.shape[0])

    def field(m: dict, key: str, size: int) -> np.ndarray:
        value = m.get(key)
        return np.full(size, np.nan) if value is None else np.asarray(value, np.float64).reshape(-1)[:size]

    pose = np.stack([field(m, "handPose", 48) for m in metas])
    beta = np.stack([field(m, "handBeta", 10) for m in metas])
    trans_gl = np.stack([field(m, "handTrans", 3) for m in metas])
    annotated = set_name == "train"
    valid = np.isfinite(pose).all(1) & np.isfinite(beta).all(1) & np.isfinite(trans_gl).all(1) & annotated
    if annotated:
        joints_gl = np.stack([np.asarray(m["handJoints3D"], np.float64).reshape(21, 3) if m.get("handJoints3D")
                              is not None and np.size(m["handJoints3D"]) == 63 else np.full((21, 3), np.nan)
                              for m in metas])
        valid &= np.isfinite(joints_gl).all((1, 2))
    pose, beta, trans_gl = (np.where(valid[:, None], x, 0.0) for x in (pose, beta, trans_gl))
    with torch.no_grad():
        rest = layer(torch.as_tensor(pose, dtype=torch.float32), torch.as_tensor(beta, dtype=torch.float32))
    root_rest = rest.joints[:, 0].double().numpy()  # the wrist is MANO's root joint J0 whatever the pose
    if annotated:
        pose_cv, trans_cv = rotate_camera(pose, trans_gl, root_rest, OPENGL_TO_OPENCV)
        joints_cam = (np.nan_to_num(joints_gl) @ OPENGL_TO_OPENCV.T)[:, HO3D_TO_21]
    else:  # evaluation: no hand pose; a flat hand at the given root joint, in the given box
        lacking = [f for f, m in zip(frames, metas) if np.size(m.get("handJoints3D")) < 3]
        if lacking:
            raise ValueError(f"HO3D {set_name}/{seq}: meta of frames {lacking[:5]} has no handJoints3D root joint")
        roots = np.stack([np.asarray(m["handJoints3D"], np.float64).reshape(-1)[:3] for m in metas]) @ OPENGL_TO_OPENCV.T
        pose_cv, trans_cv = np.zeros_like(pose), roots - root_rest
        joints_cam = rest.joints.double().numpy() + trans_cv[:, None]
    with torch.no_grad():
        verts = layer(torch.as_tensor(pose_cv, dtype=torch.float32), torch.as_tensor(beta, dtype=torch.float32),
                      torch.as_tensor(trans_cv, dtype=torch.float32)).vertices.double().numpy()
    bbox = vertex_bbox(verts, focal, princpt, image_size)
    if not annotated and all(m.get("handBoundingBox") is not None for m in metas):
        bbox = np.stack([np.asarray(m["handBoundingBox"], np.float64).reshape(4) for m in metas])
        bbox = bbox.clip(0, [image_size[0], image_size[1]] * 2)
    bbox_ok = (bbox[:, 2] > bbox[:, 0]) & (bbox[:, 3] > bbox[:, 1])
    valid &= bbox_ok
    arrays = {
        "timestamp": np.array([int(f) for f in frames], np.float64) / FPS,
        "mano_pose": pose_cv, "mano_shape": beta, "mano_trans": trans_cv, "joints_cam": joints_cam,
        "focal": focal, "princpt": princpt, "bbox": bbox, "hand_side": np.full(n, RIGHT, np.int8), "valid": valid,
    }
    if annotated:
        arrays = fill_from_nearest_valid(arrays, f"HO3D {set_name}/{seq}")
    elif not bbox_ok.all():
        raise ValueError(f"HO3D {set_name}/{seq}: frames {np.flatnonzero(~bbox_ok)[:5].tolist()} have an empty box")
    images = image_paths if all(p.suffix == ".jpg" for p in image_paths) else (
        cv2.imread(str(p), cv2.IMREAD_COLOR) for p in image_paths)
    write_sequence(out / name, images, arrays, fps=FPS, flat_hand_mean=True,
                   mano_model="official" if mano_model_path else "procedural", source="ho3d_v3",
                   extra={"set": set_name, "sequence": seq, "frame_ids": frames}, overwrite=True)
    return out / name


def convert(args: argparse.Namespace) -> dict:
    src, out = Path(args.src), Path(args.out)
    mano_path = None if args.procedural_mano else str(args.mano_model_path)
    jobs: list[Job] = []
    train = read_split_file(src, "train")
    val = ([s.strip() for s in args.val_seqs.split(",") if s.strip()] if args.val_seqs is not None
           else sorted(train)[-2:] if len(train) > 2 else [])
    unknown = sorted(set(val) - set(train))
    if unknown:
        raise ValueError(f"--val-seqs: {unknown} are not training sequences of {src / 'train.txt'}")
    for set_name, split in SETS.items():
        frames = train if set_name == "train" else read_split_file(src, set_name)
        for seq, ids in sorted((frames or {}).items()):
            name = f"ho3d_{set_name}_{seq}"
            run = functools.partial(write_ho3d_sequence, src=str(src), set_name=set_name, seq=seq, frames=ids,
                                    name=name, mano_model_path=mano_path)
            jobs.append(Job(name, "val" if seq in val and set_name == "train" else split, run))
    check = functools.partial(check_joints, mano_model_path=mano_path)
    report = run_jobs(jobs, out, args.workers, check, args.tolerance_mm, progress=not args.no_progress,
                      overwrite=getattr(args, "overwrite", False))
    if (src / "evaluation.txt").is_file():
        shutil.copyfile(src / "evaluation.txt", out / EVALUATION_ORDER_FILE)
    return report

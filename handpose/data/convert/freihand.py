"""FreiHAND (v2) -> the sequence format: single right hands, 224 x 224 crops, MANO relative to the mean pose.

Layout read (the dataset as distributed, and as its toolbox ``lmb-freiburg/freihand`` reads it)::

    SRC/training_K.json        [N][3][3] intrinsics (pixels), N = 32560 unique samples
    SRC/training_mano.json     [N][1][61]: pose 48 (axis-angle, global orientation first, finger pose relative
                               to MANO's mean hand: flat_hand_mean false), shape 10, uv_root 2, scale 1
    SRC/training_xyz.json      [N][21][3] joints in metres, camera space (OpenCV axes), FreiHAND's 21-joint order
                               (= common.mano.JOINT_NAMES_21)
    SRC/training/rgb/%08d.jpg  sample i in 4 versions: i + k N, k = 0 green screen, 1 hom, 2 sample, 3 auto
    SRC/evaluation_K.json, evaluation_mano.json, evaluation_xyz.json, evaluation/rgb/%08d.jpg  (3960 samples,
                               green screen only; converted when its annotations are present)

Translation: the toolbox poses MANO with zero translation, then moves it so that joint 9 (middle MCP) lands on
``xyz_root = [u - cx, v - cy, f] / scale`` with ``f = (fx + fy) / 2`` (``recover_root``); so
``mano_trans = xyz_root - J9(pose, shape)``. Every frame is independent: samples are grouped into sequences of
``--block`` frames for the file system's sake, marked ``independent_frames`` (the dataset refuses windows of
more than one frame over them). The fingertips of ``training_xyz`` are vertices 744, 320, 443, 555, 672 (smplx:
554 and 671 for ring and pinky), so the joint check allows a few millimetres there.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
from pathlib import Path

import numpy as np
import torch

from common.mano import JOINT_NAMES_21, ManoLayer
from handpose.data.convert import Job, check_joints, fill_from_nearest_valid, run_jobs, vertex_bbox
from handpose.data.format import RIGHT, write_sequence

log = logging.getLogger(__name__)

VERSIONS = ("gs", "hom", "sample", "auto")  # image id = sample id + k N in this order (fh_utils.sample_version)
ROOT_JOINT = JOINT_NAMES_21.index("middle_mcp")  # joint 9: where uv_root / scale put the hand
DEFAULT_TOLERANCE_MM = 8.0  # the ring / pinky tip vertices differ by a few mm from smplx's
IMAGE_SIZE = 224


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--block", type=int, default=500, help="independent samples per sequence folder")
    p.add_argument("--versions", default=",".join(VERSIONS), help="training image versions to convert")
    p.add_argument("--val-samples", type=int, default=1000,
                   help="the last this many training samples (all their versions) form the val split")


def load_split(src: Path, set_name: str) -> dict[str, np.ndarray] | None:
    """``{K [N, 3, 3], mano [N, 61], xyz [N, 21, 3]}`` of ``set_name``, or None when its files are absent."""
    paths = {k: src / f"{set_name}_{k}.json" for k in ("K", "mano", "xyz")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        if set_name == "training":
            raise FileNotFoundError(f"FreiHAND: missing {missing} (is --src the dataset's root?)")
        log.info("FreiHAND %s: no annotations (%s): not converted", set_name, ", ".join(missing))
        return None
    out = {}
    for key, path in paths.items():
        try:
            out[key] = np.asarray(json.loads(path.read_text()), np.float64)
        except (ValueError, OSError) as err:
            raise ValueError(f"FreiHAND: cannot read {path}: {err}") from None
    n = len(out["K"])
    out["mano"] = out["mano"].reshape(n, -1)
    expected = {"K": (n, 3, 3), "mano": (n, 61), "xyz": (n, 21, 3)}
    for key, shape in expected.items():
        if out[key].shape != shape:
            raise ValueError(f"FreiHAND: {paths[key]} has shape {out[key].shape}, expected {shape}")
    return out


def mano_arrays(ann: dict[str, np.ndarray], layer: ManoLayer) -> dict[str, np.ndarray]:
    """Per sample of ``ann`` (K, mano, xyz): pose, shape, trans (camera space, metres), joints, focal, princpt,
    bbox, valid."""
    mano = ann["mano"]
    pose, shape, uv_root, scale = mano[:, :48], mano[:, 48:58], mano[:, 58:60], mano[:, 60]
    K = ann["K"]
    focal = np.stack([K[:, 0, 0], K[:, 1, 1]], 1)
    princpt = K[:, :2, 2]
    f = focal.mean(1)
    xyz_root = np.concatenate([uv_root - princpt, f[:, None]], 1) / scale[:, None]  # recover_root
    with torch.no_grad():
        rest = layer(torch.as_tensor(pose, dtype=torch.float32), torch.as_tensor(shape, dtype=torch.float32))
    trans = xyz_root - rest.joints[:, ROOT_JOINT].double().numpy()
    bbox = vertex_bbox(rest.vertices.double().numpy() + trans[:, None], focal, princpt, (IMAGE_SIZE, IMAGE_SIZE))
    valid = np.isfinite(mano).all(1) & np.isfinite(ann["xyz"]).all((1, 2)) & (scale > 0)
    valid &= (bbox[:, 2] > bbox[:, 0]) & (bbox[:, 3] > bbox[:, 1])
    return {"mano_pose": pose, "mano_shape": shape, "mano_trans": trans, "joints_cam": ann["xyz"],
            "focal": focal, "princpt": princpt, "bbox": bbox, "valid": valid}


def write_block(out: Path, *, src: str, set_name: str, version_index: int, ids: list[int], num_samples: int,
                ann: dict[str, np.ndarray], name: str, mano_model_path: str | None) -> Path:
    """One sequence folder of independent samples ``ids`` of ``set_name`` in image version ``version_index``;
    ``ann``: their annotations (``load_split`` rows ``ids``)."""
    layer = ManoLayer(mano_model_path, side="right", flat_hand_mean=False)
    arrays = mano_arrays(ann, layer)
    n = len(ids)
    arrays.update(timestamp=np.arange(n, dtype=np.float64), hand_side=np.full(n, RIGHT, np.int8))
    arrays = fill_from_nearest_valid(arrays, f"FreiHAND {set_name} samples {ids[0]}..{ids[-1]}")
    rgb = Path(src) / set_name / "rgb"
    frames = [rgb / f"{i + version_index * num_samples:08d}.jpg" for i in ids]
    missing = [str(p) for p in frames if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"FreiHAND: missing images {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    write_sequence(out / name, frames, arrays, fps=1.0, flat_hand_mean=False,
                   mano_model="official" if mano_model_path else "procedural", source="freihand",
                   extra={"set": set_name, "version": VERSIONS[version_index], "sample_ids": [int(i) for i in ids],
                          "independent_frames": True}, overwrite=True)
    return out / name


def convert(args: argparse.Namespace) -> dict:
    src, out = Path(args.src), Path(args.out)
    mano_path = None if args.procedural_mano else str(args.mano_model_path)
    versions = [v.strip() for v in args.versions.split(",") if v.strip()]
    unknown = sorted(set(versions) - set(VERSIONS))
    if unknown:
        raise ValueError(f"--versions: unknown {unknown}; FreiHAND has {list(VERSIONS)}")
    jobs: list[Job] = []
    for set_name in ("training", "evaluation"):
        ann = load_split(src, set_name)
        if ann is None:
            continue
        n = len(ann["K"])
        first_val = n - args.val_samples if set_name == "training" else n
        for version in versions if set_name == "training" else ["gs"]:
            k = VERSIONS.index(version)
            if not (src / set_name / "rgb" / f"{k * n:08d}.jpg").is_file():
                log.info("FreiHAND %s: no %s images (%s): skipped", set_name, version, src / set_name / "rgb")
                continue
            for start in range(0, n, args.block):
                for lo, hi, split in ((start, min(start + args.block, n, max(first_val, start)), None),
                                      (max(start, first_val), min(start + args.block, n), "val")):
                    if hi <= lo:
                        continue
                    split = split or ("train" if set_name == "training" else "test")
                    name = f"freihand_{set_name}_{version}_{lo:05d}"
                    # the annotation files are read once, here; each job gets its own rows
                    rows = {key: value[lo:hi] for key, value in ann.items()}
                    run = functools.partial(write_block, src=str(src), set_name=set_name, version_index=k,
                                            ids=list(range(lo, hi)), num_samples=n, ann=rows, name=name,
                                            mano_model_path=mano_path)
                    jobs.append(Job(name, split, run))
    check = functools.partial(check_joints, mano_model_path=mano_path)
    return run_jobs(jobs, out, args.workers, check, args.tolerance_mm, progress=not args.no_progress,
                    overwrite=getattr(args, "overwrite", False))

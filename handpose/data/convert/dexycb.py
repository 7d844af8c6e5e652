"""DexYCB -> the sequence format: one right or left hand grasping YCB objects, 8 cameras, 640 x 480, 30 fps.

Layout read (the dataset as distributed, and as its toolkit ``NVlabs/dex-ycb-toolkit`` reads it)::

    SRC/<subject>/<sequence>/meta.yml       serials, num_frames, mano_sides [side], mano_calib [name], ycb_ids, ...
    SRC/<subject>/<sequence>/<serial>/color_%06d.jpg
    SRC/<subject>/<sequence>/<serial>/labels_%06d.npz
        pose_m   [1, 51]   global orientation (3, axis-angle), 45 PCA coefficients of the finger pose (manopth
                           ManoLayer(use_pca=True, ncomps=45, flat_hand_mean=False)), translation (3, metres);
                           camera space (OpenCV axes) of that serial
        joint_3d [1, 21, 3] metres, camera space, wrist then thumb .. little, 4 joints each (= common.mano's
                           JOINT_NAMES_21); all -1 when the frame has no hand
    SRC/calibration/mano_<calib>/mano.yml              betas [10] of the subject's hand
    SRC/calibration/intrinsics/<serial>_640x480.yml    color: {fx, fy, ppx, ppy}

Conversion: the finger pose is ``coefficients @ hands_components`` of that side's MANO model (relative to its
``hands_mean``: ``flat_hand_mean`` false), ``trans`` is the fit's translation (manopth adds it to every vertex, as
``common.mano`` does). Left hands were fitted with manopth's MANO_LEFT, which lacks the left-shapedirs fix
``common.mano`` applies (the format stores left hands for the fixed model): their betas are refitted to the fixed
model by least squares over the shape displacements of all vertices, and the translation is re-solved so that the
joints keep their mean position; the joint check measures what is left. One sequence per (sequence, camera);
timestamps ``frame / 30`` s. Splits follow the toolkit's setups (``--setup``: s0 seen subjects / views / objects,
the one HaMeR and WiLoR report; s1 unseen subjects; s2 unseen views; s3 unseen objects). The joint check allows a
few millimetres at the fingertips (manopth's tip vertices 745, 317, 444, 556, 673 against 744, 320, 443, 554, 671).
"""

from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path

import numpy as np
import torch
import yaml

from common.mano import ManoLayer, load_mano_arrays
from handpose.data.convert import Job, check_joints, fill_from_nearest_valid, run_jobs, vertex_bbox
from handpose.data.format import LEFT, RIGHT, write_sequence

log = logging.getLogger(__name__)

# The toolkit's subject and camera lists: the setups below select from them by position.
SUBJECTS = ("20200709-subject-01", "20200813-subject-02", "20200820-subject-03", "20200903-subject-04",
            "20200908-subject-05", "20200918-subject-06", "20200928-subject-07", "20201002-subject-08",
            "20201015-subject-09", "20201022-subject-10")
SERIALS = ("836212060125", "839512060362", "840412060917", "841412060263", "932122060857", "932122060861",
           "932122061900", "932122062010")
SETUPS = ("s0", "s1", "s2", "s3")
FPS = 30.0
DEFAULT_TOLERANCE_MM = 12.0
IMAGE_SIZE = (640, 480)


def split_of(setup: str, subject: int, serial: int, sequence: int) -> str | None:
    """Which split (train / val / test) the toolkit's ``setup`` puts (subject, serial, sequence index) in; None when
    the setup uses it nowhere (s0: a held-out sequence of subjects 3-10 is test, of subjects 1-2 val)."""
    if setup == "s0":
        if sequence % 5 != 4:
            return "train"
        return "val" if subject in (0, 1) else "test"
    if setup == "s1":
        return "val" if subject == 6 else "test" if subject in (7, 8) else "train"
    if setup == "s2":
        return "val" if serial == 6 else "test" if serial == 7 else "train"
    if setup == "s3":
        group = sequence // 5
        return "val" if group in (3, 19) else "test" if group in (7, 11, 15) else "train"
    raise ValueError(f"--setup {setup!r}: one of {SETUPS}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--setup", default="s0", choices=SETUPS, help="the toolkit's split setup (default s0)")


def _yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"DexYCB: {path} is missing") from None
    except yaml.YAMLError as err:
        raise ValueError(f"DexYCB: {path}: not valid YAML ({err})") from None


def refit_left_betas(betas: np.ndarray, mano_model_path: str | None) -> np.ndarray:
    """Betas ``[10]`` of manopth's MANO_LEFT (no shapedirs fix) -> the betas of the fixed left model whose shape
    displacement of every vertex is closest (least squares)."""
    unfixed = load_mano_arrays(mano_model_path, "left", fix_left_shapedirs=False)["shapedirs"].reshape(-1, 10)
    fixed = load_mano_arrays(mano_model_path, "left", fix_left_shapedirs=True)["shapedirs"].reshape(-1, 10)
    return np.linalg.lstsq(fixed.astype(np.float64), unfixed.astype(np.float64) @ betas, rcond=None)[0]


def read_labels(folder: Path, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """``pose_m [n, 51]`` and ``joint_3d [n, 21, 3]`` of one camera's frames (NaN where the file has no hand)."""
    pose_m, joints = np.full((num_frames, 51), np.nan), np.full((num_frames, 21, 3), np.nan)
    for f in range(num_frames):
        path = folder / f"labels_{f:06d}.npz"
        try:
            with np.load(path) as label:
                p, j = np.asarray(label["pose_m"], np.float64), np.asarray(label["joint_3d"], np.float64)
        except FileNotFoundError:
            raise FileNotFoundError(f"DexYCB: {path} is missing") from None
        except Exception as err:  # noqa: BLE001 - zip / npz errors of a truncated file
            raise ValueError(f"DexYCB: {path}: unreadable ({type(err).__name__}: {err})") from None
        if p.size != 51 or j.size != 63:
            raise ValueError(f"DexYCB: {path}: pose_m has {p.size} values (51 expected), joint_3d {j.size} (63)")
        if not np.all(j == -1):
            pose_m[f], joints[f] = p.reshape(51), j.reshape(21, 3)
    return pose_m, joints


def write_dexycb_sequence(out: Path, *, src: str, subject: str, sequence: str, serial: str, name: str,
                          mano_model_path: str | None) -> Path:
    """One (sequence, camera) of DexYCB in the sequence format."""
    root = Path(src)
    meta = _yaml(root / subject / sequence / "meta.yml")
    side = str(meta["mano_sides"][0])
    if side not in ("right", "left"):
        raise ValueError(f"DexYCB: {root / subject / sequence / 'meta.yml'}: mano_sides {meta['mano_sides']}")
    calib = root / "calibration" / f"mano_{meta['mano_calib'][0]}" / "mano.yml"
    betas = np.asarray(_yaml(calib)["betas"], np.float64).reshape(10)
    intr = _yaml(root / "calibration" / "intrinsics" / f"{serial}_{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}.yml")["color"]
    n = int(meta["num_frames"])
    folder = root / subject / sequence / serial
    pose_m, joint_3d = read_labels(folder, n)
    valid = np.isfinite(pose_m).all(1) & np.isfinite(joint_3d).all((1, 2))
    pose_m, joint_3d = np.nan_to_num(pose_m), np.nan_to_num(joint_3d)
    components = load_mano_arrays(mano_model_path, side)["hands_components"].astype(np.float64)
    pose = np.concatenate([pose_m[:, :3], pose_m[:, 3:48] @ components], 1)  # relative to hands_mean
    trans = pose_m[:, 48:51]
    if side == "left":
        betas = refit_left_betas(betas, mano_model_path)
    shape = np.tile(betas, (n, 1))
    layer = ManoLayer(mano_model_path, side=side, flat_hand_mean=False)
    with torch.no_grad():
        fit = layer(torch.as_tensor(pose, dtype=torch.float32), torch.as_tensor(shape, dtype=torch.float32),
                    torch.as_tensor(trans, dtype=torch.float32))
    if side == "left":  # the refitted shape moves the joints a little: keep their mean where the dataset has it
        trans = trans + (joint_3d - fit.joints.double().numpy()).mean(1) * valid[:, None]
    focal = np.tile([float(intr["fx"]), float(intr["fy"])], (n, 1))
    princpt = np.tile([float(intr["ppx"]), float(intr["ppy"])], (n, 1))
    verts = fit.vertices.double().numpy() + (trans - pose_m[:, 48:51])[:, None]
    bbox = vertex_bbox(verts, focal, princpt, IMAGE_SIZE)
    valid &= (bbox[:, 2] > bbox[:, 0]) & (bbox[:, 3] > bbox[:, 1]) & (joint_3d[..., 2] > 0).all(1)
    arrays = {
        "timestamp": np.arange(n, dtype=np.float64) / FPS, "mano_pose": pose, "mano_shape": shape,
        "mano_trans": trans, "joints_cam": joint_3d, "focal": focal, "princpt": princpt, "bbox": bbox,
        "hand_side": np.full(n, LEFT if side == "left" else RIGHT, np.int8), "valid": valid,
    }
    arrays = fill_from_nearest_valid(arrays, f"DexYCB {subject}/{sequence}/{serial}")
    frames = [folder / f"color_{f:06d}.jpg" for f in range(n)]
    missing = [str(p) for p in frames if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"DexYCB: missing images {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    write_sequence(out / name, frames, arrays, fps=FPS, flat_hand_mean=False,
                   mano_model="official" if mano_model_path else "procedural", source="dexycb",
                   extra={"subject": subject, "sequence": sequence, "serial": serial, "side": side,
                          "ycb_ids": meta.get("ycb_ids"), "left_betas_refitted": side == "left"}, overwrite=True)
    return out / name


def convert(args: argparse.Namespace) -> dict:
    src, out = Path(args.src), Path(args.out)
    mano_path = None if args.procedural_mano else str(args.mano_model_path)
    present = [s for s in SUBJECTS if (src / s).is_dir()]
    if not present:
        raise FileNotFoundError(f"DexYCB: none of the subject folders {SUBJECTS[0]} .. {SUBJECTS[-1]} in {src} "
                                "(is --src the dataset's root, DEX_YCB_DIR?)")
    jobs: list[Job] = []
    for subject in present:
        s = SUBJECTS.index(subject)
        sequences = sorted(p.name for p in (src / subject).iterdir() if (p / "meta.yml").is_file())
        if len(sequences) != 100:
            log.info("DexYCB %s: %d sequences (the release has 100): the setup's split rules apply to their "
                     "positions", subject, len(sequences))
        for q, sequence in enumerate(sequences):
            for c, serial in enumerate(SERIALS):
                if not (src / subject / sequence / serial).is_dir():
                    continue
                split = split_of(args.setup, s, c, q)
                if split is None:
                    continue
                name = f"dexycb_{subject}_{sequence}_{serial}"
                run = functools.partial(write_dexycb_sequence, src=str(src), subject=subject, sequence=sequence,
                                        serial=serial, name=name, mano_model_path=mano_path)
                jobs.append(Job(name, split, run))

    check = functools.partial(check_joints, mano_model_path=mano_path)
    return run_jobs(jobs, out, args.workers, check, args.tolerance_mm, progress=not args.no_progress,
                    overwrite=getattr(args, "overwrite", False))

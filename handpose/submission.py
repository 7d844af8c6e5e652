"""Benchmark submission files from a trained checkpoint: the ``pred.json`` (and the ``pred.zip`` holding it) that the
FreiHAND and HO3D evaluation servers read, written by ``handpose.evaluate --format {freihand,ho3d} --out pred.json``.

Both files are ``[xyz_list, verts_list]``: for every frame of the benchmark's evaluation split, in the benchmark's
order, 21 joints ``[21, 3]`` and the 778 MANO vertices ``[778, 3]`` in metres, in the camera frame of the image.

- FreiHAND: order of the sample ids (``evaluation_*.json``), FreiHAND's joint order (= ``JOINT_NAMES_21``), OpenCV
  axes (the converted ``evaluation`` split, green-screen images).
- HO3D: order of ``evaluation.txt`` (kept as ``ROOT/ho3d_evaluation.txt`` by the converter), HO3D's joint order
  (MANO's native 16, then the fingertips), OpenGL axes (x right, y up, the hand at negative z), as its README asks.

Every frame gets a prediction: a Stage 2 model sees the frames up to it (fewer than ``num_frame`` at the start of a
sequence, as the streaming tracker does). Left hands are mirrored back to the image's frame.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from common.data.collate import CheckedCollate
from common.mano_topology import NATIVE16_TIPS_TO_21
from handpose.data.dataset import HandWindowDataset, sample_spec
from handpose.data.format import LEFT

log = logging.getLogger(__name__)

FORMATS = ("freihand", "ho3d")
OURS_TO_HO3D = np.argsort(NATIVE16_TIPS_TO_21)  # joints_21[OURS_TO_HO3D] = HO3D's order
OPENCV_TO_OPENGL = np.array([1.0, -1.0, -1.0])
HO3D_ORDER_FILE = "ho3d_evaluation.txt"


def predict_every_frame(lit, datamodule, split: str, batch_size: int = 16, num_workers: int = 0,
                        ) -> tuple[dict[tuple[int, int], tuple[np.ndarray, np.ndarray]], list]:
    """``{(sequence index, frame): (joints [21, 3], vertices [778, 3])}`` for every frame of ``split``, metres, in
    the image's camera frame, and the split's sequences (indexed as in the keys). A frame is predicted from the window ending at it; near a sequence's start the window
    is as long as there are frames (1 .. num_frame - 1)."""
    num_frame = int(datamodule.num_frame)
    out: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    lit.eval()
    for t in range(1, num_frame + 1):
        # windows of t frames end at frame t - 1 (t < num_frame) or at every frame from num_frame - 1 on
        ds = _dataset(datamodule, split, t, lambda s, t=t: (np.arange(len(s)) == t - 1) if t < num_frame
                      else (np.arange(len(s)) >= t - 1))
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            collate_fn=CheckedCollate(sample_spec(t, ds.img_size)))
        for batch in loader:
            joints, verts = lit.predict_camera({k: v.to(lit.device) if torch.is_tensor(v) else v
                                                for k, v in batch.items()})
            left = (batch["hand_side"][:, -1] == LEFT).numpy()
            mirror = np.where(left[:, None, None], np.array([-1.0, 1.0, 1.0]), 1.0)
            joints, verts = joints.cpu().double().numpy() * mirror, verts.cpu().double().numpy() * mirror
            for i, (s, f) in enumerate(zip(batch["seq_index"][:, -1].tolist(), batch["frame_index"][:, -1].tolist())):
                out[(s, f)] = (joints[i], verts[i])
    missing = [(s, f) for s, seq in enumerate(ds.sequences) for f in range(len(seq)) if (s, f) not in out]
    if missing:
        raise RuntimeError(f"{len(missing)} frames of {split!r} got no prediction, e.g. (sequence, frame) {missing[:3]}")
    return out, ds.sequences


def _dataset(datamodule, split: str, num_frame: int, ends) -> HandWindowDataset:
    return HandWindowDataset(datamodule.root, split, num_frame=num_frame, img_size=datamodule.img_size, stride=1,
                             bbox_scale=datamodule.bbox_scale, augment=None, flat_hand_mean=datamodule.flat_hand_mean,
                             mano_model_path=datamodule.mano_model_path, window_ends=ends)


def freihand_order(sequences) -> list[tuple[int, int]]:
    """(sequence index, frame) of FreiHAND's evaluation samples in sample-id order (green-screen images)."""
    by_id = {}
    for s, seq in enumerate(sequences):
        if seq.source != "freihand" or seq.extra.get("set") != "evaluation":
            continue
        for f, sample_id in enumerate(seq.extra["sample_ids"]):
            by_id[int(sample_id)] = (s, f)
    if not by_id:
        raise ValueError("--format freihand: the split holds no FreiHAND evaluation samples (convert the dataset with "
                         "its evaluation_*.json, and evaluate --split test)")
    missing = sorted(set(range(max(by_id) + 1)) - set(by_id))
    if missing:
        raise ValueError(f"--format freihand: evaluation sample ids {missing[:5]} ... are missing from the split")
    return [by_id[i] for i in range(len(by_id))]


def ho3d_order(sequences, root: Path) -> list[tuple[int, int]]:
    """(sequence index, frame) of HO3D's evaluation frames in the order of ``evaluation.txt``."""
    where = {}
    for s, seq in enumerate(sequences):
        if seq.source != "ho3d_v3" or seq.extra.get("set") != "evaluation":
            continue
        for f, frame_id in enumerate(seq.extra["frame_ids"]):
            where[f"{seq.extra['sequence']}/{frame_id}"] = (s, f)
    order_file = Path(root) / HO3D_ORDER_FILE
    if not order_file.is_file():
        raise FileNotFoundError(f"--format ho3d: {order_file} is missing (the converter copies evaluation.txt there)")
    names = [line.strip() for line in order_file.read_text().splitlines() if line.strip()]
    missing = [n for n in names if n not in where]
    if missing:
        raise ValueError(f"--format ho3d: {len(missing)} frames of {order_file.name} are not in the split, e.g. "
                         f"{missing[:3]}")
    return [where[n] for n in names]


def to_benchmark(fmt: str, joints: np.ndarray, verts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One frame's joints [21, 3] / vertices [778, 3] (our order, OpenCV axes) -> the benchmark's order and axes."""
    if fmt == "freihand":
        return joints, verts
    if fmt == "ho3d":
        return joints[OURS_TO_HO3D] * OPENCV_TO_OPENGL, verts * OPENCV_TO_OPENGL
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def write_submission(fmt: str, predictions, order: list[tuple[int, int]], out: str | Path) -> Path:
    """``pred.json`` ``[xyz_list, verts_list]`` in ``order`` and ``pred.zip`` beside it (what the server takes)."""
    xyz, verts = [], []
    for key in order:
        j, v = to_benchmark(fmt, *predictions[key])
        xyz.append(np.round(j, 6).tolist())
        verts.append(np.round(v, 6).tolist())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([xyz, verts]))
    with zipfile.ZipFile(out.with_suffix(".zip"), "w", zipfile.ZIP_DEFLATED) as z:
        z.write(out, arcname="pred.json")
    log.info("wrote %d %s predictions to %s and %s", len(order), fmt, out, out.with_suffix(".zip"))
    return out


def submission(ckpt: str | Path, fmt: str, out: str | Path, split: str = "test", data_root: str | Path | None = None,
               config: str | Path | None = None, batch_size: int = 16, num_workers: int = 0) -> Path:
    """Predict every frame of ``split`` with ``ckpt`` and write ``fmt``'s submission file ``out``."""
    from handpose.runs import build_datamodule, load_checkpoint

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    lit, cfg = load_checkpoint(ckpt, config)
    datamodule = build_datamodule(cfg, lit, {"root": str(data_root) if data_root else None})
    predictions, sequences = predict_every_frame(lit, datamodule, split, batch_size, num_workers)
    order = freihand_order(sequences) if fmt == "freihand" else ho3d_order(sequences, datamodule.root)
    return write_submission(fmt, predictions, order, out)

"""Converters from real hand datasets to the sequence format of ``handpose.data.format``.

``python -m handpose.data.convert {freihand,ho3d,dexycb} --src RAW_ROOT --out ROOT [--mano-model-path DIR] [--workers N]``
(``make data-freihand SRC=...``, ``data-ho3d``, ``data-dexycb``). Every converter

- writes one folder per sequence through ``write_sequence`` (atomic: a folder exists only when complete), so a
  re-run skips the sequences already written (resumable) and ``splits.json`` is written last;
- runs the sequences in parallel worker processes with a progress bar;
- checks itself: for every converted frame with a hand pose, ``common.mano.ManoLayer`` on (pose, shape, trans)
  must reproduce the dataset's own 3D joints within ``--tolerance-mm``; sequences that fail are reported with
  their worst frames (a wrong axis or pose convention shows up here, not in training), and the run exits
  non-zero.

Dataset specifics live in one module each (``freihand``, ``ho3d``, ``dexycb``). No converter downloads anything.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.geometry import project
from common.mano import ManoLayer
from handpose.data.format import LEFT, META_FILE, RIGHT, read_sequence, write_splits

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- shared helpers
# Frame fields a converter fills with the nearest valid frame's values where a frame has no usable annotation
# (the format wants usable values everywhere; `valid` false keeps them out of the loss).
FILLED_FIELDS = ("mano_pose", "mano_shape", "mano_trans", "joints_cam", "focal", "princpt", "bbox")


def fill_from_nearest_valid(arrays: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """New arrays where every invalid frame holds the nearest valid frame's ``FILLED_FIELDS``; an error naming
    ``where`` when no frame is valid."""
    valid = arrays["valid"]
    if valid.all():
        return dict(arrays)
    good = np.flatnonzero(valid)
    if not len(good):
        raise ValueError(f"{where}: no frame has a usable annotation")
    n = len(valid)
    nearest = good[np.abs(np.arange(n)[:, None] - good[None]).argmin(1)]
    return {k: (v[nearest] if k in FILLED_FIELDS else v) for k, v in arrays.items()}


def vertex_bbox(vertices: np.ndarray, focal: np.ndarray, princpt: np.ndarray, image_size: tuple[int, int]
                ) -> np.ndarray:
    """Tight box ``[n, 4]`` (x0, y0, x1, y1) of camera-space vertices ``[n, V, 3]`` projected with per-frame
    ``focal`` / ``princpt`` ``[n, 2]``, clipped to the image ``(W, H)``."""
    uv = project(vertices, focal[:, None], princpt[:, None])
    w, h = image_size
    return np.concatenate([uv.min(1), uv.max(1)], 1).clip(0, [w, h, w, h])


@dataclass
class SequenceCheck:
    """Joint-reproduction check of one converted sequence: ManoLayer(pose, shape, trans) against joints_cam."""

    name: str
    frames: int
    checked: int  # valid frames (with a hand pose)
    mean_mm: float
    max_mm: float
    worst: list[tuple[int, float]] = field(default_factory=list)  # (frame, max joint error mm), worst first

    def ok(self, tolerance_mm: float) -> bool:
        return self.checked == 0 or self.max_mm <= tolerance_mm


def check_joints(folder: Path, mano_model_path: str | Path | None) -> SequenceCheck:
    """Re-run MANO on a written sequence's (pose, shape, trans) and compare with its ``joints_cam``, each frame with
    the MANO model of its ``hand_side`` and the pose convention the sequence declares (``flat_hand_mean``)."""
    seq = read_sequence(folder)
    valid = np.flatnonzero(seq["valid"])
    if not len(valid):
        return SequenceCheck(seq.name, len(seq), 0, float("nan"), float("nan"))
    joints = np.empty((len(valid), 21, 3), np.float32)
    for code, side in ((RIGHT, "right"), (LEFT, "left")):
        rows = seq["hand_side"][valid] == code
        if not rows.any():
            continue
        layer = ManoLayer(mano_model_path, side=side, flat_hand_mean=seq.flat_hand_mean)
        with torch.no_grad():
            joints[rows] = layer(*(torch.as_tensor(seq[k][valid[rows]])
                                   for k in ("mano_pose", "mano_shape", "mano_trans"))).joints.numpy()
    err = 1000 * np.linalg.norm(joints - seq["joints_cam"][valid], axis=-1).max(axis=-1)  # [n] mm
    order = np.argsort(-err)[:5]
    return SequenceCheck(seq.name, len(seq), len(valid), float(err.mean()), float(err.max()),
                         [(int(valid[i]), float(err[i])) for i in order])


@dataclass
class Job:
    """One sequence to write: ``run(out_dir) -> folder`` (in a worker process) and its split."""

    name: str
    split: str
    run: Callable[[Path], Path]


def run_jobs(jobs: Sequence[Job], out: Path, workers: int, check: Callable[[Path], SequenceCheck],
             tolerance_mm: float, progress: bool = True, overwrite: bool = False) -> dict:
    """Write every job's sequence (skipping finished ones unless ``overwrite``), check each, write ``splits.json``
    -> report dict."""
    from rich.progress import Progress

    out.mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if overwrite or not (out / j.name / META_FILE).is_file()]
    skipped = len(jobs) - len(todo)
    if skipped:
        log.info("%d of %d sequences already converted in %s: skipped", skipped, len(jobs), out)
    checks: list[SequenceCheck] = []
    with Progress(disable=not progress) as bar:
        task = bar.add_task(f"converting into {out}", total=len(jobs), completed=skipped)
        if workers <= 1:
            for job in todo:
                checks.append(check(job.run(out)))
                bar.advance(task)
        else:
            with ProcessPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                futures = {pool.submit(_run_and_check, job.run, check, out): job for job in todo}
                for future in as_completed(futures):
                    checks.append(future.result())
                    bar.advance(task)
    splits: dict[str, list[str]] = {}
    for job in jobs:
        splits.setdefault(job.split, []).append(job.name)
    write_splits(out, splits)
    failed = [c for c in checks if not c.ok(tolerance_mm)]
    errors = [c.max_mm for c in checks if c.checked]
    report = {
        "sequences": len(jobs), "converted": len(todo), "skipped_existing": skipped,
        "frames_checked": sum(c.checked for c in checks),
        "joint_error_mm": {"mean": float(np.mean([c.mean_mm for c in checks if c.checked])) if errors else None,
                           "max": float(max(errors)) if errors else None, "tolerance": tolerance_mm},
        "failed": [{"sequence": c.name, "max_mm": c.max_mm, "worst_frames": c.worst} for c in failed],
        "splits": {k: len(v) for k, v in splits.items()},
    }
    (out / "conversion_report.json").write_text(json.dumps(report, indent=1))
    for c in failed:
        log.error("%s: MANO(pose, shape, trans) misses joints_cam by up to %.1f mm (tolerance %.1f); worst frames "
                  "(frame, mm): %s", c.name, c.max_mm, tolerance_mm, [(f, round(e, 1)) for f, e in c.worst])
    return report


def _run_and_check(run: Callable[[Path], Path], check: Callable[[Path], SequenceCheck], out: Path) -> SequenceCheck:
    return check(run(out))


def main(argv: list[str] | None = None) -> int:
    import argparse

    from handpose.data.convert import dexycb, freihand, ho3d

    converters = {"freihand": freihand, "ho3d": ho3d, "dexycb": dexycb}
    p = argparse.ArgumentParser(prog="python -m handpose.data.convert", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="dataset", required=True)
    for name, module in converters.items():
        q = sub.add_parser(name, help=module.__doc__.splitlines()[0])
        q.add_argument("--src", required=True, type=Path, help="the dataset's root as distributed")
        q.add_argument("--out", required=True, type=Path, help="where the sequence format is written")
        q.add_argument("--mano-model-path", default=None,
                       help="folder with MANO_RIGHT/LEFT (.pkl or .npz); required for real data")
        q.add_argument("--procedural-mano", action="store_true",
                       help="use the procedural MANO stand-in (only for fixtures made with it)")
        q.add_argument("--workers", type=int, default=2)
        q.add_argument("--tolerance-mm", type=float, default=module.DEFAULT_TOLERANCE_MM)
        q.add_argument("--overwrite", action="store_true",
                       help="convert every sequence again (default: finished ones are kept; a re-run resumes)")
        q.add_argument("--no-progress", action="store_true")
        module.add_arguments(q)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.mano_model_path is None and not args.procedural_mano:
        p.error("--mano-model-path is required (the dataset's MANO parameters only reproduce its joints with the "
                "official MANO model); --procedural-mano for fixtures made with the procedural hand")
    module = converters[args.dataset]
    report = module.convert(args)
    print(json.dumps({k: v for k, v in report.items() if k != "failed"}, indent=1))
    if report["failed"]:
        print(f"{len(report['failed'])} sequence(s) failed the joint check: see {args.out}/conversion_report.json")
        return 1
    return 0

"""Tracker demo: run :class:`handpose.tracker.HandTracker` over one stored sequence and write an overlay video.

``python -m handpose.demo --ckpt outputs/stage2/stage2/checkpoints/last.ckpt [--sequence DIR] --out demo.mp4``
(default sequence: the first test sequence of the run's data root). The annotated bbox stands in for a hand
detector. Predicted joints are drawn in green, ground truth (when annotated as valid) in red.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import cv2
import numpy as np

from common.geometry import project
from common.mano import JOINT_NAMES_21
from common.video import write_video
from handpose.data.dataset import read_frame
from handpose.data.format import LEFT, HandSequence, read_sequence, read_splits
from handpose.lit import GT_COLOR, PRED_COLOR, draw_skeleton
from handpose.tracker import HandTracker

log = logging.getLogger(__name__)

MIN_VIDEO_SIZE = 480  # frames are upscaled to at least this many pixels
BOX_COLOR, TEXT_COLOR = (200, 200, 200), (255, 255, 255)  # RGB
WRIST = JOINT_NAMES_21.index("wrist")


def overlay(frame_bgr: np.ndarray, pred_2d: np.ndarray | None, gt_2d: np.ndarray | None, bbox: np.ndarray,
            lines: list[str]) -> np.ndarray:
    """frame [H, W, 3] BGR uint8 + joints [21, 2] (original pixels) -> upscaled RGB overlay [H', W', 3] uint8."""
    zoom = max(1, math.ceil(MIN_VIDEO_SIZE / min(frame_bgr.shape[:2])))
    canvas = cv2.resize(cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB), None, fx=zoom, fy=zoom,
                        interpolation=cv2.INTER_LINEAR)
    x0, y0, x1, y1 = (np.asarray(bbox, np.float64) * zoom).round().astype(int)
    cv2.rectangle(canvas, (x0, y0), (x1, y1), BOX_COLOR, 1, cv2.LINE_AA)
    if gt_2d is not None:
        draw_skeleton(canvas, gt_2d, GT_COLOR, zoom)
    if pred_2d is not None:
        draw_skeleton(canvas, pred_2d, PRED_COLOR, zoom)
    for i, text in enumerate(lines):
        cv2.putText(canvas, text, (8, 20 + 20 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.5, TEXT_COLOR, 1, cv2.LINE_AA)
    return canvas


def run_sequence(tracker: HandTracker, seq: HandSequence, max_frames: int | None = None) -> tuple[list, dict]:
    """Track every readable frame of ``seq`` -> (RGB overlay frames, summary). Unreadable frames are skipped,
    counted and logged; the tracker then continues over the gap (timestamps stay true)."""
    tracker.reset()
    frames, errors, latencies, skipped = [], [], [], 0
    n = len(seq) if max_frames is None else min(len(seq), max_frames)
    for f in range(n):
        img = read_frame(seq.frame_path(f), seq.image_size)  # BGR
        if img is None:
            skipped += 1
            log.warning("sequence %s: frame %d unreadable, skipped (%d so far)", seq.folder, f, skipped)
            continue
        side = "left" if int(seq["hand_side"][f]) == LEFT else "right"
        t0 = time.perf_counter()
        res = tracker.update(img, seq["bbox"][f], seq["focal"][f], seq["princpt"][f], seq["timestamp"][f], side)
        latencies.append(time.perf_counter() - t0)
        lines = [f"frame {f}  t={seq['timestamp'][f]:.3f}s  {side} hand  window {res.window}"]
        gt_2d = None
        if seq["valid"][f]:
            gt = seq["joints_cam"][f]
            gt_2d = project(gt, seq["focal"][f], seq["princpt"][f])
            err = np.linalg.norm((res.joints_cam - res.joints_cam[WRIST]) - (gt - gt[WRIST]), axis=-1).mean()
            errors.append(float(err))
            root = np.linalg.norm(res.joints_cam[WRIST] - gt[WRIST])
            lines.append(f"MPJPE {1000 * err:.1f} mm  root {1000 * root:.1f} mm")
        else:
            lines.append("no valid GT")
        lines.append("green: prediction  red: GT")
        frames.append(overlay(img, res.joints_2d, gt_2d, seq["bbox"][f], lines))
    summary = {
        "frames": len(frames), "skipped": skipped,
        "mpjpe_mm": 1000 * float(np.mean(errors)) if errors else float("nan"),
        "latency_ms": 1000 * float(np.median(latencies[1:] if len(latencies) > 1 else latencies)),
    }
    return frames, summary


def default_sequence(data_root: Path) -> Path:
    splits = read_splits(data_root)
    for split in ("test", "val", "train"):
        if splits.get(split):
            return data_root / splits[split][0]
    raise ValueError(f"{data_root}/splits.json lists no sequence")


def main(argv: list[str] | None = None) -> Path:
    from handpose.runs import load_checkpoint

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, type=Path)
    p.add_argument("--sequence", type=Path, default=None, help="sequence folder (default: first test sequence)")
    p.add_argument("--data-root", type=Path, default=None, help="default: the run's data.root")
    p.add_argument("--num-frame", type=int, default=None, help="tracker window (default: the run's)")
    p.add_argument("--config", type=Path, default=None, help="run config (default: <run>/config.yaml)")
    p.add_argument("--out", type=Path, default=Path("demo.mp4"))
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--fps", type=float, default=None, help="video frame rate (default: the sequence's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    lit, cfg = load_checkpoint(args.ckpt, args.config)
    num_frame = args.num_frame or int(cfg.data.num_frame)
    tracker = HandTracker.from_lit(lit, num_frame, bbox_scale=float(cfg.data.bbox_scale), channel_order="bgr")
    folder = args.sequence or default_sequence(args.data_root or Path(cfg.data.root))
    seq = read_sequence(folder)
    frames, summary = run_sequence(tracker, seq, args.max_frames)
    path = write_video(frames, args.out, args.fps or seq.fps)
    print(f"{seq.name}: {summary['frames']} frames ({summary['skipped']} skipped), root-relative MPJPE "
          f"{summary['mpjpe_mm']:.1f} mm, tracker {summary['latency_ms']:.1f} ms/frame (median) -> {path}")
    return path


if __name__ == "__main__":
    main()

"""How much a temporal Stage 2 could gain over a Stage 1 checkpoint: oracles on its per-frame tokens.

``python -m handpose.headroom --ckpt outputs/stage1/stage1/checkpoints/last.ckpt [--split val] [--num-frame 7]``
(``make headroom-hand``). Stage 2 refines the last frame of a window from Stage 1's tokens of that window; whatever
it does, it cannot do better than combinations of those tokens allow. On the windows ``handpose.evaluate`` scores
(every window end with ``num_frame`` frames of history), each row decodes a different token through Stage 1's
own heads and reports PA-MPJPE and root-relative MPJPE:

- the last frame's own token (Stage 1 as evaluated);
- causal means of the last 3 and of all ``num_frame`` tokens, and the value at the last frame of a least-squares
  line through the window's tokens against time (a smoother that does not lag behind linear motion);
- the centred mean of ``num_frame`` tokens around the frame (it looks ahead, clipped at the sequence's ends): what
  smoothing could give with perfect motion compensation;
- on windows whose last frame is occluded, that frame's token replaced by the most recent unoccluded frame's in the
  window (an oracle that knows which frames are occluded); windows occluded throughout keep their own;
- for a network whose joint MLP reads the heatmap head's 2D joints: the last frame's token with that MLP reading the
  annotated 2D joints instead (the image features pooled under the predicted heatmaps unchanged), and the heatmap
  head's own 2D error on those frames (crop pixels; mean over the 21 joints and over the 5 fingertips): how much of
  Stage 1's error comes from where it places the joints in the image, and how much from reading the hand from them.

And from the annotations alone, the floor of the root (depth) error for a single view: each sequence's hand size
``s`` (the sum of its 20 bone lengths) is unknown to an image up to scale, so an estimator exact in everything but
the size predicts the depth of a hand of the split's median size ``s~``: error ``z |1 - s~ / s|``.

If the centred mean barely beats the last frame's token, Stage 1's errors persist over the window (they come from
what the frame looks like, not from per-frame noise) and no temporal refinement of these tokens can remove them.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from common.data.collate import CheckedCollate
from common.tables import render_table
from handpose.data.dataset import HandWindowDataset, sample_spec
from handpose.frame_tokens import compute_frame_tokens, every_frame_view
from handpose.lit import SKELETON_PARENTS_21, HandPoseLit
from handpose.metrics import joint_metrics
from handpose.runs import build_datamodule, load_checkpoint

log = logging.getLogger(__name__)

SHORT_MEAN = 3  # frames of the short causal mean
FINGERTIPS_21 = tuple(j for j in range(21) if j not in SKELETON_PARENTS_21)  # the joints no other hangs from
GT_JOINTS_ROW = "last frame, GT 2D joints (oracle)"


def frames_read(end: int, num_frame: int) -> slice:
    """The frames :func:`window_estimates` reads for the window ending at ``end``: the window itself and the centred
    window (``num_frame // 2`` frames before ``end``, the rest after it)."""
    return slice(max(0, end - num_frame + 1), end + num_frame - num_frame // 2)


def window_estimates(tokens: np.ndarray, timestamp: np.ndarray, end: int, num_frame: int) -> dict[str, np.ndarray]:
    """One sequence's tokens [n, d] and timestamps [n] (s), a window ending at frame ``end`` with ``num_frame``
    frames (``end >= num_frame - 1``) -> the candidate tokens [d] for that frame, by name (float64); they read
    the frames :func:`frames_read`."""
    n = len(tokens)
    if np.shape(tokens)[:1] != np.shape(timestamp) or np.ndim(tokens) != 2:
        raise ValueError(f"tokens [n, d] and timestamp [n] expected, got {np.shape(tokens)} and {np.shape(timestamp)}")
    if not num_frame - 1 <= end < n:
        raise IndexError(f"window end {end} needs {num_frame - 1} frames before it in a sequence of {n}")
    x = np.asarray(tokens, np.float64)
    window = x[end - num_frame + 1: end + 1]
    t = np.asarray(timestamp, np.float64)[end - num_frame + 1: end + 1] - float(timestamp[end])
    design = np.stack([np.ones_like(t), t], axis=1)  # [num_frame, 2]: the intercept is the value at the last frame
    centred = x[max(0, end - num_frame // 2): frames_read(end, num_frame).stop]  # clipped at the sequence's end
    return {
        "last frame (Stage 1)": x[end],
        f"causal mean of {min(SHORT_MEAN, num_frame)}": x[end - min(SHORT_MEAN, num_frame) + 1: end + 1].mean(0),
        f"causal mean of {num_frame}": window.mean(0),
        f"causal line through {num_frame}": np.linalg.lstsq(design, window, rcond=None)[0][0],
        f"centred mean of {num_frame} (looks ahead)": centred.mean(0),
    }


def latest_unoccluded(occluded: np.ndarray, end: int, num_frame: int) -> int | None:
    """The most recent frame of the window ending at ``end`` that is not occluded (``end`` itself if it is not);
    None when the whole window is occluded."""
    for f in range(end, end - num_frame, -1):
        if not occluded[f]:
            return f
    return None


def hand_size(joints: np.ndarray) -> float:
    """Sum of the 20 bone lengths of a 21-joint skeleton [21, 3] (metres)."""
    if np.shape(joints) != (21, 3):
        raise ValueError(f"joints [21, 3] expected, got {np.shape(joints)}")
    return float(sum(np.linalg.norm(joints[c] - joints[p]) for c, p in enumerate(SKELETON_PARENTS_21) if p >= 0))


def depth_floor_mm(dataset: HandWindowDataset, windows: list[tuple[int, int, int]] | None = None) -> float:
    """Mean over the last frames of ``windows`` (``dataset.index`` entries; default all) of ``z |1 - s~ / s|`` (mm):
    the depth error left to an estimator that knows everything but the hand's absolute size (sizes from each
    sequence's first valid frame, ``s~`` their median over the split)."""
    sizes = []
    for seq in dataset.sequences:
        valid = np.flatnonzero(seq["valid"])
        sizes.append(hand_size(seq["joints_cam"][valid[0]]) if len(valid) else np.nan)
    sizes = np.asarray(sizes)
    typical = np.nanmedian(sizes)
    errors = [float(dataset.sequences[s]["joints_cam"][stop - 1, 0, 2]) * abs(1 - typical / sizes[s])
              for s, _, stop in (dataset.index if windows is None else windows)]
    return 1000 * float(np.mean(errors))


@torch.no_grad()
def decode_joints(lit: HandPoseLit, tokens: np.ndarray, focal: np.ndarray, princpt: np.ndarray,
                  batch_size: int = 256) -> torch.Tensor:
    """Tokens [m, d] through the Stage 1 heads -> MANO joints without translation [m, 21, 3] (metres)."""
    out = []
    for i in range(0, len(tokens), batch_size):
        t = torch.as_tensor(tokens[i: i + batch_size], dtype=torch.float32)[:, None]
        pred = lit.net.refine_and_decode(t, torch.zeros(len(t), 1), torch.as_tensor(focal[i: i + batch_size])[:, None],
                                         torch.as_tensor(princpt[i: i + batch_size])[:, None])
        pose, shape, _ = (x[:, 0] for x in pred.mano)
        out.append(lit.loss.mano(pose, shape).joints)
    return torch.cat(out)


@torch.no_grad()
def keypoint_errors_px(lit: HandPoseLit, dataset: HandWindowDataset, windows: list[tuple[int, int, int]],
                       batch_size: int = 64, num_workers: int = 0) -> dict[str, float]:
    """The keypoint head's 2D joints of the last frames of ``windows`` (``dataset.index`` entries) against their
    annotation -> mean distance in crop pixels over all 21 joints ("all") and over the 5 fingertips ("tips")."""
    frames = every_frame_view(dataset)
    position = {(s, stop - 1): i for i, (s, _, stop) in enumerate(frames.index)}
    subset = Subset(frames, [position[(s, stop - 1)] for s, _, stop in windows])
    loader = DataLoader(subset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                        collate_fn=CheckedCollate(sample_spec(1, frames.img_size)))
    errors = []
    for batch in loader:
        _, keypoints = lit.net.predict_with_keypoints(
            *(batch[k] for k in ("img", "bbox", "focal", "princpt", "timestamp")))
        errors.append((keypoints[:, 0] - batch["joints_2d"][:, 0]).norm(dim=-1).double())  # [b, 21]
    err = torch.cat(errors)
    return {"all": float(err.mean()), "tips": float(err[:, list(FINGERTIPS_21)].mean()),
            "crop_size": int(frames.img_size)}


def _errors_mm(lit: HandPoseLit, tokens: np.ndarray, focal: np.ndarray, princpt: np.ndarray,
               joints_gt: torch.Tensor) -> dict[str, float]:
    """PA-MPJPE and root-relative MPJPE (mm) of the decoded ``tokens`` against ``joints_gt`` [m, 21, 3]."""
    metrics = joint_metrics(decode_joints(lit, tokens, focal, princpt), joints_gt)
    return {"pa_mpjpe": metrics["pa_mpjpe"], "mpjpe": metrics["mpjpe"]}  # root error: no translation decoded


def headroom(ckpt: str | Path, split: str = "val", num_frame: int = 7, data_root: str | None = None,
             num_workers: int = 0) -> dict:
    """The oracle table of a Stage 1 checkpoint on ``split`` (module docstring) as a dict."""
    lit, cfg = load_checkpoint(ckpt)
    if lit.net.temporal is not None:
        raise ValueError(f"{ckpt} is a Stage 2 run: give the Stage 1 checkpoint it started from")
    datamodule = build_datamodule(cfg, lit, {"num_frame": num_frame, "eval_stride": 1, "root": data_root})
    datamodule.prepare_data()
    dataset = datamodule.build_dataset(split)
    tokens = compute_frame_tokens(lit.net, dataset, num_workers=num_workers)
    ann = dataset.annotations()
    # every frame a window's candidates read must have a token (a frame the loader could not read has none)
    readable = [bool(np.isfinite(tokens[s][frames_read(stop - 1, num_frame)]).all()) for s, _, stop in dataset.index]
    keep = np.flatnonzero(ann["valid"] & np.asarray(readable, bool))
    if len(keep) < len(dataset):
        log.warning("headroom: %d of %d windows skipped (invalid last frame or an unreadable frame)",
                    len(dataset) - len(keep), len(dataset))
    rows: dict[str, list[np.ndarray]] = {}
    occluded_rows, oracle, whole = [], [], 0
    for row, j in enumerate(keep):
        s, _, stop = dataset.index[j]
        seq, end = dataset.sequences[s], stop - 1
        for name, token in window_estimates(tokens[s], seq["timestamp"], end, num_frame).items():
            rows.setdefault(name, []).append(token)
        if seq["occluded"][end]:
            clean = latest_unoccluded(seq["occluded"], end, num_frame)
            whole += clean is None
            occluded_rows.append(row)
            oracle.append(tokens[s][end if clean is None else clean])
    focal, princpt, gt = ann["focal"][keep], ann["princpt"][keep], torch.from_numpy(ann["joints_cam"][keep])
    report = {"checkpoint": str(ckpt), "split": split, "num_frame": num_frame, "windows": int(len(keep)), "rows": {}}
    for name, candidates in rows.items():
        report["rows"][name] = {**_errors_mm(lit, np.stack(candidates), focal, princpt, gt), "windows": int(len(keep))}
    if occluded_rows:
        idx = np.asarray(occluded_rows)
        own = np.stack(rows["last frame (Stage 1)"])[idx]
        for name, candidates in (("occluded last frame (Stage 1)", own), ("occluded: latest unoccluded frame", oracle)):
            report["rows"][name] = {**_errors_mm(lit, np.stack(candidates), focal[idx], princpt[idx], gt[idx]),
                                    "windows": int(len(idx))}
        report["occluded_throughout"] = int(whole)
    if lit.net.has_heatmaps and lit.net.decoder.uses_joints:  # the 2D joints' share of Stage 1's error
        oracle_tokens = compute_frame_tokens(lit.net, dataset, num_workers=num_workers, ground_truth_joints_2d=True)
        last = np.stack([oracle_tokens[dataset.index[j][0]][dataset.index[j][2] - 1] for j in keep])
        report["rows"][GT_JOINTS_ROW] = {**_errors_mm(lit, last, focal, princpt, gt), "windows": int(len(keep))}
        report["keypoint_error_px"] = keypoint_errors_px(lit, dataset, [dataset.index[j] for j in keep],
                                                         num_workers=num_workers)
    report["depth_floor_mm"] = depth_floor_mm(dataset, [dataset.index[j] for j in keep])
    return report


def format_report(report: dict) -> str:
    base = report["rows"]["last frame (Stage 1)"]["pa_mpjpe"]
    occ = report["rows"].get("occluded last frame (Stage 1)", {}).get("pa_mpjpe")
    lines = []
    for name, row in report["rows"].items():
        ref = occ if name.startswith("occluded") else base
        lines.append((name, str(row["windows"]), f"{row['pa_mpjpe']:.2f}", f"{row['pa_mpjpe'] / ref:.3f}x",
                      f"{row['mpjpe']:.2f}"))
    table = render_table(
        f"What Stage 2 could gain: {report['split']} split, windows of {report['num_frame']} frames",
        (("token decoded", "left"), ("windows", "right"), ("PA-MPJPE (mm)", "right"), ("vs Stage 1", "right"),
         ("MPJPE root-rel. (mm)", "right")), lines)
    notes = [f"depth error floor of a single view (hand size unknown): {report['depth_floor_mm']:.1f} mm"]
    if "keypoint_error_px" in report:
        kp = report["keypoint_error_px"]
        notes.append(f"heatmap head's 2D joints on these frames: {kp['all']:.2f} px off on average, fingertips "
                     f"{kp['tips']:.2f} px (crops of {kp['crop_size']} px)")
    if "occluded_throughout" in report:
        notes.append(f"occluded windows without an unoccluded frame: {report['occluded_throughout']}")
    return "\n".join([table, *notes])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="a Stage 1 checkpoint of a HandPoseLit run")
    parser.add_argument("--split", default="val", choices=("train", "val", "test", "heldout"))
    parser.add_argument("--num-frame", type=int, default=7, help="window length (Stage 2's)")
    parser.add_argument("--data-root", default=None, help="data folder (default: the run's data.root)")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = headroom(args.ckpt, args.split, args.num_frame, args.data_root, args.num_workers)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

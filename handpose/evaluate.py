"""Evaluate a hand pose checkpoint on a split: metrics table next to the mean-pose baseline, plus a JSON file.

``python -m handpose.evaluate --ckpt outputs/stage2/stage2/checkpoints/last.ckpt [--split test] [--data-root DIR]
[--num-frame T] [--json out.json]``. The model and data settings come from the run's ``config.yaml`` (written by
``common.train`` next to ``checkpoints/``); metrics are computed by ``HandPoseLit``'s own evaluation step.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from common.tables import render_table
from handpose.data.dataset import annotation_batch
from handpose.frame_tokens import attach_frame_tokens
from handpose.lit import HandPoseLit
from handpose.metrics import METRIC_NAMES, acceleration_error, joint_metrics, mean_mano_params, metrics_of
from handpose.models import PoseNet
from handpose.runs import build_datamodule, find_run_config, load_checkpoint

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# What the mean-pose baseline reads from an evaluation batch (the last frame of each window is enough).
BASELINE_KEYS = ("valid", "mano_pose", "mano_shape", "mano_trans", "joints_cam")
INDEX_KEYS = ("seq_index", "frame_index")
SUBSET_METRICS = ("pa_mpjpe", "mpjpe", "root_err")
DROP_GAP_FRAMES = 1.5  # a last frame "follows dropped frames" when its gap exceeds this many frame periods
METRIC_INFO = {  # name -> (label, unit, lower is better)
    "mpjpe": ("MPJPE (root-rel.)", "mm", True),
    "pa_mpjpe": ("PA-MPJPE", "mm", True),
    "mpvpe": ("MPVPE (root-rel.)", "mm", True),
    "pa_mpvpe": ("PA-MPVPE", "mm", True),
    "f5": ("F@5mm", "", False),
    "f15": ("F@15mm", "", False),
    "root_err": ("root error", "mm", True),
    "auc": ("PCK AUC 0-50mm", "", False),
}


class _LastFrameCollector(L.Callback):
    """Keeps the last frame's annotation and the model's camera-space joints / vertices of every evaluated
    batch (for the baseline on the same frames and the per-sample subsets)."""

    def __init__(self) -> None:
        self.batches: list[dict[str, torch.Tensor]] = []
        self.outputs: list[dict[str, torch.Tensor]] = []

    def _keep(self, batch: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        self.batches.append({k: batch[k][:, -1:].detach().cpu() for k in (*BASELINE_KEYS, *INDEX_KEYS)})
        self.outputs.append({k: v[:, 0].cpu() for k, v in outputs.items()})

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._keep(batch, outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._keep(batch, outputs)

    @property
    def num_valid(self) -> int:
        return int(sum(int(b["valid"].sum()) for b in self.batches))

    def per_sample(self) -> PerSample:
        """The valid last frames' predictions and GT, in evaluation order."""
        valid = torch.cat([b["valid"][:, 0] for b in self.batches]).bool()

        def cat(key: str, source: list) -> torch.Tensor:
            return torch.cat([x[key] for x in source])[valid]

        return PerSample(
            seq=cat("seq_index", self.batches)[:, 0], frame=cat("frame_index", self.batches)[:, 0],
            joints_pred=cat("joints_cam_pred", self.outputs), joints_gt=cat("joints_cam_gt", self.outputs),
            verts_pred=cat("verts_cam_pred", self.outputs), verts_gt=cat("verts_cam_gt", self.outputs),
        )


@dataclass(frozen=True)
class PerSample:
    """Evaluated samples (valid last frames): sequence and frame index [n], camera-space joints [n, 21, 3] and
    vertices [n, V, 3] in metres, predicted and GT."""

    seq: torch.Tensor
    frame: torch.Tensor
    joints_pred: torch.Tensor
    joints_gt: torch.Tensor
    verts_pred: torch.Tensor
    verts_gt: torch.Tensor

    def keys(self) -> list[tuple[int, int]]:
        return list(zip(self.seq.tolist(), self.frame.tolist()))

    def select(self, mask: torch.Tensor) -> PerSample:
        return PerSample(*(getattr(self, f.name)[mask] for f in fields(self)))

    def restrict_to(self, keys: list[tuple[int, int]]) -> PerSample:
        """The samples of ``keys`` (sequence, frame), in that order; every key must be present."""
        position = {k: i for i, k in enumerate(self.keys())}
        missing = [k for k in keys if k not in position]
        if missing:
            raise ValueError(f"{len(missing)} frames were not evaluated here, e.g. (sequence, frame) {missing[:3]}")
        return self.select(torch.tensor([position[k] for k in keys], dtype=torch.long))


def subset_masks(samples: PerSample, dataset) -> dict[str, torch.Tensor]:
    """Evaluation subsets by the LAST frame of each sample: ``occluded`` (the format's optional flag),
    ``after_drop`` (more than 1.5 frame periods since the sequence's previous stored frame) and their union."""
    occluded, after_drop = [], []
    for s, f in samples.keys():
        seq = dataset.sequences[s]
        occluded.append(bool(seq["occluded"][f]))
        after_drop.append(f > 0 and float(seq["timestamp"][f] - seq["timestamp"][f - 1]) > DROP_GAP_FRAMES / seq.fps)
    occ, drop = torch.tensor(occluded, dtype=torch.bool), torch.tensor(after_drop, dtype=torch.bool)
    return {"all": torch.ones_like(occ), "occluded": occ, "after_drop": drop, "occluded_or_after_drop": occ | drop}


def detailed_metrics(samples: PerSample, masks: Mapping[str, torch.Tensor]) -> dict:
    """Headline metrics on each subset (``SUBSET_METRICS``) and the acceleration error -> a JSON-able dict."""
    subsets = {}
    for name, mask in masks.items():
        part = samples.select(mask)
        values = joint_metrics(part.joints_pred, part.joints_gt)
        subsets[name] = {"count": int(mask.sum()), **{k: values[k] for k in SUBSET_METRICS if k in values}}
    accel, triples = acceleration_error(samples.seq, samples.frame, samples.joints_pred, samples.joints_gt)
    return {"subsets": subsets, "accel_err": accel, "accel_triples": triples}


def _loader(datamodule, split: str, batch_size: int, num_workers: int, net: PoseNet | None = None,
            device: str = "cpu") -> DataLoader:
    """Every window of ``split``. With ``net`` (a Stage 2 network) the windows carry its per-frame tokens, each
    frame encoded once (:mod:`handpose.frame_tokens`) instead of once per window that holds it: a frame's token
    does not depend on the window (``PoseNet.encode_frames``), so the predictions are the image path's."""
    dataset = datamodule.build_dataset(split)
    if net is not None:
        attach_frame_tokens(net.to(device), dataset, max(batch_size, 64), num_workers)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=datamodule.collate_for(dataset), persistent_workers=False)


def evaluate(
    ckpt: str | Path,
    split: str = "test",
    data_root: str | Path | None = None,
    num_frame: int | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    config: str | Path | None = None,
    accelerator: str = "cpu",
    baseline: bool = True,
    progress: bool = True,
    stride: int = 1,
    keep_samples: bool = False,
) -> dict:
    """Metrics of ``ckpt`` on ``split`` and of the mean-pose baseline on the same frames -> report dict.

    Every window ending at a valid frame (``stride`` 1: consecutive predictions, for the acceleration error)
    is evaluated. Besides the headline metrics the report has, for the model and the baseline, the subsets of
    :func:`subset_masks` and the acceleration error (``details``). ``keep_samples`` adds the per-sample
    results under ``"_samples"`` (a :class:`PerSample`, not written to JSON) and the dataset under
    ``"_dataset"``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    lit, cfg = load_checkpoint(ckpt, config)
    num_frame = num_frame or int(cfg.data.num_frame)
    if lit.net.temporal is None and num_frame != 1:
        raise ValueError(f"{ckpt} is a stage1 model (one frame per sample); got --num-frame {num_frame}")
    overrides = {"root": str(data_root) if data_root else None, "num_frame": num_frame, "batch_size": batch_size,
                 "num_workers": num_workers, "eval_stride": stride}
    datamodule = build_datamodule(cfg, lit, overrides)
    datamodule.prepare_data()
    if not datamodule.has_split(split):
        raise ValueError(f"{datamodule.root} has no {split!r} split")
    device = "cuda" if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu"
    loader = _loader(datamodule, split, datamodule.batch_size, datamodule.num_workers,
                     net=lit.net if num_frame > 1 else None, device=device)

    collector = _LastFrameCollector()
    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=progress, callbacks=[collector])
    if split == "test":
        results = trainer.test(lit, dataloaders=loader, verbose=False)[0]
    else:  # HandPoseLit logs the validation step under val/ whatever the split
        results = trainer.validate(lit, dataloaders=loader, verbose=False)[0]
    prefix = "test/" if split == "test" else "val/"
    metrics = {name: float(results[prefix + name]) for name in METRIC_NAMES if prefix + name in results}
    if len(metrics) != len(METRIC_NAMES):
        raise RuntimeError(f"{ckpt} on {split}: no valid frame was evaluated (metrics {sorted(results)})")
    samples = collector.per_sample()
    masks = subset_masks(samples, loader.dataset)

    report = {
        "ckpt": str(Path(ckpt).resolve()),
        "config": str(find_run_config(Path(ckpt), Path(config) if config else None).resolve()),
        "split": split,
        "stage": lit.net.stage.value,
        "num_frame": num_frame,
        "data_root": str(datamodule.root),
        "num_windows": len(loader.dataset),
        "num_evaluated": collector.num_valid,
        "loss": float(results.get(prefix + "loss", float("nan"))),
        "metrics": metrics,
        "details": detailed_metrics(samples, masks),
        "baseline": None,
        "baseline_details": None,
    }
    if baseline:
        base = _baseline_samples(cfg, lit, collector.batches, samples)
        if base is not None:
            report["baseline"] = metrics_of(base.joints_pred, base.joints_gt, base.verts_pred, base.verts_gt)
            report["baseline_details"] = detailed_metrics(base, masks)
            if keep_samples:
                report["_baseline_samples"] = base
    if keep_samples:
        report["_samples"], report["_dataset"] = samples, loader.dataset
    return report


def compare_stage1(report: dict, stage1_ckpt: str | Path, progress: bool = True, **kwargs) -> dict:
    """Stage 1 (``stage1_ckpt``, one frame) on exactly the frames of ``report`` (a Stage 2 evaluation made
    with ``keep_samples=True``): the same crops of the same last frames, so every difference is the temporal
    context. -> ``report["stage1"]`` = {metrics, details} (also returned)."""
    samples, dataset = report["_samples"], report["_dataset"]
    one = evaluate(stage1_ckpt, report["split"], data_root=report["data_root"], num_frame=1, baseline=False,
                   progress=progress, keep_samples=True, **kwargs)
    if one["stage"] != "stage1":
        raise ValueError(f"--compare-stage1 {stage1_ckpt} is a {one['stage']} model")
    same = one["_samples"].restrict_to(samples.keys())
    report["stage1"] = {
        "ckpt": one["ckpt"],
        "metrics": metrics_of(same.joints_pred, same.joints_gt, same.verts_pred, same.verts_gt),
        "details": detailed_metrics(same, subset_masks(same, dataset)),
    }
    return report["stage1"]


def _baseline_samples(cfg: DictConfig, lit: HandPoseLit, eval_batches: list, samples: PerSample) -> PerSample | None:
    """The mean training-set MANO (every valid train frame, no augmentation) as the prediction of every
    evaluated frame; GT vertices are MANO(GT parameters), as for the model."""
    train_dm = build_datamodule(cfg, lit, {"num_frame": 1})
    if not train_dm.has_split("train"):
        log.warning("%s has no train split: no mean-pose baseline", train_dm.root)
        return None
    mano = copy.deepcopy(lit.loss.mano).cpu()
    mean = mean_mano_params([annotation_batch(train_dm.build_dataset("train"))])
    n = samples.seq.shape[0]
    with torch.no_grad():
        pred = mano(mean.pose.expand(n, -1), mean.shape.expand(n, -1), mean.trans.expand(n, -1))
        valid = torch.cat([b["valid"][:, 0] for b in eval_batches]).bool()
        gt = mano(*(torch.cat([b[k][:, 0] for b in eval_batches])[valid] for k in ("mano_pose", "mano_shape", "mano_trans")))
    joints_gt = torch.cat([b["joints_cam"][:, 0] for b in eval_batches])[valid]
    return PerSample(samples.seq, samples.frame, pred.joints, joints_gt, pred.vertices, gt.vertices)


def format_table(report: Mapping) -> str:
    """The report's metrics and baseline as a rich table rendered to text."""
    title = (f"{report['stage']} T={report['num_frame']} on {report['split']} "
             f"({report['num_evaluated']} frames, {report['num_windows']} windows)")
    columns = [("metric", "left"), ("unit", "left"), ("model", "right"), ("mean-pose baseline", "right"),
               ("better", "center")]
    base = report.get("baseline") or {}
    rows = []
    for name in METRIC_NAMES:
        label, unit, lower = METRIC_INFO[name]
        fmt = "{:.2f}" if unit == "mm" else "{:.3f}"
        rows.append((label, unit, fmt.format(report["metrics"][name]),
                     fmt.format(base[name]) if name in base else "-", "lower" if lower else "higher"))
    return render_table(title, columns, rows)


SUBSET_LABELS = {"all": "all frames", "occluded": "last frame occluded", "after_drop": "after dropped frames",
                 "occluded_or_after_drop": "occluded or after drops"}


def _comparison_rows(report: Mapping) -> list[tuple[str, str, bool, dict[str, float | None]]]:
    """(label, unit, lower is better, {column: value}) rows: the headline metrics, the subsets, acceleration."""
    stage1 = report.get("stage1") or {}
    rows = []
    for name in METRIC_NAMES:
        label, unit, lower = METRIC_INFO[name]
        rows.append((label, unit, lower, {"model": report["metrics"][name], "stage1": stage1.get("metrics", {}).get(name),
                                          "baseline": (report.get("baseline") or {}).get(name)}))
    columns = {"model": report["details"], "stage1": stage1.get("details"), "baseline": report.get("baseline_details")}
    for subset, info in report["details"]["subsets"].items():
        if subset == "all" or not info["count"]:
            continue
        for name in SUBSET_METRICS:
            label = f"{METRIC_INFO[name][0]}, {SUBSET_LABELS[subset]} (n={info['count']})"
            rows.append((label, "mm", True, {c: (d["subsets"][subset].get(name) if d else None)
                                             for c, d in columns.items()}))
    rows.append((f"accel. error ({report['details']['accel_triples']} triples)", "mm/f^2", True,
                 {c: (d["accel_err"] if d else None) for c, d in columns.items()}))
    return rows


def format_comparison(report: Mapping) -> str:
    """One table: the model, Stage 1 on the same frames (when compared) and the mean pose, over the headline
    metrics, the subsets (occluded / after dropped frames) and the acceleration error, with the model's ratios."""
    has_stage1 = bool(report.get("stage1"))
    stage = report["stage"]
    title = (f"{stage} T={report['num_frame']} on {report['split']} ({report['num_evaluated']} frames)"
             + (": against stage1 on the same frames and the mean pose" if has_stage1 else ": against the mean pose"))
    columns = [("metric", "left"), ("unit", "left"), (stage, "right"),
               *((("stage1, same frames", "right"),) if has_stage1 else ()), ("mean pose", "right"),
               *(((f"{stage} / stage1", "right"),) if has_stage1 else ()), (f"{stage} / mean", "right"),
               ("better", "center")]

    def fmt(v: float | None, unit: str) -> str:
        if v is None or v != v:
            return "-"
        return f"{v:.2f}" if unit else f"{v:.3f}"

    def ratio(a: float | None, b: float | None) -> str:
        return "-" if a is None or b is None or not b or a != a or b != b else f"{a / b:.3f}x"

    rows = []
    for label, unit, lower, values in _comparison_rows(report):
        cells = [label, unit, fmt(values["model"], unit)]
        if has_stage1:
            cells.append(fmt(values["stage1"], unit))
        cells.append(fmt(values["baseline"], unit))
        if has_stage1:
            cells.append(ratio(values["model"], values["stage1"]))
        cells += [ratio(values["model"], values["baseline"]), "lower" if lower else "higher"]
        rows.append(cells)
    return render_table(title, columns, rows, width=160)


def default_json_path(ckpt: Path, split: str) -> Path:
    """``<run>/eval/<ckpt stem>_<split>.json`` for ``<run>/checkpoints/<ckpt>``."""
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run / "eval" / f"{ckpt.stem}_{split}.json"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, type=Path, help="Lightning checkpoint of a HandPoseLit run")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--data-root", type=Path, default=None, help="data folder (default: the run's data.root)")
    p.add_argument("--num-frame", type=int, default=None, help="window length (default: the run's)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--config", type=Path, default=None, help="run config (default: <run>/config.yaml)")
    p.add_argument("--accelerator", default="cpu", help="cpu, gpu or auto")
    p.add_argument("--json", type=Path, default=None, help="default: <run>/eval/<ckpt>_<split>.json")
    p.add_argument("--no-baseline", action="store_true", help="skip the mean-pose baseline")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--stride", type=int, default=1,
                   help="keep every n-th window end (1: every frame, needed for the acceleration error)")
    p.add_argument("--compare-stage1", type=Path, default=None, metavar="CKPT",
                   help="a Stage 1 checkpoint to evaluate on exactly the same frames, side by side")
    p.add_argument("--format", choices=("freihand", "ho3d"), default=None,
                   help="instead of metrics: write the benchmark's submission file (pred.json + pred.zip) for every "
                        "frame of --split (handpose.submission)")
    p.add_argument("--out", type=Path, default=None, help="with --format: the pred.json to write")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.format:
        from handpose.submission import submission

        out = args.out or args.ckpt.parent.parent / "eval" / f"{args.format}_{args.split}" / "pred.json"
        path = submission(args.ckpt, args.format, out, args.split, args.data_root, args.config,
                          batch_size=args.batch_size or 16, num_workers=args.num_workers or 0)
        print(f"wrote {path} and {path.with_suffix('.zip')}")
        return {"submission": str(path)}
    progress = not args.no_progress
    loader_args = {"batch_size": args.batch_size, "num_workers": args.num_workers, "accelerator": args.accelerator,
                   "stride": args.stride}
    report = evaluate(args.ckpt, args.split, args.data_root, args.num_frame, config=args.config,
                      baseline=not args.no_baseline, progress=progress, keep_samples=args.compare_stage1 is not None,
                      **loader_args)
    if args.compare_stage1 is not None:
        compare_stage1(report, args.compare_stage1, progress=progress, **loader_args)
    report = {k: v for k, v in report.items() if not k.startswith("_")}
    out = args.json or default_json_path(args.ckpt, args.split)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(format_comparison(report))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()

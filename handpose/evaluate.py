"""Evaluate a hand pose checkpoint on a split: metrics table next to the mean-pose baseline, plus a JSON file.

``python -m handpose.evaluate --ckpt outputs/stage2/stage2/checkpoints/last.ckpt [--split test] [--data-root DIR]
[--num-frame T] [--json out.json]``. The model and data settings come from the run's ``config.yaml`` (written by
``common.train`` next to ``checkpoints/``); metrics are computed by ``HandPoseLit``'s own evaluation step.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader

from common.checkpoint import load_weights
from handpose.lit import HandPoseLit
from handpose.metrics import METRIC_NAMES, mean_pose_baseline

log = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
SPLITS = ("train", "val", "test")
# What the mean-pose baseline reads from an evaluation batch (the last frame of each window is enough).
BASELINE_KEYS = ("valid", "mano_pose", "mano_shape", "mano_trans", "joints_cam")
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


def find_run_config(ckpt: Path, config: Path | None = None) -> Path:
    """The run's config: ``config`` if given, else ``<run>/config.yaml`` for ``<run>/checkpoints/x.ckpt``."""
    candidates = [config] if config is not None else [ckpt.parent.parent / CONFIG_NAME, ckpt.parent / CONFIG_NAME]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"no run config for {ckpt}: looked for {', '.join(map(str, candidates))}. common.train writes "
        f"<run>/{CONFIG_NAME} next to <run>/checkpoints/; pass --config for a checkpoint stored elsewhere"
    )


def load_checkpoint(
    ckpt: str | Path, config: str | Path | None = None
) -> tuple[HandPoseLit, DictConfig]:
    """Rebuild the run's HandPoseLit from its config and load every tensor of ``ckpt`` (strict) -> (lit, cfg).

    The backbone's init file and the Stage 1 weights named in the config are not needed (the checkpoint holds
    all weights) and are not read. Returns the module in eval mode on the CPU.
    """
    from hydra.utils import instantiate

    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(f"--ckpt {ckpt} does not exist")
    cfg_path = find_run_config(ckpt, Path(config) if config else None)
    cfg = OmegaConf.load(cfg_path)
    for key in ("model", "data"):
        if key not in cfg:
            raise KeyError(f"{cfg_path} has no '{key}' section (is it a common.train run config?)")
    with open_dict(cfg):
        cfg.model.net.backbone.weight = None
        cfg.model.stage1_weight = None
    os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))  # unresolved configs
    lit = instantiate(cfg.model)
    if not isinstance(lit, HandPoseLit):
        raise TypeError(f"{cfg_path}: model is a {type(lit).__name__}, expected handpose.lit.HandPoseLit")
    load_weights(lit, ckpt, strict=True)  # logs what it loaded
    log.info("model and data settings from %s", cfg_path)
    return lit.eval(), cfg


def build_datamodule(cfg: DictConfig, lit: HandPoseLit, overrides: Mapping | None = None):
    """The run's datamodule for evaluation: no augmentation, crops of the network's size, ``overrides`` applied."""
    from hydra.utils import instantiate

    data_cfg = copy.deepcopy(cfg.data)
    with open_dict(data_cfg):
        data_cfg.augment = None
        data_cfg.img_size = lit.net.img_size
        for key, value in (overrides or {}).items():
            if value is not None:
                data_cfg[key] = value
    return instantiate(data_cfg)


class _LastFrameCollector(L.Callback):
    """Keeps the last frame's annotation of every evaluated batch (for the baseline on the same frames)."""

    def __init__(self) -> None:
        self.batches: list[dict[str, torch.Tensor]] = []

    def _keep(self, batch: Mapping[str, torch.Tensor]) -> None:
        self.batches.append({k: batch[k][:, -1:].detach().cpu() for k in BASELINE_KEYS})

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._keep(batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._keep(batch)

    @property
    def num_valid(self) -> int:
        return int(sum(int(b["valid"].sum()) for b in self.batches))


def _loader(datamodule, split: str, batch_size: int, num_workers: int) -> DataLoader:
    dataset = datamodule.build_dataset(split)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=datamodule.collate_fn, persistent_workers=False)


def _progress(iterable, description: str, total: int):
    from rich.progress import track

    return track(iterable, description=description, total=total, transient=True)


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
) -> dict:
    """Metrics of ``ckpt`` on ``split`` and of the mean-pose baseline on the same frames -> report dict."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    lit, cfg = load_checkpoint(ckpt, config)
    num_frame = num_frame or int(cfg.data.num_frame)
    if lit.net.temporal is None and num_frame != 1:
        raise ValueError(f"{ckpt} is a stage1 model (one frame per sample); got --num-frame {num_frame}")
    overrides = {"root": str(data_root) if data_root else None, "num_frame": num_frame, "batch_size": batch_size,
                 "num_workers": num_workers}
    datamodule = build_datamodule(cfg, lit, overrides)
    datamodule.prepare_data()
    if not datamodule.has_split(split):
        raise ValueError(f"{datamodule.root} has no {split!r} split")
    loader = _loader(datamodule, split, datamodule.batch_size, datamodule.num_workers)

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
        "baseline": None,
    }
    if baseline:
        report["baseline"] = _baseline(cfg, lit, collector.batches, progress)
    return report


def _baseline(cfg: DictConfig, lit: HandPoseLit, eval_batches: list, progress: bool) -> dict[str, float] | None:
    """Mean training-set MANO (every valid train frame, no augmentation) evaluated on the same frames."""
    train_dm = build_datamodule(cfg, lit, {"num_frame": 1})
    if not train_dm.has_split("train"):
        log.warning("%s has no train split: no mean-pose baseline", train_dm.root)
        return None
    loader = _loader(train_dm, "train", 64, train_dm.num_workers)
    batches = _progress(loader, "baseline: mean training hand", len(loader)) if progress else loader
    mano = copy.deepcopy(lit.loss.mano).cpu()
    return mean_pose_baseline(batches, eval_batches, mano)


def format_table(report: Mapping) -> str:
    """The report's metrics and baseline as a rich table rendered to text."""
    from rich.console import Console
    from rich.table import Table

    title = (f"{report['stage']} T={report['num_frame']} on {report['split']} "
             f"({report['num_evaluated']} frames, {report['num_windows']} windows)")
    table = Table(title=title)
    for name, justify in (("metric", "left"), ("unit", "left"), ("model", "right"),
                          ("mean-pose baseline", "right"), ("better", "center")):
        table.add_column(name, justify=justify)
    base = report.get("baseline") or {}
    for name in METRIC_NAMES:
        label, unit, lower = METRIC_INFO[name]
        fmt = "{:.2f}" if unit == "mm" else "{:.3f}"
        table.add_row(label, unit, fmt.format(report["metrics"][name]),
                      fmt.format(base[name]) if name in base else "-", "lower" if lower else "higher")
    console = Console(width=100, record=True, file=io.StringIO())  # rendered to text, printed by the caller
    console.print(table)
    return console.export_text()


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
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = evaluate(args.ckpt, args.split, args.data_root, args.num_frame, args.batch_size, args.num_workers,
                      args.config, args.accelerator, baseline=not args.no_baseline, progress=not args.no_progress)
    out = args.json or default_json_path(args.ckpt, args.split)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(format_table(report))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()

"""The evaluation entrypoint for both families: ``python -m common.eval experiment=<name> [ckpt_path=last|best|PATH]
[split=test|val]``.

Composes the experiment's training config (``configs/eval.yaml`` adds ``ckpt_path`` and ``split``), builds its
datamodule, LightningModule and Trainer as ``common.train`` does (no loggers, no checkpointing), loads the checkpoint
strictly through Lightning and runs the module's own test or validation loop: the numbers are the ones training
reports. Prints them as a table and writes ``<run>/eval/<split>-<checkpoint>.json``. Family-specific reports with
baselines and subsets stay in ``handpose.evaluate`` and ``gesture.infer``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from common.train import (  # common.train also sets PROJECT_ROOT for the configs
    print_metrics_table,
    scalar_metrics,
)

log = logging.getLogger("common.eval")
SPLITS = ("test", "val")


def find_checkpoint(cfg: DictConfig) -> Path:
    """``cfg.ckpt_path``: ``last`` (``<run>/checkpoints/last.ckpt``), ``best`` (the newest ``best-*.ckpt`` there)
    or a path; a missing file is an error naming what was looked for."""
    which = str(cfg.ckpt_path)
    ckpt_dir = Path(cfg.paths.ckpt_dir)
    if which == "last":
        path = ckpt_dir / "last.ckpt"
    elif which == "best":
        best = sorted(ckpt_dir.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
        if not best:
            raise FileNotFoundError(f"ckpt_path=best: no best-*.ckpt in {ckpt_dir} (was the run trained with a "
                                    f"monitored metric? ckpt_path=last or a path)")
        path = best[-1]
    else:
        path = Path(which).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={which}: no checkpoint at {path} (train the run first, or pass "
                                f"experiment=..., run_name=... of the run, or a path)")
    return path


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Run the experiment's test (or validation) loop on ``cfg.ckpt_path`` -> its scalar metrics."""
    split = str(cfg.split)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    ckpt = find_checkpoint(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    if split == "test" and not getattr(datamodule, "has_split", lambda role: True)("test"):
        raise ValueError(f"experiment {cfg.experiment_name}: its data has no test split; use split=val")
    model = instantiate(cfg.model)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False, callbacks=[],
                                     default_root_dir=str(cfg.paths.output_dir))
    print(f"Evaluating {ckpt} on the {split} split of {cfg.experiment_name}")
    loop = trainer.test if split == "test" else trainer.validate
    results = loop(model, datamodule=datamodule, ckpt_path=str(ckpt), verbose=False)
    metrics: dict[str, float] = {}
    for res in results:
        metrics.update(scalar_metrics(res))
    metrics.update({k: v for k, v in scalar_metrics(trainer.callback_metrics).items() if k not in metrics})
    if trainer.is_global_zero:
        out = Path(cfg.paths.output_dir) / "eval" / f"{split}-{ckpt.stem}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"checkpoint": str(ckpt), "split": split, "metrics": metrics}, indent=1,
                                  sort_keys=True))
        print_metrics_table(f"{cfg.experiment_name}/{cfg.run_name}: {split}, {ckpt.name}", metrics)
        print(f"wrote {out}")
    return metrics


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()

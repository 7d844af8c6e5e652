"""The one training entrypoint: `python -m common.train experiment=<name> [run_name=...] [overrides]`.

Composes `configs/` (Hydra), instantiates datamodule, LightningModule, callbacks, loggers and Trainer, fits with
exact resume from the run folder `outputs/<experiment>/<run_name>/`, then tests when the data has a test split.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

import hydra  # noqa: E402
import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from common.loggers import RunState, finish_wandb  # noqa: E402
from common.tables import render_table  # noqa: E402

log = logging.getLogger("common.train")


class ResumeError(FileNotFoundError):
    """An explicit resume was requested but there is no checkpoint to resume from."""


def _is_rank_zero() -> bool:
    return rank_zero_only.rank == 0


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """Which checkpoint `trainer.fit` starts from.

    - ``ckpt_path=last`` or a path: explicit; a missing checkpoint is an error (never a silent restart).
    - ``resume=true`` (default): ``<run>/checkpoints/last.ckpt`` when it exists, else a fresh start.
    - ``resume=false``: a fresh start; earlier checkpoints of this run are moved aside, not overwritten.
    """
    ckpt_dir = Path(cfg.paths.ckpt_dir)
    last = ckpt_dir / "last.ckpt"
    explicit = cfg.get("ckpt_path")
    if explicit:
        path = last if str(explicit) == "last" else Path(str(explicit)).expanduser()
        if not path.is_file():
            raise ResumeError(
                f"resume requested (ckpt_path={explicit}) but no checkpoint exists at {path}. "
                f"Check run_name={cfg.run_name!r} / experiment {cfg.experiment_name!r}, or drop ckpt_path to "
                "start fresh.")
        return str(path)
    if cfg.resume and last.is_file():
        return str(last)
    if not cfg.resume and ckpt_dir.is_dir() and any(ckpt_dir.iterdir()) and _is_rank_zero():
        aside = ckpt_dir.with_name(f"checkpoints.prev-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(ckpt_dir), str(aside))
        print(f"resume=false: moved the earlier checkpoints of this run to {aside}")
    return None


def _ckpt_progress(path: str) -> tuple[int | None, int | None, str | None]:
    """-> (epoch, global step, error) of a Lightning checkpoint; (None, None, message) when unreadable."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - the caller names the file and says what to do
        return None, None, str(err)
    epoch, step = ck.get("epoch"), ck.get("global_step")
    return (int(epoch) if epoch is not None else None), (int(step) if step is not None else None), None


def build_loggers(cfg: DictConfig, run_state: RunState) -> list:
    """The run's loggers: every entry of ``cfg.logger`` (``configs/logger/``: csv, wandb, tensorboard, mlflow, ...)
    is instantiated from its ``_target_``; an entry that is a ``_partial_`` is then called with ``run_state``
    (resume step, fresh start over an earlier run). ``logger.<name>=null`` drops one; a builder may return None
    (wandb that cannot start: a warning, never a stop)."""
    loggers: list = []
    for key, spec in (cfg.get("logger") or {}).items():
        if spec is None:
            continue
        if not isinstance(spec, DictConfig) or "_target_" not in spec:
            raise ValueError(f"logger.{key}: expected a logger config with a _target_ (see configs/logger/), "
                             f"got {spec!r}")
        try:
            made = instantiate(spec)
            if isinstance(made, functools.partial):
                made = made(run_state=run_state)
        except Exception as err:
            raise RuntimeError(f"logger.{key}: could not build {spec._target_} ({err}); install what it needs or "
                               f"pick another logger (e.g. logger=csv)") from err
        if made is not None:
            loggers.append(made)
    return loggers


def git_state(root: Path = ROOT) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout the run comes from (None without git)."""
    import subprocess

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The whole composed config, resolved, plus the git state: what the loggers record as the run's config (the
    LightningModule's own hyperparameters leave out the network, loss, optimiser and schedule)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config["git"] = git_state()
    return config


def print_config_tree(cfg: DictConfig) -> None:
    """The resolved config as a tree, one branch per top-level group."""
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree(f"config of {cfg.experiment_name}/{cfg.run_name}", guide_style="dim")
    scalars = {k: v for k, v in cfg.items() if not isinstance(v, DictConfig)}
    if scalars:
        tree.add(Syntax(OmegaConf.to_yaml(OmegaConf.create(scalars)), "yaml", theme="ansi_dark"))
    for key, value in cfg.items():
        if isinstance(value, DictConfig):
            tree.add(str(key)).add(Syntax(OmegaConf.to_yaml(value, resolve=True), "yaml", theme="ansi_dark"))
    Console(width=120).print(tree)


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite scalar entries of a metrics dict (tensors of one element included) as floats."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, int | float) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def print_metrics_table(title: str, metrics: dict[str, float]) -> None:
    rows = [(k, f"{metrics[k]:.5g}") for k in sorted(metrics)]
    print(render_table(title, [("metric", "left"), ("value", "right")], rows), flush=True)


TEST_CKPTS = ("best", "last")


def checkpoint_to_test(trainer: Any, which: str) -> str | None:
    """The checkpoint the test after fit loads: ``which="best"`` the best by the monitored metric, ``"last"``
    the final epoch's (``last.ckpt``, written by the unmonitored ModelCheckpoint of ``configs/callbacks``);
    ``None`` (the weights in memory) when no such checkpoint was written."""
    if which not in TEST_CKPTS:
        raise ValueError(f"test_ckpt must be one of {TEST_CKPTS}, got {which!r}")
    for cb in trainer.checkpoint_callbacks:
        monitored = getattr(cb, "monitor", None) is not None
        path = cb.best_model_path if monitored == (which == "best") else ""
        if which == "last":
            path = path or getattr(cb, "last_model_path", "")
        if path:
            return path
    return None


def run(cfg: DictConfig) -> dict[str, float]:
    """Fit (and test) the configured experiment; returns the final scalar metrics."""
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    out = Path(cfg.paths.output_dir)
    existed_before = (out / "checkpoints").is_dir()
    ckpt_path = resolve_ckpt_path(cfg)
    resume_epoch = resume_step = None
    if ckpt_path:  # read once: the line below and the CSV logger (which keeps the rows before resume_step)
        resume_epoch, resume_step, unreadable = _ckpt_progress(ckpt_path)
        if unreadable:
            raise ValueError(
                f"cannot resume from {ckpt_path}: the file is unreadable (truncated or corrupt? {unreadable}). "
                "Move it away to resume from another checkpoint (ckpt_path=...), or start fresh with resume=false")
    if _is_rank_zero():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        if cfg.get("print_config", True):
            print_config_tree(cfg)
        if ckpt_path:
            print(f"Resuming {cfg.experiment_name}/{cfg.run_name} from {ckpt_path} "
                  f"(epoch {resume_epoch}, global step {resume_step})")
        else:
            print(f"Starting {cfg.experiment_name}/{cfg.run_name} from scratch; run folder {out}")

    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    loggers = build_loggers(cfg, RunState(resume_step=resume_step,
                                          fresh_over_existing=existed_before and ckpt_path is None))
    if loggers:
        config = run_config(cfg)
        for logger in loggers:
            logger.log_hyperparams(config)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                     default_root_dir=str(out))
    metrics: dict[str, float] = {}
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics.update(scalar_metrics(trainer.callback_metrics))
        has_test = getattr(datamodule, "has_split", lambda split: False)("test")
        if cfg.test_after_fit and has_test and not trainer.fast_dev_run:
            tested = checkpoint_to_test(trainer, str(cfg.test_ckpt))
            if _is_rank_zero():
                print(f"Testing {tested or 'the final weights in memory'}")
            results = trainer.test(model, datamodule=datamodule, ckpt_path=tested, verbose=False)
            for res in results:
                metrics.update(scalar_metrics(res))
    finally:
        finish_wandb()
    # Everything below runs after the checkpoints are written: it reports, and must never crash the run.
    if _is_rank_zero():
        try:
            shown = {k: v for k, v in metrics.items() if k.startswith(("val/", "test/"))}
            (out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
            print_metrics_table(f"{cfg.experiment_name}/{cfg.run_name}: final metrics", shown or metrics)
            print(f"Run folder: {out}")
        except Exception as err:  # noqa: BLE001
            log.warning("could not write the final metrics summary: %s", err)
    return metrics


_SWEEP_NAME_SKIP = ("experiment", "run_name", "hparams_search")  # keys that separate runs already, name them, or
# are the same for every job of a sweep


def sweep_run_name(run_name: str, task_overrides: list[str], job_num: int, swept: Iterable[str] = ()) -> str:
    """The run name of one job of a Hydra multirun (``-m``): ``<run_name>-<its overrides>``.

    Every job of a sweep would otherwise share ``outputs/<experiment>/<run_name>/`` and its wandb id, and with
    ``resume: true`` each job would resume the previous job's ``last.ckpt``. The job's own overrides (without
    ``experiment``, ``run_name`` and ``paths.*``, which already give it a folder) name it, so the same sweep
    command resumes every job from its own folder; the job number when nothing is left; long names end in a
    hash of the full text. The keys in ``swept`` (the sweeper's ``params``, e.g. Optuna's search space) come first,
    so that what differs between the jobs stays readable before the hash.
    """
    swept = set(swept)

    def key(override: str) -> str:
        return override.split("=", 1)[0].lstrip("+~")

    kept = [o for o in task_overrides if key(o) not in _SWEEP_NAME_SKIP and not key(o).startswith("paths.")]
    suffix = ",".join(sorted(kept, key=lambda o: (key(o) not in swept, o))) or f"job{job_num}"
    safe = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", suffix)
    if len(safe) > 80:
        safe = f"{safe[:60]}-{hashlib.sha1(suffix.encode()).hexdigest()[:10]}"
    return f"{run_name}-{safe}"


def _name_sweep_job(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return
    params = hc.sweeper.get("params") or {}
    name = sweep_run_name(str(cfg.run_name), list(hc.overrides.task), int(hc.job.num), swept=list(params))
    with open_dict(cfg):
        cfg.run_name = name
    print(f"multirun job {hc.job.num}: run name {name}")


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    _name_sweep_job(cfg)
    metrics = run(cfg)
    key = str(cfg.get("optimized_metric") or cfg.monitor)
    if key not in metrics:
        log.warning("optimized_metric %s is not among the run's final metrics (%s): a sweeper gets NaN", key,
                    ", ".join(sorted(metrics)) or "none")
        return math.nan
    return metrics[key]  # for Hydra sweepers (hparams_search=...)


if __name__ == "__main__":
    main()

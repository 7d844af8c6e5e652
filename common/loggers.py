"""Loggers that never stop training: wandb (offline when no credentials), CSV, and rank-0 media helpers.

`SafeWandbLogger` turns every wandb failure into one warning and keeps training; `log_image` / `log_video` log
to wandb on rank 0 only and silently do nothing when there is no wandb logger.
"""

from __future__ import annotations

import csv
import logging
import netrc
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


def wandb_credentials_configured() -> bool:
    """True when a W&B API key is available (env var or ~/.netrc entry for api.wandb.ai)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def sanitize_run_id(name: str) -> str:
    """W&B run ids may not contain '/', spaces and a few other characters."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", name)[:128]


class SafeWandbLogger(WandbLogger):
    """WandbLogger whose logging problems become a warning instead of an exception."""

    _warned: set[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._warned = set()
        self.broken = False

    def _fail(self, what: str, err: BaseException) -> None:
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(f"wandb {what} failed ({type(err).__name__}: {err}); training continues", stacklevel=3)

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        if self.broken:
            return
        try:
            super().log_metrics(metrics, step)
        except Exception as err:  # noqa: BLE001 - logging must never stop training
            self._fail("log_metrics", err)

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        if self.broken:
            return
        try:
            super().log_hyperparams(params)
        except Exception as err:  # noqa: BLE001
            self._fail("log_hyperparams", err)

    @rank_zero_only
    def log_image(self, key, images, step=None, **kwargs) -> None:
        if self.broken:
            return
        try:
            super().log_image(key, images, step, **kwargs)
        except Exception as err:  # noqa: BLE001
            self._fail("log_image", err)

    @rank_zero_only
    def log_video(self, key, videos, step=None, **kwargs) -> None:
        if self.broken:
            return
        try:
            super().log_video(key, videos, step, **kwargs)
        except Exception as err:  # noqa: BLE001
            self._fail("log_video", err)

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        try:
            super().after_save_checkpoint(checkpoint_callback)
        except Exception as err:  # noqa: BLE001
            self._fail("after_save_checkpoint", err)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        try:
            super().finalize(status)
        except Exception as err:  # noqa: BLE001
            self._fail("finalize", err)


@dataclass(frozen=True)
class RunState:
    """What a logger needs to know about the run beyond its config; ``common.train`` passes it to every logger
    config that is a ``_partial_`` (``configs/logger/``)."""

    resume_step: int | None = None  # global step of the checkpoint a resumed run starts from; None: a fresh start
    fresh_over_existing: bool = False  # a fresh start (resume=false) in a folder that held an earlier run


def build_wandb_logger(
    save_dir: str,
    project: str,
    run_id: str,
    name: str,
    group: str | None = None,
    mode: str = "auto",
    tags: list[str] | None = None,
    init_timeout: int = 60,
    run_state: RunState | None = None,
) -> SafeWandbLogger | None:
    """A wandb logger for this run, offline when no credentials are configured; None if wandb cannot start.

    ``mode``: ``auto`` (online with credentials, else offline), ``online``, ``offline`` or ``disabled``.
    ``run_id`` is stable per run (``<experiment>-<run_name>``), so a resumed run continues the same wandb run; a
    fresh start over an earlier run (``run_state.fresh_over_existing``) gets a new id (a timestamp is appended).
    """
    if mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        return None
    if run_state is not None and run_state.fresh_over_existing:
        run_id += time.strftime("-%Y%m%d-%H%M%S")
    env_mode = os.environ.get("WANDB_MODE")
    if mode == "auto":
        mode = env_mode if env_mode in ("online", "offline") else (
            "online" if wandb_credentials_configured() else "offline")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    try:
        import wandb

        wandb_logger = SafeWandbLogger(
            save_dir=save_dir, project=project, id=sanitize_run_id(run_id), name=name, group=group,
            offline=(mode == "offline"), resume="allow", tags=tags,
            settings=wandb.Settings(init_timeout=init_timeout, silent=True),
        )
        if rank_zero_only.rank == 0:
            _ = wandb_logger.experiment  # start it now, so a failure is caught here and not mid-training
            if mode == "offline":
                run_dir = Path(wandb_logger.experiment.dir).parent
                print(f"wandb: offline (no W&B credentials). Run folder: {run_dir}\n"
                      f"wandb: upload it later with: wandb sync {run_dir}")
        return wandb_logger
    except Exception as err:  # noqa: BLE001 - a logging problem is a warning, never a stop
        warnings.warn(f"wandb could not start ({type(err).__name__}: {err}); continuing with CSV logs only",
                      stacklevel=2)
        return None


class _ResumableCSVWriter(ExperimentWriter):
    """Lightning's CSV writer, except for what it does with an existing ``metrics.csv``: Lightning deletes it
    (a resumed run lost every row logged before the interruption) or, when it survives, crashes on the first
    new column because it does not know the file's header. Here a resumed run (``keep_before_step`` set) keeps
    the rows logged before its checkpoint's global step, drops the interrupted run's rows from there on (the
    resumed run logs them again) and continues the file's header; a fresh start moves the old file aside."""

    def __init__(self, log_dir: str, keep_before_step: int | None) -> None:
        self._keep_before_step = keep_before_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if self._keep_before_step is None:
            aside = path.with_name(f"metrics.prev-{time.strftime('%Y%m%d-%H%M%S')}.csv")
            path.rename(aside)
            log.info("fresh start: the earlier %s was moved to %s", path, aside.name)
            return
        with path.open(newline="") as file:
            reader = csv.DictReader(file)
            fieldnames = list(reader.fieldnames or [])
            rows = list(reader)
        try:
            kept = [row for row in rows if float(row["step"]) < self._keep_before_step]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: a row without a numeric 'step' ({err}); move the file away to resume") from err
        self.metrics_keys = sorted(fieldnames)
        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)
        log.info("resume: %s keeps %d rows logged before step %d (%d later rows of the interrupted run dropped)",
                 path, len(kept), self._keep_before_step, len(rows) - len(kept))


class ResumableCSVLogger(CSVLogger):
    """CSV metrics that survive a resume: see :class:`_ResumableCSVWriter`. Rows are also flushed to disk after
    every checkpoint, so a run killed without a shutdown (SIGKILL, preemption) keeps the rows its checkpoint
    covers."""

    def __init__(self, *args: Any, keep_before_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._keep_before_step = keep_before_step

    @property
    @rank_zero_experiment
    def experiment(self) -> _ResumableCSVWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumableCSVWriter(self.log_dir, self._keep_before_step)
        return self._experiment

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        self.save()


def build_csv_logger(save_dir: str, name: str = "csv", run_state: RunState | None = None) -> ResumableCSVLogger:
    """CSV metrics in ``<save_dir>/<name>/metrics.csv`` (one stable folder). ``run_state.resume_step``: the global
    step of the checkpoint a resumed run starts from (rows from that step on are dropped and logged again); ``None``
    for a fresh start (an existing file is moved aside, never deleted)."""
    resume_step = run_state.resume_step if run_state is not None else None
    return ResumableCSVLogger(save_dir=save_dir, name=name, version="", keep_before_step=resume_step)


def _wandb_loggers(module) -> list[WandbLogger]:
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return []
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def _is_rank_zero(module) -> bool:
    trainer = getattr(module, "_trainer", None)
    return trainer is None or trainer.is_global_zero


def log_image(module, key: str, image: np.ndarray, caption: str | None = None) -> None:
    """Log one image ``[H, W, 3] uint8`` to wandb on rank 0; no-op without a wandb logger; never raises."""
    if not _is_rank_zero(module):
        return
    for lg in _wandb_loggers(module):
        try:
            lg.log_image(key, [np.ascontiguousarray(image)], step=module.global_step,
                         caption=[caption] if caption else None)
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"log_image({key}) failed: {err}", stacklevel=2)


def log_video(module, key: str, frames: np.ndarray, fps: int = 30, fmt: str = "gif") -> None:
    """Log a video ``[T, H, W, 3] uint8`` to wandb on rank 0; no-op without a wandb logger; never raises."""
    if not _is_rank_zero(module):
        return
    loggers = _wandb_loggers(module)
    if not loggers:
        return
    try:
        import wandb

        video = wandb.Video(np.ascontiguousarray(frames.transpose(0, 3, 1, 2)), fps=fps, format=fmt)
        for lg in loggers:
            lg.experiment.log({key: video, "trainer/global_step": module.global_step})
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"log_video({key}) failed: {err}", stacklevel=2)


def finish_wandb() -> None:
    """Close the current wandb run if any (multirun-safe); never raises."""
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"wandb.finish() failed: {err}", stacklevel=2)


__all__ = ["Logger", "SafeWandbLogger", "build_csv_logger", "build_wandb_logger", "finish_wandb",
           "log_image", "log_video", "wandb_credentials_configured"]

"""Training callbacks shared by every experiment: progress display, RNG-state resume, final metrics table.

`progress_bar()` picks a rich bar in a terminal and plain lines in CI logs; `RNGStateCallback` makes a resumed
run continue with the random state the uninterrupted run had, so resume at an epoch boundary is exact. `EMA` is
Lightning's `EMAWeightAveraging` without its cold-start hazard.
"""

from __future__ import annotations

import os
import random
import sys
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.callbacks import EMAWeightAveraging, ProgressBar, RichProgressBar


def _fmt(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class PlainProgress(ProgressBar):
    """Progress as plain lines (no carriage returns), for CI logs and files."""

    def __init__(self, every_n_steps: int = 20) -> None:
        super().__init__()
        self.every = every_n_steps
        self._enabled = True
        self._t0 = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, trainer: pl.Trainer, msg: str) -> None:
        if self._enabled and trainer.is_global_zero:
            print(msg, flush=True)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = batch_idx + 1
        total = self.total_train_batches
        if n % self.every == 0 or (isinstance(total, int) and n == total):
            rate = n / max(time.perf_counter() - self._t0, 1e-9)
            metrics = {k: _fmt(v) for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
            self._print(trainer, f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} "
                                 f"step {n}/{total} ({rate:.2f} it/s) "
                                 + " ".join(f"{k}={v}" for k, v in metrics.items()))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        vals = {k: _fmt(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if vals:
            self._print(trainer, f"epoch {trainer.current_epoch + 1} validation: "
                                 + " ".join(f"{k}={v}" for k, v in sorted(vals.items())))


def progress_bar(kind: str = "auto", every_n_steps: int = 20) -> ProgressBar:
    """``rich`` in an interactive terminal, ``plain`` lines otherwise (CI, files, pipes)."""
    if kind == "auto":
        interactive = sys.stdout.isatty() and not os.environ.get("CI")
        kind = "rich" if interactive else "plain"
    if kind == "rich":
        return RichProgressBar()
    if kind == "plain":
        return PlainProgress(every_n_steps=every_n_steps)
    raise ValueError(f"progress bar kind must be auto, rich or plain, got {kind!r}")


class RNGStateCallback(pl.Callback):
    """Save the python / numpy / torch RNG states in checkpoints and restore them when training resumes.

    Lightning restores weights, optimiser and loop state but not the global random state, so without this a
    resumed run shuffles and drops out differently from the uninterrupted run. States are applied at
    ``on_train_start`` (after any sanity check, which also draws random numbers).

    It also restarts the training data iterator of a resumed run at the right epoch. Lightning creates that
    iterator while it sets the run up (to count the batches), before it restores the loop state and before it
    tells the sampler the epoch; loader workers fetch ahead as soon as it exists, so a run resumed at epoch k
    would see epoch 0's order and worker seeds. Here the sampler gets epoch k and the iterator is made again.
    """

    def __init__(self) -> None:
        self._pending: dict | None = None

    @staticmethod
    def capture() -> dict:
        # Plain ints, tuples and tensors only, so checkpoints still load with torch.load(weights_only=True).
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {"python": random.getstate(),
                 "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
                 "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["rng_states"] = self.capture()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._pending = checkpoint.get("rng_states")

    def on_train_start(self, trainer, pl_module) -> None:
        if self._pending is None:
            return
        self._restart_train_iterator(trainer)
        s = self._pending
        random.setstate(s["python"])
        kind, keys, pos, has_gauss, gauss = s["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(s["torch"])
        if "cuda" in s and torch.cuda.is_available():
            try:
                torch.cuda.set_rng_state_all(s["cuda"])
            except RuntimeError:
                pass  # different number of devices: keep the freshly seeded CUDA state
        self._pending = None

    @staticmethod
    def _restart_train_iterator(trainer) -> None:
        loop = trainer.fit_loop
        fetcher, loaders = getattr(loop, "_data_fetcher", None), getattr(loop, "_combined_loader", None)
        if fetcher is None or loaders is None:
            warnings.warn("resume: Lightning's fit loop has no _data_fetcher / _combined_loader (another "
                          "Lightning version?); the resumed epoch may start with another data order", stacklevel=2)
            return
        if getattr(loop, "restarted_mid_epoch", False):  # a mid-epoch checkpoint: Lightning's own restart applies
            return
        epoch = loop.epoch_progress.current.processed
        for loader in loaders.flattened:
            _set_sampler_epoch(loader, epoch)
        iter(fetcher)  # a new iterator (and workers) for this epoch's order and seeds


class EMA(EMAWeightAveraging):
    """Exponential moving average of the weights, used for validation, checkpoints (``state_dict``; the raw weights
    go to ``current_model_state``) and after training.

    Lightning's callback copies the model when fit *begins*, before ``LightningModule.setup`` loads pretrained or
    Stage 1 weights, and that copy is what it validates, saves and finally writes back into the model until the
    first average update. A run shorter than ``update_starting_at_step`` thus ended with its initial random
    weights. Here, until averaging has started, the average is refreshed from the current weights wherever it is
    used.
    """

    def _sync_until_started(self, pl_module: pl.LightningModule) -> None:
        avg = getattr(self, "_average_model", None)
        if avg is not None and int(avg.n_averaged) == 0:
            avg.module.load_state_dict(pl_module.state_dict())

    # Synced only where the average is used (not per training step): validation, checkpoints, the end of fit.
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_until_started(pl_module)
        super().on_validation_epoch_start(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._sync_until_started(pl_module)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_until_started(pl_module)
        super().on_train_end(trainer, pl_module)


def redirect_monitor(trainer: pl.Trainer, old: str, new: str) -> list[pl.Callback]:
    """Point every checkpoint callback that monitors ``old`` at ``new`` instead (a metric that is no longer
    computed would make ``ModelCheckpoint`` raise at the next validation); returns the callbacks changed."""
    changed = [cb for cb in trainer.checkpoint_callbacks if getattr(cb, "monitor", None) == old]
    for cb in changed:
        cb.monitor = new
    return changed

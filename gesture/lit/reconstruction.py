"""What the two motion-reconstruction LightningModules (the per-part VQ-VAEs and the FGD motion encoder) share: the
position / velocity / acceleration terms, their weighted sum, the val / test means with the mean-pose baseline, and
the optimiser with its per-epoch scheduler."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from common.shapes import assert_same_shape

EVAL_TERMS = ("rec", "vel", "rec_mean_baseline")


def motion_reconstruction_terms(x_hat: torch.Tensor, x: torch.Tensor, acc: bool = True) -> dict[str, torch.Tensor]:
    """MSE of positions, velocities (first differences) and, with ``acc``, accelerations (second differences).

    ``x_hat, x [b, T, d] -> {"rec", "vel"[, "acc"]}`` scalars; ``T >= 3`` with ``acc``.
    """
    assert_same_shape(x_hat, x, "x_hat", "x")
    vel_hat, vel = x_hat.diff(dim=1), x.diff(dim=1)
    terms = {"rec": F.mse_loss(x_hat, x), "vel": F.mse_loss(vel_hat, vel)}
    if acc:
        terms["acc"] = F.mse_loss(vel_hat.diff(dim=1), vel.diff(dim=1))
    return terms


class ReconstructionModule(L.LightningModule):
    """Base of ``VQModule`` and ``MotionEncoderModule``.

    ``optimizer`` / ``scheduler``: Hydra ``_partial_``s (``params -> Optimizer``, ``Optimizer -> LRScheduler`` or
    ``None``; the scheduler is stepped per epoch and may monitor ``val/rec``). ``weights``: per term of
    ``motion_reconstruction_terms``. Subclasses implement ``_eval_step(batch, stage)`` and report through
    ``log_train`` and ``update_eval``; ``val/rec_mean_baseline`` is the MSE of predicting the training mean, i.e.
    ``mean(x^2)`` in normalised space: a model that is not clearly below it has learnt nothing.
    """

    def __init__(self, optimizer: Callable[..., torch.optim.Optimizer], scheduler: Callable[..., Any] | None,
                 weights: Mapping[str, float]) -> None:
        super().__init__()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.weights = dict(weights)
        for stage in ("val", "test"):
            for name in EVAL_TERMS:
                setattr(self, f"{stage}_{name}", MeanMetric())

    def weighted_loss(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[k] * terms[k] for k in self.weights)

    def log_train(self, loss: torch.Tensor, terms: Mapping[str, torch.Tensor], batch_size: int) -> None:
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, batch_size=batch_size)

    def update_eval(self, stage: str, terms: Mapping[str, torch.Tensor], target: torch.Tensor) -> None:
        """Accumulate ``rec``, ``vel`` and the mean-pose baseline of ``target [b, T, d]`` (weighted by its size)."""
        values = {"rec": terms["rec"], "vel": terms["vel"], "rec_mean_baseline": target.pow(2).mean()}
        for name, value in values.items():
            metric = getattr(self, f"{stage}_{name}")
            metric.update(value, weight=target.numel())
            self.log(f"{stage}/{name}", metric, prog_bar=name == "rec", batch_size=target.shape[0])

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        raise NotImplementedError

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return opt
        scheduler = {"scheduler": self.scheduler_factory(opt), "interval": "epoch", "monitor": "val/rec"}
        return {"optimizer": opt, "lr_scheduler": scheduler}

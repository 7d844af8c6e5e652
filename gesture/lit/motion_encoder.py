"""Training wiring for the FGD motion encoder (``gesture.models.motion_encoder.MotionEncoder``): reconstruction of the
normalised windows from ``GestureDataModule``; ``make train-fgd`` = ``python -m common.train experiment=motion_encoder``.
The checkpoint carries the encoder config and the training statistics, so ``load_motion_encoder`` needs nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from common.shapes import expect_shape
from gesture.lit.reconstruction import ReconstructionModule, motion_reconstruction_terms
from gesture.models.motion_encoder import CONFIG_KEY, MotionEncoder

log = logging.getLogger(__name__)


class MotionEncoderModule(ReconstructionModule):
    """Trains ``encoder`` to reconstruct ``batch["motion"] [b, T, 320]`` (normalised) through its bottleneck.

    Args:
        encoder: the model (attribute name ``encoder`` is the checkpoint prefix ``load_motion_encoder`` reads).
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``).
        scheduler: ``Optimizer -> LRScheduler`` or ``None``; stepped per epoch, may monitor ``val/rec``.
        rec_weight, vel_weight: weights of the position and velocity (first difference) MSE.

    At ``setup`` the datamodule's training ``stats`` (mean, std) are copied into the encoder, so its checkpoint
    normalises raw motion by itself. ``val/rec_mean_baseline`` is the MSE of predicting the training mean.
    """

    def __init__(
        self,
        encoder: MotionEncoder,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        rec_weight: float = 1.0,
        vel_weight: float = 1.0,
    ) -> None:
        super().__init__(optimizer, scheduler, {"rec": rec_weight, "vel": vel_weight})
        self.save_hyperparameters(ignore=["encoder", "optimizer", "scheduler"])
        self.encoder = encoder

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        stats = getattr(datamodule, "stats", None)
        if stats is None:
            raise RuntimeError("MotionEncoderModule needs a datamodule with `stats` (mean/std of the training "
                               "split), e.g. gesture.data.datamodule.GestureDataModule")
        self.encoder.set_stats(stats["mean"], stats["std"])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [b, T, pose_dim]`` normalised ``-> (x_hat [b, T, in_dim], z [b, T', latent])``."""
        return self.encoder(x)

    def _terms(self, batch: dict[str, torch.Tensor], crop: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        x = expect_shape(batch["motion"], (None, None, self.encoder.pose_dim), 'batch["motion"]')
        if crop:  # whole test clips: drop the < 2**down frames that do not fit
            factor = 2**self.encoder.down
            x = x[:, : x.shape[1] // factor * factor]
        x_hat, _ = self.encoder(x)
        target = self.encoder.select(x)
        return motion_reconstruction_terms(x_hat, target, acc=False), target

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        terms, target = self._terms(batch)
        loss = self.weighted_loss(terms)
        self.log_train(loss, terms, target.shape[0])
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        terms, target = self._terms(batch, crop=stage == "test")
        self.update_eval(stage, terms, target)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = dict(self.encoder.config)

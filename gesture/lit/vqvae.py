"""Training wiring for one per-part VQ-VAE (``gesture.models.vqvae.VQVAE``) and loading its checkpoint frozen.

``VQModule`` slices its part out of ``batch["motion"] [b, T, 320]`` (``gesture.layout.PARTS``), trains on
reconstruction + velocity + acceleration + VQ losses and reports codebook usage and the quantiser's guard counters.
Checkpoints of ``make train-vqvae`` land in ``${paths.output_root}/vqvae_<part>/vqvae_<part>/checkpoints/last.ckpt``
(see ``default_checkpoint``); ``load_vqvae`` rebuilds the model from one for the generator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common.checkpoint import read_checkpoint
from common.shapes import expect_shape
from gesture.layout import PARTS, POSE_DIM, VQ_PARTS
from gesture.lit.reconstruction import ReconstructionModule, motion_reconstruction_terms
from gesture.models.quantizer import CodebookUsage, Quantizer
from gesture.models.vqvae import VQVAE

log = logging.getLogger(__name__)

CONFIG_KEY = "vqvae_config"  # checkpoint entry holding VQVAE's constructor arguments
STATE_PREFIX = "vqvae."  # VQModule attribute name, prefix of the VQ-VAE weights in the Lightning state dict


class VQModule(ReconstructionModule):
    """Trains one part's VQ-VAE on ``batch["motion"] [b, T, 320]`` normalised by the train mean/std.

    Args:
        vqvae: the model; its ``part`` picks the slice of the frame vector.
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``).
        scheduler: ``Optimizer -> LRScheduler`` or ``None``; stepped per epoch, may monitor ``val/rec``.
        rec_weight, vel_weight, acc_weight: weights of the reconstruction terms; the VQ loss has weight 1
            (its commitment weight ``beta`` lives in the quantiser).

    ``val/rec_mean_baseline`` is the MSE of predicting the per-dimension train mean, i.e. ``mean(x^2)`` in
    normalised space: a model that is not clearly below it has learnt nothing. ``train/vq_nonfinite`` and
    ``train/vq_clamped`` are the quantiser's lifetime guard counters (elements, train and eval calls), summed
    over ranks; ``train/vq_reinit`` counts re-initialised codes.
    """

    def __init__(
        self,
        vqvae: VQVAE,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        rec_weight: float = 1.0,
        vel_weight: float = 1.0,
        acc_weight: float = 1.0,
    ) -> None:
        super().__init__(optimizer, scheduler, {"rec": rec_weight, "vel": vel_weight, "acc": acc_weight})
        self.save_hyperparameters(ignore=["vqvae", "optimizer", "scheduler"])
        self.vqvae = vqvae
        self.part_slice = PARTS[vqvae.part]
        for stage in ("val", "test"):
            setattr(self, f"{stage}_codes", CodebookUsage(vqvae.n_codes))
        # DDP would overwrite every rank's guard counters and usage window with rank 0's at each forward.
        self._ddp_params_and_buffers_to_ignore = [
            f"{name}.{buffer}" for name, module in self.named_modules() if isinstance(module, Quantizer)
            for buffer in module.RANK_LOCAL_BUFFERS
        ]

    def _part(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``batch["motion"] [b, T, 320] -> x [b, T, part_dim]``."""
        motion = expect_shape(batch["motion"], (None, None, POSE_DIM), 'batch["motion"]')
        return motion[..., self.part_slice]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``x [b, T, part_dim] -> (x_hat [b, T, part_dim], vq_loss [], info)``."""
        return self.vqvae(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = self._part(batch)
        x_hat, vq_loss, info = self.vqvae(x)
        terms = motion_reconstruction_terms(x_hat, x)
        loss = self.weighted_loss(terms) + vq_loss
        b = x.shape[0]
        self.log_train(loss, terms, b)
        self.log_dict({"train/vq": vq_loss, "train/perplexity": info["perplexity"], "train/usage": info["usage"]},
                      batch_size=b)
        q = self.vqvae.quantizer
        guards = {"train/vq_nonfinite": q.nonfinite_inputs, "train/vq_clamped": q.clamped_indices}
        self.log_dict({k: v.float() for k, v in guards.items()}, sync_dist=True, reduce_fx="sum", batch_size=b)
        if q.reinit_every > 0:
            self.log("train/vq_reinit", q.reinitialised_codes.float(), batch_size=b)
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        x = self._part(batch)
        factor = 2**self.vqvae.down_t
        x = x[:, : x.shape[1] // factor * factor]  # whole test clips: drop the < 2**down_t frames that don't fit
        x_hat, _, info = self.vqvae(x)
        self.update_eval(stage, motion_reconstruction_terms(x_hat, x), x)
        getattr(self, f"{stage}_codes").update(info["counts"])

    def _log_codes(self, stage: str) -> None:
        codes: CodebookUsage = getattr(self, f"{stage}_codes")
        perplexity, usage = codes.compute()
        self.log_dict({f"{stage}/perplexity": perplexity, f"{stage}/usage": usage})
        codes.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_codes("val")

    def on_test_epoch_end(self) -> None:
        self._log_codes("test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = dict(self.vqvae.config)


def default_checkpoint(part: str, root: str | Path) -> Path:
    """Where ``make train-vqvae`` leaves ``part``'s last checkpoint under the project root ``root``."""
    if part not in VQ_PARTS:
        raise ValueError(f"no VQ-VAE for part {part!r}; parts: {VQ_PARTS}")
    return Path(root) / "outputs" / f"vqvae_{part}" / f"vqvae_{part}" / "checkpoints" / "last.ckpt"


def load_vqvae(path: str | Path, freeze: bool = True) -> VQVAE:
    """Rebuild the ``VQVAE`` saved by ``VQModule`` in the Lightning checkpoint ``path`` (on the CPU).

    Every weight and buffer must match (strict). ``freeze=True`` returns it in eval mode with
    ``requires_grad=False`` everywhere, as the generator uses it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQ-VAE checkpoint not found: {path} (train it with `make train-vqvae`)")
    checkpoint = read_checkpoint(path)
    if CONFIG_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"{path}: not a VQModule checkpoint (needs '{CONFIG_KEY}' and 'state_dict')")
    vqvae = VQVAE(**checkpoint[CONFIG_KEY])
    state = {k[len(STATE_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(STATE_PREFIX)}
    missing, unexpected = vqvae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: VQ-VAE weights do not match its config: missing {missing}, "
                         f"unexpected {unexpected}")
    log.info("loaded VQ-VAE %r from %s (%s)", vqvae.part, path, vqvae.config)
    if freeze:
        vqvae.eval().requires_grad_(False)
    return vqvae

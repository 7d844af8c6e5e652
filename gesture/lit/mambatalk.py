"""LightningModule for the MambaTalk generator: frozen VQ-VAEs, MambaTalk's training passes, validation on windows,
autoregressive testing on whole clips against baselines, and checkpoints that carry everything inference needs.

Thin by design: the network is ``gesture.models.mambatalk``, the loss ``gesture.loss``, the masks
``gesture.masks``, generation ``gesture.generate``, the metrics ``gesture.metrics``; what the checkpoint keeps from the
data is ``gesture.data.info.DataInfo``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

from common.callbacks import redirect_monitor
from common.loggers import log_image
from common.shapes import expect_shape
from gesture.data.info import DataInfo
from gesture.generate import generate
from gesture.layout import PARTS, POSE_DIM, SUB_SLICES, VQ_PARTS
from gesture.lit.vqvae import load_vqvae
from gesture.loss import LossTargets, MambaTalkLoss
from gesture.masks import mask_ratio, random_mask, seed_mask
from gesture.metrics import BASELINES, EvalClip, GestureMetrics, evaluate_baselines, format_comparison
from gesture.models.generator import GestureModel
from gesture.models.mambatalk import MambaTalk
from gesture.models.vqvae import VQVAE
from gesture.render import ParameterView

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "gesture"  # checkpoint entry with generator / VQ-VAE configs and DataInfo
PASSES = ("seed", "random", "random_noword")


def _load_vqvaes(vqvae: Mapping[str, str | Path | VQVAE]) -> dict[str, VQVAE]:
    missing = set(VQ_PARTS) - set(vqvae)
    if missing:
        raise ValueError(f"vqvae: missing parts {sorted(missing)}; give a checkpoint path or a VQVAE per part")
    out = {}
    for p in VQ_PARTS:
        v = vqvae[p]
        out[p] = v if isinstance(v, VQVAE) else load_vqvae(v, freeze=True)
        out[p].eval().requires_grad_(False)
    return out


# --------------------------------------------------------------------------------------------------------------
# LightningModule
# --------------------------------------------------------------------------------------------------------------


LATENT_TARGETS = ("quantised", "continuous")


class MambaTalkModule(L.LightningModule):
    """Trains ``MambaTalk`` against frozen per-part VQ-VAEs on batches of ``gesture.data.GestureDataModule``.

    Args:
        generator: ``(num_speakers, vocab_size, audio_dim, code_dim, n_codes) -> MambaTalk`` (a Hydra
            ``_partial_``); built in ``configure_model`` once the data (or ``data_info``) gives those sizes.
        vqvae: per part of ``VQ_PARTS`` a ``VQModule`` checkpoint path or a ``VQVAE``; frozen, always in eval.
        optimizer / scheduler: ``params -> Optimizer`` / ``Optimizer -> LRScheduler`` (``_partial_``).
        loss: the ``MambaTalkLoss``.
        passes: per training step, in order: "seed" (only the first ``pre_frames`` known), "random" (values
            masked with the scheduled ratio), "random_noword" (the same without words). Velocity / acceleration
            terms apply to the seed pass.
        mask_ratio_start / mask_ratio_end: the random-mask ratio over training (by optimizer step).
        pose_length, pre_frames: window and seed length (generation uses hop ``pose_length - pre_frames``).
        decode_from: per part "logits", "latent" or "continuous" (see ``GestureModel``); default: "continuous"
            with ``latent_target="continuous"``, else logits where the classification weight is > 0.
        latent_target: what the latent heads regress: "quantised" (the code of each frame, as MambaTalk) or
            "continuous" (the VQ encoder's output before quantisation). Measured on the synthetic test clips: the
            frozen VQ-VAEs' reconstruction through their codes has BC 0.35 (held frames between code changes, GT
            0.89), through the unquantised latent 0.89 with a 6x lower error, so "continuous" generation can keep
            the beats. The classification heads are trained either way.
        edge_pad: frames of code replication around each decoded window (``GestureModel``).
        boundary_blend: frames over which a later window's continuous parts fade from the previous window's
            last frame (``GestureModel``; 0 = off).
        max_consecutive_nonfinite: a NaN/Inf loss skips its step (counted, ``train/nonfinite_skipped``); this many
            in a row raise.
        fgd_encoder: checkpoint of the FGD motion encoder (``gesture.models.motion_encoder``); ``None``: no FGD.
        val_bc_skip: beat-consistency margin on validation windows (test clips use EMAGE's 60 frames).
        baselines: baselines scored next to the model at test time (``gesture.metrics.BASELINES``).
        streaming_test: test with ``generate(..., streaming=True)``.
        data_info: the data description; ``None`` takes it from the trainer's datamodule in ``setup``.
    """

    def __init__(
        self,
        generator: Callable[..., MambaTalk],
        vqvae: Mapping[str, str | Path | VQVAE],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        loss: MambaTalkLoss | None = None,
        passes: Sequence[str] = ("seed", "random"),
        mask_ratio_start: float = 0.05,
        mask_ratio_end: float = 1.0,
        pose_length: int = 64,
        pre_frames: int = 4,
        decode_from: Mapping[str, str] | None = None,
        latent_target: str = "quantised",
        edge_pad: int = 8,
        boundary_blend: int = 0,
        max_consecutive_nonfinite: int = 10,
        fgd_encoder: str | None = None,
        val_bc_skip: int = 8,
        baselines: Sequence[str] = BASELINES,
        streaming_test: bool = False,
        data_info: DataInfo | Mapping[str, Any] | None = None,
    ) -> None:
        # Plain Python hyperparameters (Hydra passes ListConfig / DictConfig): checkpoints then load with
        # torch.load(weights_only=True), which Lightning uses to resume and to test the best checkpoint.
        passes, baselines = [str(p) for p in passes], [str(k) for k in baselines]
        decode_from = None if decode_from is None else {str(k): str(v) for k, v in decode_from.items()}
        fgd_encoder = None if fgd_encoder is None else str(fgd_encoder)
        super().__init__()
        self.save_hyperparameters(ignore=["generator", "vqvae", "optimizer", "scheduler", "loss", "data_info"])
        bad = [p for p in passes if p not in PASSES]
        if bad or not passes:
            raise ValueError(f"passes must be a non-empty list from {PASSES}, got {list(passes)}")
        if not 1 <= pre_frames < pose_length:
            raise ValueError(f"need 1 <= pre_frames < pose_length, got {pre_frames}, {pose_length}")
        unknown = set(baselines) - set(BASELINES)
        if unknown:
            raise ValueError(f"baselines: unknown {sorted(unknown)}; choose from {BASELINES}")
        self.generator_factory = generator
        self._vqvaes = _load_vqvaes(vqvae)  # registered through self.model in configure_model
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.loss = loss if loss is not None else MambaTalkLoss()
        self.passes = tuple(passes)
        if latent_target not in LATENT_TARGETS:
            raise ValueError(f"latent_target must be one of {LATENT_TARGETS}, got {latent_target!r}")
        if decode_from is not None:
            self.decode_from = dict(decode_from)
        elif latent_target == "continuous":
            self.decode_from = dict.fromkeys(VQ_PARTS, "continuous")
        else:
            self.decode_from = {p: ("logits" if self.loss.cls_w[p] > 0 else "latent") for p in VQ_PARTS}
        self.data_info = DataInfo.from_dict(data_info) if isinstance(data_info, Mapping) else data_info
        self.model: GestureModel | None = None
        self.nonfinite_skipped = 0
        self._consecutive_nonfinite = 0
        self.register_buffer("motion_mean", torch.zeros(POSE_DIM), persistent=False)
        self.register_buffer("motion_std", torch.ones(POSE_DIM), persistent=False)
        self.val_metrics = self._make_metrics(bc_skip=val_bc_skip)
        self.test_metrics = self._make_metrics()
        self._test_clips: list[EvalClip] = []

    # ------------------------------------------------------------------------------------------- building
    def _make_metrics(self, **kw: Any) -> GestureMetrics:
        return GestureMetrics(encoder_ckpt=self.hparams.fgd_encoder, **kw)

    def _resolve_data_info(self) -> DataInfo:
        if self.data_info is None:
            dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            if dm is None or not hasattr(dm, "cache"):
                raise RuntimeError("configure_model: MambaTalkModule needs data_info or a GestureDataModule on the "
                                   "trainer (its setup runs before the model's)")
            self.data_info = DataInfo.from_datamodule(dm)
        return self.data_info

    def setup(self, stage: str) -> None:
        self.configure_model()
        ckpt = self.hparams.fgd_encoder
        if ckpt is not None and self.val_metrics.encoder(POSE_DIM) is None and self._trainer is not None:
            # FGD is skipped (GestureMetrics warned once, naming the reason)
            self._monitor_without_fgd(f"motion encoder {ckpt} unusable")

    def _monitor_without_fgd(self, reason: str) -> None:
        """Training goes on without FGD: checkpoints that were to follow val/fgd follow the validation loss
        instead (one warning), whatever made FGD unavailable: no usable encoder at setup, an encoder window
        longer than the validation windows (no FGD window), an encoder that failed during a validation."""
        if self._trainer is not None and redirect_monitor(self.trainer, "val/fgd", "val/loss"):
            log.warning("FGD is unavailable (%s): the best checkpoint now tracks val/loss; train the encoder "
                        "with `make train-fgd` (data.pose_length no longer than the generator's) to get FGD", reason)

    def configure_model(self) -> None:
        """Build the generator from the data sizes (idempotent). Callbacks may call it before ``setup`` (Lightning's
        weight averaging copies the model in its own ``setup``); the datamodule is set up by then."""
        if self.model is not None:
            return
        info = self._resolve_data_info()
        if len(info.mean) != POSE_DIM or len(info.std) != POSE_DIM:
            raise ValueError(f"data_info: mean/std must have {POSE_DIM} values")
        generator = self.generator_factory(
            num_speakers=info.num_speakers, vocab_size=info.vocab_size, audio_dim=info.audio_dim,
            code_dim={p: v.code_dim for p, v in self._vqvaes.items()},
            n_codes={p: v.n_codes for p, v in self._vqvaes.items()})
        self.model = GestureModel(generator, self._vqvaes, self.decode_from, self.hparams.edge_pad,
                                  self.hparams.boundary_blend)
        mean, std = info.stats()
        contact = SUB_SLICES["contact"]
        generator.set_contact_stats(mean[contact], std[contact])
        self.motion_mean.copy_(mean.to(self.motion_mean.device))
        self.motion_std.copy_(std.to(self.motion_std.device))
        skipped = [p for p in info.zero_variance_parts if p in PARTS]
        if skipped:
            log.warning("parts %s have zero variance in the training data: their loss terms are switched off",
                        skipped)
            self.loss = self.loss.without_parts(skipped)
        self.loss.set_channel_scale(std)

    def denormalise(self, motion: torch.Tensor) -> torch.Tensor:
        """Normalised ``[..., 320]`` -> raw layout vector (new tensor)."""
        return motion * self.motion_std.to(motion) + self.motion_mean.to(motion)

    # ----------------------------------------------------------------------------------------------- steps
    def _batch(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
        motion = expect_shape(batch["motion"], (None, None, POSE_DIM), 'batch["motion"]')
        b, t = motion.shape[:2]
        words = expect_shape(batch["words"], (b, t), 'batch["words"]')
        speaker = expect_shape(batch["speaker"], (b,), 'batch["speaker"]')
        return batch["audio"], words, speaker, motion

    @torch.no_grad()
    def targets(self, motion: torch.Tensor) -> LossTargets:
        """Ground-truth latents and codes of the frozen VQ-VAEs for normalised ``motion [b, t, 320]``."""
        vq = self.model.vqvaes
        indices = {p: vq[p].map2index(motion[..., PARTS[p]]) for p in VQ_PARTS}
        if self.hparams.latent_target == "continuous":
            latents = {p: vq[p].encode(motion[..., PARTS[p]]) for p in VQ_PARTS}
        else:
            latents = {p: vq[p].quantizer.get_codebook_entry(indices[p]) for p in VQ_PARTS}
        contact = SUB_SLICES["contact"]
        raw = motion[..., contact] * self.motion_std[contact].to(motion) + self.motion_mean[contact].to(motion)
        labels = (raw > 0.5).to(motion.dtype)  # the data's 0/1 labels, exactly
        return LossTargets(motion=motion, latents=latents, indices=indices, contact=labels)

    def current_mask_ratio(self) -> float:
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        progress = self.global_step / max(float(total) if math.isfinite(total) else 1.0, 1.0)
        return mask_ratio(progress, self.hparams.mask_ratio_start, self.hparams.mask_ratio_end)

    def _pass(self, name: str, audio, words, speaker, motion, targets: LossTargets, ratio: float
              ) -> dict[str, torch.Tensor]:
        b, t = motion.shape[:2]
        if name == "seed":
            mask = seed_mask(b, t, self.hparams.pre_frames, motion.device)
        else:
            mask = random_mask(b, t, ratio, motion.device)
        out = self.model(audio, words, speaker, motion, mask, use_word=name != "random_noword")
        parts = self.loss.decoded_parts
        decoded = self.model.decode_latents(out, parts) if name == "seed" and parts else None
        return self.loss(out, targets, decoded)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor | None:
        audio, words, speaker, motion = self._batch(batch)
        targets = self.targets(motion)
        ratio = self.current_mask_ratio()
        total = motion.new_zeros(())
        logs: dict[str, torch.Tensor] = {}
        for name in self.passes:
            terms = self._pass(name, audio, words, speaker, motion, targets, ratio)
            total = total + terms["loss"]
            logs.update({f"train/{name}/{k}": v.detach() for k, v in terms.items()})
        b = motion.shape[0]
        local_bad = not bool(torch.isfinite(total.detach()))
        skip = self.trainer.strategy.reduce_boolean_decision(local_bad, all=False) if self._trainer else local_bad
        if skip:
            self.nonfinite_skipped += 1
            self._consecutive_nonfinite += 1
            self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), batch_size=b)
            log.warning("non-finite loss at step %d (clips %s); step skipped (%d so far, %d in a row)",
                        self.global_step, list(batch.get("clip", []))[:4], self.nonfinite_skipped,
                        self._consecutive_nonfinite)
            if self._consecutive_nonfinite >= self.hparams.max_consecutive_nonfinite:
                raise RuntimeError(f"{self._consecutive_nonfinite} consecutive non-finite losses: stopping "
                                   "(check the data and the learning rate)")
            return None  # automatic optimisation: no backward, no optimizer step
        self._consecutive_nonfinite = 0
        self.log("train/loss", total, prog_bar=True, batch_size=b)
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), batch_size=b)
        self.log("train/mask_ratio", ratio, batch_size=b)
        self.log_dict({k: v for k, v in logs.items() if not k.endswith("/loss")}, batch_size=b)
        self._log_vq_guards(b)
        return total

    def _log_vq_guards(self, batch_size: int) -> None:
        """The frozen VQ-VAEs' quantizer guards (non-finite latents replaced, code indices clamped): running totals,
        so a predicted latent that turned NaN shows up in the logs instead of as silently clamped codes."""
        guards = {}
        for p in VQ_PARTS:
            q = self.model.vqvaes[p].quantizer
            guards[f"train/vq_{p}_nonfinite"] = q.nonfinite_inputs.float()
            guards[f"train/vq_{p}_clamped"] = q.clamped_indices.float()
        self.log_dict(guards, sync_dist=True, reduce_fx="sum", batch_size=batch_size)

    def _generated_window(self, audio, words, speaker, motion) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Seed-only pass -> (decoded motion [b, t, 320] from the predicted codes, loss terms)."""
        b, t = motion.shape[:2]
        out = self.model(audio, words, speaker, motion, seed_mask(b, t, self.hparams.pre_frames, motion.device))
        targets = self.targets(motion)
        parts = self.loss.decoded_parts
        decoded = self.model.decode_latents(out, parts) if parts else None
        terms = self.loss(out, targets, decoded)
        return self.model.decode_codes(self.model.codes(out), out.global_motion), terms

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        audio, words, speaker, motion = self._batch(batch)
        pred, terms = self._generated_window(audio, words, speaker, motion)
        b = motion.shape[0]
        self.log_dict({f"val/{k}": v for k, v in terms.items()}, batch_size=b, sync_dist=True,
                      prog_bar=False)
        names = [f"{c}@{int(s)}" for c, s in zip(batch["clip"], batch["start"])] if "start" in batch else None
        pred_raw = self.denormalise(pred)
        self.val_metrics.update(pred_raw, batch["motion_raw"], names=names)
        if batch_idx == 0 and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            title = f"{names[0]}: generated from {self.hparams.pre_frames} seed frames" if names else None
            view = ParameterView(pred_raw[0].detach().cpu().numpy(), float(self.data_info.audio["fps"]),
                                 gt=batch["motion_raw"][0].detach().cpu().numpy(), title=title)
            log_image(self, "val/motion", view.background, caption="per-part speed (dashed: GT) and z-scored "
                      "parameters: prediction above ground truth")

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_metrics.compute()
        if "fgd" not in metrics and not self.trainer.sanity_checking:
            if self.hparams.fgd_encoder is None:
                reason = "model.fgd_encoder is null"
            elif not self.val_metrics.fgd_enabled:
                reason = "the motion encoder failed during validation, see the warning above"
            else:
                reason = (f"fewer than 2 FGD windows: the motion encoder reads windows of "
                          f"{self.val_metrics.encoder(POSE_DIM).window} frames, the validation clips are shorter")
            self._monitor_without_fgd(reason)
        self._log_metrics("val", metrics)
        self.val_metrics.reset()

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        audio, words, speaker, motion = self._batch(batch)
        if motion.shape[0] != 1:
            raise ValueError(f"test batches hold one whole clip, got batch size {motion.shape[0]}")
        n = motion.shape[1]
        info = self.data_info
        gen = generate(self.model, audio, words, speaker, motion[:, :self.hparams.pre_frames], n,
                       pose_length=self.hparams.pose_length, pre_frames=self.hparams.pre_frames,
                       sr=int(info.audio["sr"]), fps=float(info.audio["fps"]),
                       streaming=self.hparams.streaming_test)
        pred_raw = self.denormalise(gen.motion)[0]
        gt_raw = batch["motion_raw"][0]
        wave = batch["wave"][0].detach().cpu().numpy() if "wave" in batch else None
        name = batch["clip"][0] if "clip" in batch else f"clip{batch_idx}"
        self.test_metrics.update(pred_raw, gt_raw, wave=wave, sr=int(info.audio["sr"]), fps=float(info.audio["fps"]),
                                 boundaries=gen.boundaries, names=name)
        self._test_clips.append(EvalClip(name=name, motion=gt_raw.detach().cpu().double().numpy(),
                                         speaker=int(speaker[0]), wave=wave, sr=int(info.audio["sr"]),
                                         fps=float(info.audio["fps"])))

    def on_test_epoch_end(self) -> None:
        metrics = self.test_metrics.compute()
        self._log_metrics("test", metrics)
        columns = {"model": metrics}
        if self.hparams.baselines and len(self._test_clips) >= 2 and self.trainer.world_size == 1:
            mean, std = (np.asarray(v, np.float64) for v in (self.data_info.mean, self.data_info.std))
            results = evaluate_baselines(self._test_clips, mean, std, self._make_metrics,
                                         kinds=self.hparams.baselines, seed=0)
            for kind, values in results.items():
                self._log_metrics(f"test/baseline_{kind}", values, sync=False)
                columns[kind] = values
        self._print_comparison(columns)
        self.test_metrics.reset()
        self._test_clips = []

    @rank_zero_only
    def _print_comparison(self, columns: Mapping[str, Mapping[str, float]]) -> None:
        print("\nGesture test metrics (model vs baselines):\n" + format_comparison(columns), flush=True)

    def _log_metrics(self, prefix: str, metrics: Mapping[str, float], sync: bool = False) -> None:
        # GestureMetrics.compute already gathers over ranks: every rank logs the same values.
        if metrics:
            self.log_dict({f"{prefix}/{k}": float(v) for k, v in metrics.items()}, sync_dist=sync)

    # ------------------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        opt = self.optimizer_factory([p for p in self.model.generator.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"}}

    # ------------------------------------------------------------------------------------------ checkpoint
    def checkpoint_extras(self) -> dict[str, Any]:
        """What ``gesture.infer`` rebuilds the model from (stored under ``checkpoint["gesture"]``)."""
        return {
            "generator_config": dict(self.model.generator.config),
            "vqvae_configs": {p: dict(v.config) for p, v in self.model.vqvaes.items()},
            "decode_from": dict(self.model.decode_from),
            "edge_pad": int(self.model.edge_pad),
            "boundary_blend": int(self.model.boundary_blend),
            "data_info": self.data_info.to_dict(),
            "pose_length": int(self.hparams.pose_length),
            "pre_frames": int(self.hparams.pre_frames),
            "nonfinite_skipped": int(self.nonfinite_skipped),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.checkpoint_extras()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extras = checkpoint.get(CHECKPOINT_KEY, {})
        self.nonfinite_skipped = int(extras.get("nonfinite_skipped", 0))
        if self.data_info is None and "data_info" in extras:
            self.data_info = DataInfo.from_dict(extras["data_info"])

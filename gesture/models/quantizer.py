"""Nearest-neighbour vector quantiser with a straight-through gradient, guarded against non-finite input.

The guard exists because a NaN encoder output makes the argmin undefined and the codebook lookup crash, but
nothing is hidden: every replaced value and every clamped index is counted in a buffer and warned about once.
Codebook usage / perplexity helpers live here too; training wiring is in ``gesture.lit.vqvae``.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from common.shapes import expect_shape

log = logging.getLogger(__name__)


class QuantizerOutput(NamedTuple):
    z_q: torch.Tensor  # [b, t, d] straight-through: value of the code, gradient of the (sanitised) input
    indices: torch.Tensor  # [b, t] long, always in [0, n_codes)
    loss: torch.Tensor  # scalar: codebook term (unless EMA) + beta * commitment
    perplexity: torch.Tensor  # scalar, exp(entropy of the batch's code histogram)
    usage: torch.Tensor  # scalar, fraction of codes used in the batch
    counts: torch.Tensor  # [n_codes] long, code histogram of the batch


def codebook_stats(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Code histogram ``[n_codes]`` -> ``(perplexity, usage)``: exp(entropy), fraction of codes with count > 0."""
    counts_f = counts.double()
    p = counts_f / counts_f.sum().clamp_min(1.0)
    entropy = -(p * p.clamp_min(1e-30).log()).sum()
    return entropy.exp().float(), (counts > 0).float().mean()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Quantizer(nn.Module):
    """Codebook ``[n_codes, code_dim]`` with nearest-neighbour lookup and straight-through gradients.

    Args:
        n_codes: codebook size.
        code_dim: size of each code (the encoder's output channels).
        beta: commitment weight, ``beta * ||z_e - sg[e]||^2`` (MambaTalk/EMAGE: 1.0).
        ema_decay: ``None`` learns the codebook by gradient (``||sg[z_e] - e||^2``); a float in [0, 1) updates it
            as an exponential moving average of the encoder outputs assigned to each code (no codebook loss).
        reinit_every: if > 0, every ``reinit_every``-th training forward re-initialises the codes that were not
            selected since the previous re-init, from random encoder outputs of the current batch.
        data_init: set every code to a random encoder output of the first training batch (instead of keeping the
            uniform +-1/n_codes initialisation of EMAGE); codes start on the data, so few are dead from step 0.
        eps: Laplace smoothing of the EMA code counts.

    Buffers ``nonfinite_inputs`` and ``clamped_indices`` count (in elements, over the module's lifetime) what the
    guards replaced; ``reinitialised_codes`` counts re-initialised codes (including the ``data_init`` ones).
    Under DDP the buffers in ``RANK_LOCAL_BUFFERS`` must not be broadcast from rank 0 (see ``VQModule``): they
    count what this rank saw.
    """

    RANK_LOCAL_BUFFERS: tuple[str, ...] = ("nonfinite_inputs", "clamped_indices", "window_counts")

    def __init__(
        self,
        n_codes: int = 256,
        code_dim: int = 256,
        beta: float = 1.0,
        ema_decay: float | None = None,
        reinit_every: int = 0,
        data_init: bool = False,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) or None, got {ema_decay}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0 (it keeps unused EMA codes finite), got {eps}")
        self.n_codes, self.code_dim, self.beta = n_codes, code_dim, beta
        self.ema_decay, self.reinit_every, self.data_init, self.eps = ema_decay, reinit_every, data_init, eps
        # EMAGE's initialisation: uniform in +-1/n_codes.
        self.codebook = nn.Parameter(torch.empty(n_codes, code_dim).uniform_(-1.0 / n_codes, 1.0 / n_codes))
        if ema_decay is not None:
            self.codebook.requires_grad_(False)
            self.register_buffer("ema_counts", torch.ones(n_codes))
            self.register_buffer("ema_sums", self.codebook.detach().clone())
        self.register_buffer("nonfinite_inputs", torch.zeros((), dtype=torch.long))
        self.register_buffer("clamped_indices", torch.zeros((), dtype=torch.long))
        self.register_buffer("reinitialised_codes", torch.zeros((), dtype=torch.long))
        self.register_buffer("window_counts", torch.zeros(n_codes, dtype=torch.long))
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))  # training forwards so far
        self._warned: set[str] = set()

    # ---- guards -------------------------------------------------------------------------------------------
    def _warn_once(self, kind: str, message: str, *args) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning(message + " (counted in Quantizer.%s; warned once)", *args, kind)

    def _sanitise(self, z: torch.Tensor, where: str) -> torch.Tensor:
        """Replace NaN/Inf with 0 (the codebook's centre: bounded loss, zero gradient there) and count them."""
        bad = ~torch.isfinite(z)
        n_bad = int(bad.sum())
        if n_bad == 0:
            return z
        self.nonfinite_inputs += n_bad
        self._warn_once(
            "nonfinite_inputs", "Quantizer.%s: %d non-finite values in input of shape %s replaced by 0",
            where, n_bad, tuple(z.shape),
        )
        return torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)

    def _clamp(self, indices: torch.Tensor, where: str) -> torch.Tensor:
        out_of_range = (indices < 0) | (indices >= self.n_codes)
        n_bad = int(out_of_range.sum())
        if n_bad == 0:
            return indices
        self.clamped_indices += n_bad
        self._warn_once(
            "clamped_indices", "Quantizer.%s: %d indices outside [0, %d) clamped",
            where, n_bad, self.n_codes,
        )
        return indices.clamp(0, self.n_codes - 1)

    # ---- lookup -------------------------------------------------------------------------------------------
    def _nearest(self, z: torch.Tensor, where: str) -> torch.Tensor:
        """Finite ``z [..., d]`` -> index of the nearest code ``[...]`` (squared L2, computed in float32)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.detach().reshape(-1, self.code_dim).float()
            codes = self.codebook.detach().float()
            dist2 = flat.pow(2).sum(1, keepdim=True) - 2.0 * flat @ codes.t() + codes.pow(2).sum(1)[None]
            indices = dist2.argmin(dim=1)
        return self._clamp(indices, where).reshape(z.shape[:-1])

    def guard(self, z: torch.Tensor) -> torch.Tensor:
        """``z [b, t, code_dim]`` used as a continuous code (no lookup): non-finite values counted and zeroed."""
        expect_shape(z, (None, None, self.code_dim), "z")
        return self._sanitise(z, "guard")

    def map2index(self, z: torch.Tensor) -> torch.Tensor:
        """``z [b, t, code_dim] -> indices [b, t]`` (long, in range; non-finite input counted and zeroed)."""
        expect_shape(z, (None, None, self.code_dim), "z")
        return self._nearest(self._sanitise(z, "map2index"), "map2index")

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices [...] -> codes [..., code_dim]``; out-of-range indices are counted and clamped."""
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"get_codebook_entry: indices must be an integer tensor, got {indices.dtype}")
        return F.embedding(self._clamp(indices.long(), "get_codebook_entry"), self.codebook)

    # ---- training -----------------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """``z_e [b, t, code_dim] -> QuantizerOutput(z_q [b, t, code_dim], indices [b, t], ...)``."""
        expect_shape(z, (None, None, self.code_dim), "z_e")
        z_clean = self._sanitise(z, "forward")
        if self.training:
            # Before the lookup, so the codebook is not edited after the graph has used it.
            step = int(self.train_steps)
            if (step == 0 and self.data_init) or (step > 0 and self.reinit_every > 0 and step % self.reinit_every == 0):
                self.reinit_dead_codes(z_clean.detach().reshape(-1, self.code_dim))
            self.train_steps += 1
        indices = self._nearest(z_clean, "forward")
        z_q = F.embedding(indices, self.codebook).to(z_clean.dtype)
        commitment = F.mse_loss(z_clean, z_q.detach())
        if self.ema_decay is None:
            loss = F.mse_loss(z_q, z_clean.detach()) + self.beta * commitment
        else:
            loss = self.beta * commitment
        counts = torch.bincount(indices.reshape(-1), minlength=self.n_codes)
        if self.training:
            self.window_counts += counts
            if self.ema_decay is not None:
                self._ema_update(z_clean.detach().reshape(-1, self.code_dim), indices.reshape(-1))
        perplexity, usage = codebook_stats(counts)
        z_q_st = z_clean + (z_q - z_clean).detach()
        return QuantizerOutput(z_q_st, indices, loss, perplexity, usage, counts)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        """Move each code towards the mean of the ``flat [n, d]`` rows assigned to it (Laplace-smoothed counts)."""
        onehot = F.one_hot(indices, self.n_codes).to(flat.dtype)
        counts = onehot.sum(0).float()
        sums = (onehot.t() @ flat).float()
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        decay = self.ema_decay
        self.ema_counts.mul_(decay).add_(counts, alpha=1.0 - decay)
        self.ema_sums.mul_(decay).add_(sums, alpha=1.0 - decay)
        total = self.ema_counts.sum()
        smoothed = (self.ema_counts + self.eps) / (total + self.n_codes * self.eps) * total
        self.codebook.copy_(self.ema_sums / smoothed[:, None])

    @torch.no_grad()
    def reinit_dead_codes(self, candidates: torch.Tensor) -> int:
        """Re-initialise codes unused since the last call from random rows of ``candidates [n, code_dim]``.

        Usage is summed over ranks and rank 0's picks are broadcast, so DDP replicas keep one codebook.
        Returns the number of codes re-initialised; the usage window restarts either way.
        """
        expect_shape(candidates, (None, self.code_dim), "candidates")
        counts = self.window_counts.clone()
        if _distributed():
            dist.all_reduce(counts)
        dead = counts == 0
        n_dead = int(dead.sum())
        if n_dead > 0 and len(candidates) > 0:
            n = len(candidates)
            pick = (torch.randperm(n, device=candidates.device)[:n_dead] if n >= n_dead
                    else torch.randint(n, (n_dead,), device=candidates.device))
            new_codes = candidates[pick].to(self.codebook.dtype)
            if _distributed():
                dist.broadcast(new_codes, src=0)
            self.codebook[dead] = new_codes
            if self.ema_decay is not None:
                self.ema_counts[dead] = 1.0
                self.ema_sums[dead] = new_codes.to(self.ema_sums.dtype)
            self.reinitialised_codes += n_dead
            log.info("Quantizer: re-initialised %d/%d dead codes", n_dead, self.n_codes)
        else:
            n_dead = 0
        self.window_counts.zero_()
        return n_dead


class CodebookUsage(Metric):
    """Code histogram accumulated over an epoch (summed over ranks): ``compute() -> (perplexity, usage)``."""

    full_state_update = False

    def __init__(self, n_codes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n_codes = n_codes
        self.add_state("counts", default=torch.zeros(n_codes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, counts: torch.Tensor) -> None:
        expect_shape(counts, (self.n_codes,), "counts")
        self.counts += counts.long()

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return codebook_stats(self.counts)

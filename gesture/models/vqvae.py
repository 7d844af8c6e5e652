"""Per-part motion VQ-VAE (MambaTalk/EMAGE style): 1-D conv encoder and decoder with residual blocks around a
:class:`~gesture.models.quantizer.Quantizer`. One model per part in ``gesture.layout.VQ_PARTS``; no training
logic here (see ``gesture.lit.vqvae``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from einops import rearrange
from torch import nn

from common.shapes import expect_shape
from gesture.layout import PARTS, VQ_PARTS
from gesture.models.quantizer import Quantizer

log = logging.getLogger(__name__)


class ResBlock1d(nn.Module):
    """``x [b, c, t] -> x + conv1(act(conv3_dilated(act(x))))``, length preserving."""

    def __init__(self, channels: int, dilation: int = 1) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.LeakyReLU(0.2),
            nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation),
            nn.LeakyReLU(0.2),
            nn.Conv1d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [b, c, t] -> [b, c, t]``."""
        return x + self.block(x)


def _res_stack(channels: int, depth: int, dilation_growth: int) -> list[nn.Module]:
    return [ResBlock1d(channels, dilation_growth**i) for i in range(depth)]


class VQVAE(nn.Module):
    """VQ-VAE over one part's slice of the 320-d frame vector.

    Args:
        part: one of ``gesture.layout.VQ_PARTS`` ("face", "body", "hand").
        in_dim: channels of the part; ``None`` takes it from ``gesture.layout.PARTS`` (a given value must match).
        hidden: conv channels.
        code_dim: size of each code (the latent the generator regresses).
        n_codes: codebook size (the generator's number of classes).
        down_t: log2 of the temporal downsampling; 0 = one code per frame (MambaTalk), 1 = T' = T / 2.
        depth: residual blocks at each end, dilations ``dilation_growth ** i``.
        beta, ema_decay, reinit_every, data_init: see :class:`Quantizer`.

    ``config`` holds these arguments (with ``in_dim`` resolved); checkpoints store it to rebuild the model.
    """

    def __init__(
        self,
        part: str,
        in_dim: int | None = None,
        hidden: int = 256,
        code_dim: int = 256,
        n_codes: int = 256,
        down_t: int = 0,
        depth: int = 2,
        beta: float = 1.0,
        dilation_growth: int = 3,
        ema_decay: float | None = None,
        reinit_every: int = 0,
        data_init: bool = False,
    ) -> None:
        super().__init__()
        if part not in VQ_PARTS:
            raise ValueError(f"VQVAE: part must be one of {VQ_PARTS}, got {part!r} (global has no VQ-VAE)")
        layout_dim = PARTS[part].stop - PARTS[part].start
        if in_dim is not None and in_dim != layout_dim:
            raise ValueError(f"VQVAE({part!r}): in_dim {in_dim} != {layout_dim} from gesture.layout.PARTS")
        if down_t < 0:
            raise ValueError(f"VQVAE: down_t must be >= 0, got {down_t}")
        self.part, self.in_dim, self.code_dim, self.down_t = part, layout_dim, code_dim, down_t
        self.config: dict[str, Any] = dict(
            part=part, in_dim=layout_dim, hidden=hidden, code_dim=code_dim, n_codes=n_codes, down_t=down_t,
            depth=depth, beta=beta, dilation_growth=dilation_growth, ema_decay=ema_decay, reinit_every=reinit_every,
            data_init=data_init,
        )
        down = [nn.Sequential(nn.Conv1d(hidden, hidden, 4, stride=2, padding=1), nn.LeakyReLU(0.2))
                for _ in range(down_t)]
        up = [nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv1d(hidden, hidden, 3, padding=1),
                            nn.LeakyReLU(0.2)) for _ in range(down_t)]
        self.encoder = nn.Sequential(
            nn.Conv1d(layout_dim, hidden, 3, padding=1), nn.LeakyReLU(0.2),
            *down,
            *_res_stack(hidden, depth, dilation_growth),
            nn.LeakyReLU(0.2),
            nn.Conv1d(hidden, code_dim, 3, padding=1),
        )
        self.decoder = nn.Sequential(
            nn.Conv1d(code_dim, hidden, 3, padding=1),
            *_res_stack(hidden, depth, dilation_growth),
            nn.LeakyReLU(0.2),
            *up,
            nn.Conv1d(hidden, layout_dim, 3, padding=1),
        )
        self.quantizer = Quantizer(n_codes, code_dim, beta=beta, ema_decay=ema_decay, reinit_every=reinit_every,
                                   data_init=data_init)

    @property
    def n_codes(self) -> int:
        return self.quantizer.n_codes

    def _check_motion(self, x: torch.Tensor) -> None:
        expect_shape(x, (None, None, self.in_dim), f"{self.part} motion")
        if x.shape[1] % (2**self.down_t) != 0:
            raise ValueError(
                f"VQVAE({self.part!r}): T={x.shape[1]} is not divisible by 2**down_t = {2**self.down_t}"
            )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x [b, T, in_dim] -> z_e [b, T / 2**down_t, code_dim]`` (before quantisation)."""
        self._check_motion(x)
        return rearrange(self.encoder(rearrange(x, "b t d -> b d t")), "b c t -> b t c")

    def quantize(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``z_e [b, T', code_dim] -> z_q [b, T', code_dim]`` (straight-through), ``indices [b, T']``, ``stats``
        (``loss``, ``perplexity``, ``usage``, ``counts [n_codes]``)."""
        out = self.quantizer(z_e)
        return out.z_q, out.indices, dict(loss=out.loss, perplexity=out.perplexity, usage=out.usage,
                                          counts=out.counts)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """``z_q [b, T', code_dim] -> x_hat [b, T' * 2**down_t, in_dim]``."""
        expect_shape(z_q, (None, None, self.code_dim), "z_q")
        return rearrange(self.decoder(rearrange(z_q, "b t c -> b c t")), "b d t -> b t d")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``x [b, T, in_dim] -> (x_hat [b, T, in_dim], vq_loss [], info)``; ``info`` has ``indices [b, T']``,
        ``perplexity``, ``usage``, ``counts [n_codes]``."""
        z_q, indices, stats = self.quantize(self.encode(x))
        x_hat = self.decode(z_q)
        vq_loss = stats.pop("loss")
        return x_hat, vq_loss, dict(indices=indices, **stats)

    def map2index(self, x: torch.Tensor) -> torch.Tensor:
        """``x [b, T, in_dim] -> indices [b, T']`` (the generator's classification targets)."""
        return self.quantizer.map2index(self.encode(x))


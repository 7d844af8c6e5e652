"""The motion feature encoder behind FGD: a 1-D conv autoencoder over gesture windows whose pooled bottleneck is
the feature a Fréchet distance compares. The model and its checkpoint loader only; training wiring is in
``gesture.lit.motion_encoder``, the distance itself in ``gesture.metrics``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import nn

from common.checkpoint import read_checkpoint
from common.shapes import expect_shape
from gesture.layout import PARTS, POSE_DIM
from gesture.models.vqvae import ResBlock1d

log = logging.getLogger(__name__)

CONFIG_KEY = "motion_encoder_config"  # checkpoint entry holding MotionEncoder's constructor arguments
STATE_PREFIX = "encoder."  # MotionEncoderModule attribute name, prefix of the weights in the Lightning state dict
EXPERIMENT = "motion_encoder"  # `make train-fgd` = `python -m common.train experiment=motion_encoder`
POOLS = ("mean", "mean_std")


class EncoderLoadError(ValueError):
    """A motion encoder checkpoint is missing, unreadable or does not describe a ``MotionEncoder``."""


def default_encoder_checkpoint(root: str | Path) -> Path:
    """Where ``make train-fgd`` leaves the encoder's last checkpoint under the project root ``root``."""
    return Path(root) / "outputs" / EXPERIMENT / EXPERIMENT / "checkpoints" / "last.ckpt"


def _part_dims(pose_dim: int, parts: Sequence[str] | None) -> list[int]:
    if parts is None:
        return list(range(pose_dim))
    if pose_dim != POSE_DIM:
        raise ValueError(f"MotionEncoder: parts {list(parts)} index the {POSE_DIM}-d layout, but pose_dim is "
                         f"{pose_dim}; use parts=None for another layout")
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ValueError(f"MotionEncoder: parts must be a non-empty subset of {list(PARTS)}, got {list(parts)}")
    return [i for p in parts for i in range(PARTS[p].start, PARTS[p].stop)]


class MotionEncoder(nn.Module):
    """Conv autoencoder over windows of the frame vector, normalised with the training statistics it carries.

    Args:
        pose_dim: size of the frame vector it reads (320 for ``gesture.layout``); a checkpoint of another layout
            is rejected by the metrics instead of being fed the wrong dimensions.
        parts: which ``gesture.layout.PARTS`` it encodes (``None`` = all ``pose_dim`` dims).
        hidden: conv channels.
        latent: bottleneck channels.
        down: number of stride-2 stages; the bottleneck has ``T / 2**down`` steps.
        window: window length it is trained on; FGD cuts clips into windows of this length.
        pool: ``mean`` -> feature = temporal mean of the bottleneck ``[latent]``; ``mean_std`` -> mean and
            standard deviation over time ``[2 * latent]`` (the std makes the feature see jitter and stiffness).

    The buffers ``mean`` / ``std`` ``[pose_dim]`` are the training split's statistics (set by the module at fit
    time, saved in the checkpoint), so ``features`` takes raw (denormalised) motion.
    """

    def __init__(
        self,
        pose_dim: int = POSE_DIM,
        parts: Sequence[str] | None = ("body", "hand", "face", "global"),
        hidden: int = 128,
        latent: int = 32,
        down: int = 2,
        window: int = 64,
        pool: str = "mean_std",
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"MotionEncoder: pool must be one of {POOLS}, got {pool!r}")
        if down < 0 or window % (2**down) != 0:
            raise ValueError(f"MotionEncoder: window {window} must be divisible by 2**down = {2**down}")
        parts = None if parts is None else tuple(parts)
        dims = _part_dims(pose_dim, parts)
        self.pose_dim, self.in_dim, self.latent, self.down, self.window, self.pool = (
            pose_dim, len(dims), latent, down, window, pool)
        self.config: dict[str, Any] = dict(pose_dim=pose_dim, parts=None if parts is None else list(parts),
                                           hidden=hidden, latent=latent, down=down, window=window, pool=pool)
        self.register_buffer("dims", torch.tensor(dims, dtype=torch.long), persistent=False)
        self.register_buffer("mean", torch.zeros(pose_dim))
        self.register_buffer("std", torch.ones(pose_dim))
        stages_down = [nn.Sequential(nn.Conv1d(hidden, hidden, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
                                     ResBlock1d(hidden)) for _ in range(down)]
        stages_up = [nn.Sequential(ResBlock1d(hidden), nn.Upsample(scale_factor=2, mode="nearest"),
                                   nn.Conv1d(hidden, hidden, 3, padding=1), nn.LeakyReLU(0.2)) for _ in range(down)]
        self.encoder = nn.Sequential(nn.Conv1d(self.in_dim, hidden, 3, padding=1), nn.LeakyReLU(0.2), *stages_down,
                                     nn.Conv1d(hidden, latent, 3, padding=1))
        self.decoder = nn.Sequential(nn.Conv1d(latent, hidden, 3, padding=1), nn.LeakyReLU(0.2), *stages_up,
                                     nn.Conv1d(hidden, self.in_dim, 3, padding=1))

    @property
    def feature_dim(self) -> int:
        return self.latent * (2 if self.pool == "mean_std" else 1)

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store the training split's ``mean``, ``std`` ``[pose_dim]`` (copied; the inputs are not kept)."""
        expect_shape(mean, (self.pose_dim,), "mean")
        expect_shape(std, (self.pose_dim,), "std")
        if not bool((std > 0).all()):
            raise ValueError("MotionEncoder.set_stats: std must be positive everywhere (floor it first)")
        self.mean.copy_(mean.detach().to(self.mean))
        self.std.copy_(std.detach().to(self.std))

    def normalise(self, motion_raw: torch.Tensor) -> torch.Tensor:
        """``motion_raw [..., pose_dim] -> [..., pose_dim]`` with the stored statistics (new tensor)."""
        return (motion_raw - self.mean.to(motion_raw)) / self.std.to(motion_raw)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """``x [b, T, pose_dim] -> [b, T, in_dim]``: the dimensions this encoder reads."""
        return x.index_select(-1, self.dims.to(x.device))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x [b, T, pose_dim]`` normalised ``-> z [b, T / 2**down, latent]``; ``T`` divisible by ``2**down``."""
        expect_shape(x, (None, None, self.pose_dim), "motion")
        if x.shape[1] % (2**self.down) != 0:
            raise ValueError(f"MotionEncoder: T={x.shape[1]} is not divisible by 2**down = {2**self.down}")
        return rearrange(self.encoder(rearrange(self.select(x), "b t d -> b d t")), "b c t -> b t c")

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z [b, T', latent] -> x_hat [b, T' * 2**down, in_dim]`` (normalised, the encoded dims only)."""
        expect_shape(z, (None, None, self.latent), "z")
        return rearrange(self.decoder(rearrange(z, "b t c -> b c t")), "b d t -> b t d")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [b, T, pose_dim]`` normalised ``-> (x_hat [b, T, in_dim], z [b, T / 2**down, latent])``."""
        z = self.encode(x)
        return self.decode(z), z

    def pool_features(self, z: torch.Tensor) -> torch.Tensor:
        """``z [b, T', latent] -> features [b, feature_dim]``."""
        mean = z.mean(dim=1)
        if self.pool == "mean":
            return mean
        return torch.cat([mean, z.std(dim=1, unbiased=False)], dim=-1)

    def features(self, motion_raw: torch.Tensor) -> torch.Tensor:
        """``motion_raw [b, T, pose_dim]`` (denormalised) ``-> features [b, feature_dim]``."""
        return self.pool_features(self.encode(self.normalise(motion_raw)))


def load_motion_encoder(path: str | Path) -> MotionEncoder:
    """Rebuild the frozen ``MotionEncoder`` (eval mode, CPU) saved by ``MotionEncoderModule`` at ``path``.

    Raises ``EncoderLoadError`` naming the file when it is missing, unreadable, not an encoder checkpoint, or its
    weights do not match its stored config.
    """
    path = Path(path)
    if not path.is_file():
        raise EncoderLoadError(f"motion encoder checkpoint not found: {path} (train it with `make train-fgd`)")
    try:
        checkpoint = read_checkpoint(path)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a corrupt file
        raise EncoderLoadError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(checkpoint, dict) or CONFIG_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise EncoderLoadError(f"{path}: not a motion encoder checkpoint (needs '{CONFIG_KEY}' and 'state_dict')")
    try:
        encoder = MotionEncoder(**checkpoint[CONFIG_KEY])
    except (TypeError, ValueError) as err:
        raise EncoderLoadError(f"{path}: bad {CONFIG_KEY} {checkpoint[CONFIG_KEY]}: {err}") from err
    state = {k[len(STATE_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(STATE_PREFIX)}
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise EncoderLoadError(f"{path}: weights do not match the stored config: {err}") from err
    log.info("loaded motion encoder from %s (%s)", path, encoder.config)
    return encoder.eval().requires_grad_(False)

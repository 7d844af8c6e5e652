"""Temporal encoder for Stage 2: the last frame's hand token moved towards a weighted average of the window's
tokens (weights from each frame's age and a learnt reliability score), plus, with ``depth`` > 0, a correction from
attention blocks in which the last frame's token attends to all frames' tokens.

Output is ``[b, 1, d]`` by construction (only the last frame is refined). Timestamps enter relative to the
last frame, so dropped frames and irregular spacing need no special case. The average's gate and the attention
path's output projection are zero-initialised: at step 0 the encoder returns the last frame's token unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common.shapes import expect_shape


class TimeEmbedding(nn.Module):
    """Sinusoidal features of a time offset (seconds) over periods ``min_period..max_period``, then an MLP."""

    def __init__(self, dim: int, num_freqs: int = 16, min_period: float = 0.02, max_period: float = 10.0) -> None:
        super().__init__()
        periods = torch.logspace(math.log10(min_period), math.log10(max_period), num_freqs)
        self.register_buffer("omega", 2 * math.pi / periods, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * num_freqs, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, dt: torch.Tensor) -> torch.Tensor:
        """dt [...] seconds -> [..., dim]."""
        phase = dt[..., None] * self.omega
        return self.mlp(torch.cat([phase.sin(), phase.cos()], dim=-1))


class TemporalBlock(nn.Module):
    """Pre-norm cross-attention (query -> context) followed by an MLP, both residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """query [b, 1, d], context [b, t, d] -> [b, 1, d]."""
        query = query + self._attend(self.norm_q(query), self.norm_kv(context))
        return query + self.mlp(self.norm_mlp(query))

    def _attend(self, query: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """``nn.MultiheadAttention(query, kv, kv)`` with its own weights, computed directly: the streaming tracker
        calls this once per frame, where the module's argument handling costs as much as the arithmetic."""
        attn = self.attn
        d, heads = query.shape[-1], attn.num_heads
        w, b = attn.in_proj_weight, attn.in_proj_bias
        q = F.linear(query, w[:d], b[:d])
        k, v = F.linear(kv, w[d:], b[d:]).chunk(2, dim=-1)

        def split(x: torch.Tensor) -> torch.Tensor:  # [b, n, d] -> [b, heads, n, d / heads]
            return x.unflatten(-1, (heads, d // heads)).transpose(1, 2)

        p = attn.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(split(q), split(k), split(v), dropout_p=p)
        return attn.out_proj(out.transpose(1, 2).flatten(2))


class TemporalEncoder(nn.Module):
    """tokens [b, t, d] + timestamps [b, t] -> refined last-frame token [b, 1, d]."""

    def __init__(
        self, dim: int, depth: int = 1, heads: int = 8, mlp_ratio: float = 4.0, dropout: float = 0.0,
        num_freqs: int = 16, min_period: float = 0.02, max_period: float = 10.0, token_noise: float = 0.0,
        gate_scale: float = 1.0, average_tau: float | None = None, last_frame_channels: int = 0,
        reliability: int = 0, reliability_gate: bool = False,
    ) -> None:
        super().__init__()
        self.dim = dim
        # The token's last ``last_frame_channels`` channels stay the last frame's (e.g. the finger token: the window
        # refines what is constant or smooth over it, not the articulation of the frame itself).
        if not 0 <= last_frame_channels <= dim:
            raise ValueError(f"temporal.last_frame_channels must be in [0, {dim}], got {last_frame_channels}")
        self.last_frame_channels = last_frame_channels
        # Training only: independent Gaussian noise on every frame's token, ``token_noise`` times the batch's
        # per-channel std. Stage 1 fitted the training frames, so their tokens are cleaner than unseen frames';
        # without noise the encoder learns to trust the last frame and never to average over the window.
        self.token_noise = token_noise
        # depth 0: no attention path; the refined token is the last frame's moved towards the window's weighted
        # average (below), so Stage 2 can only smooth and re-weight what Stage 1 saw, never add a correction of its
        # own (which the held-out split's 200 sequences are too few to teach without overfitting).
        if depth < 0:
            raise ValueError(f"temporal.depth must be >= 0, got {depth}")
        self.time_embed = TimeEmbedding(dim, num_freqs, min_period, max_period) if depth else None
        self.blocks = nn.ModuleList(TemporalBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim) if depth else None
        self.out = nn.Linear(dim, dim) if depth else None
        if self.out is not None:
            nn.init.zeros_(self.out.weight)  # identity at initialisation: Stage 2 starts as Stage 1
            nn.init.zeros_(self.out.bias)
        # A gated average of the window's tokens, per channel: a path that can learn to smooth in a few dozen
        # steps (attention from LayerNorm-ed features has to learn the tokens' scale first). Zero at start; the
        # gate is ``gate_scale * average_gate`` so that an optimiser step moves it by about gate_scale x lr
        # (at scale 1 it reached 0.08 in Stage 2's 205 steps).
        self.average_gate = nn.Parameter(torch.zeros(dim))
        self.gate_scale = gate_scale
        # average_tau (seconds): the window average weighs frame t by exp(-|t - t_last| / tau), tau learnt per channel
        # from this start, so that frames after a gap count less than recent ones; None: a plain mean.
        self.average_tau = average_tau
        if average_tau is not None:
            if average_tau <= 0:
                raise ValueError(f"temporal.average_tau must be > 0 seconds, got {average_tau}")
            self.log_tau = nn.Parameter(torch.full((dim,), math.log(average_tau)))
        # reliability (hidden width, 0 = off): an MLP scores each frame from its own token, and the score is added
        # to the window average's log-weights, so that a frame whose token looks unreliable (an occluded hand)
        # counts less, the last frame included. Zero-initialised output: the average starts as the time-only one.
        self.reliability = None
        if reliability:
            self.reliability = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, reliability), nn.GELU(),
                                             nn.Linear(reliability, 1))
            nn.init.zeros_(self.reliability[-1].weight)
            nn.init.zeros_(self.reliability[-1].bias)
        # reliability_gate: the average's gate is also scaled by 2 sigmoid(mean score - last frame's score): 1 at
        # initialisation, towards 0 (keep the last frame) when it scores above the window, towards 2 below it.
        if reliability_gate and not reliability:
            raise ValueError("temporal.reliability_gate needs temporal.reliability > 0")
        self.reliability_gate = reliability_gate

    def forward(self, tokens: torch.Tensor, timestamp: torch.Tensor) -> torch.Tensor:
        """tokens [b, t, d], timestamp [b, t] (seconds) -> [b, 1, d] (the last frame, refined)."""
        b, t = tokens.shape[:2]
        expect_shape(tokens, (b, t, self.dim), "temporal tokens")
        expect_shape(timestamp, (b, t), "timestamp")
        if self.training and self.token_noise > 0:
            scale = tokens.detach().flatten(0, 1).std(dim=0).clamp(min=1e-6)  # [d]
            tokens = tokens + self.token_noise * scale * torch.randn_like(tokens)
        last = tokens[:, -1:]
        logits = tokens.new_zeros(b, t, 1)
        if self.average_tau is not None:
            age = (timestamp[:, -1:] - timestamp).abs()[..., None]  # [b, t, 1] seconds
            logits = -age / self.log_tau.exp()  # [b, t, d]
        gate = self.gate_scale * self.average_gate  # [d]
        if self.reliability is not None:
            score = self.reliability(tokens)  # [b, t, 1] per frame
            logits = logits + score
            if self.reliability_gate:
                gate = gate * 2 * torch.sigmoid(score.mean(dim=1, keepdim=True) - score[:, -1:])  # [b, 1, d]
        weights = torch.softmax(logits, dim=1)  # [b, t, d or 1], over the window
        average = (weights * tokens).sum(dim=1, keepdim=True)
        refined = last + gate * (average - last)
        if self.blocks:
            time = self.time_embed(timestamp - timestamp[:, -1:])  # [b, t, d], offsets <= 0 seconds
            query = last + time[:, -1:]
            for block in self.blocks:
                query = block(query, tokens + time)
            refined = refined + self.out(self.norm(query))
        if self.last_frame_channels:
            keep = self.last_frame_channels
            refined = torch.cat([refined[..., :self.dim - keep], last[..., self.dim - keep:]], dim=-1)
        return expect_shape(refined, (b, 1, self.dim), "refined token")

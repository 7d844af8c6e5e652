"""``GestureModel``: the MambaTalk generator and the frozen per-part VQ-VAEs that turn its codes into motion
(``gesture.generate`` runs it over whole clips; ``gesture.lit.mambatalk`` trains it)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from common.shapes import expect_shape
from gesture.layout import PARTS, VQ_PARTS
from gesture.models.mambatalk import GeneratorOutput, MambaTalk
from gesture.models.vqvae import VQVAE

DECODE_SOURCES = ("logits", "latent", "continuous")


def join_parts(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``{part: [b, t, part_dim]}`` for every part of ``gesture.layout.PARTS`` -> ``[b, t, 320]`` (new tensor)."""
    missing = set(PARTS) - set(parts)
    if missing:
        raise ValueError(f"join_parts: missing parts {sorted(missing)}")
    ordered = sorted(PARTS, key=lambda p: PARTS[p].start)
    for p in ordered:
        expect_shape(parts[p], (None, None, PARTS[p].stop - PARTS[p].start), f"{p} motion")
    return torch.cat([parts[p] for p in ordered], dim=-1)


def straight_through(vqvae: VQVAE, latent: torch.Tensor) -> torch.Tensor:
    """Nearest code of each predicted latent, with the gradient of the latent: ``[b, t, d] -> [b, t, d]``."""
    codes = vqvae.quantizer.get_codebook_entry(vqvae.quantizer.map2index(latent))
    return latent + (codes - latent).detach()


class GestureModel(nn.Module):
    """The generator and the frozen per-part VQ-VAEs that decode its codes (always in eval mode, no gradients).

    ``decode_from[part]``: "logits" decodes the argmax code (parts trained with a classification loss), "latent"
    the code nearest to the regressed latent (e.g. the face, whose classification weight is 0), "continuous" the
    regressed latent itself, not snapped to a code (for a generator that regresses the encoder's continuous
    output: per-frame codes turn slow motion into a staircase of held frames and jumps, which the frozen decoder
    does not smooth; see ``MambaTalkModule(latent_target=...)``).
    ``edge_pad``: frames of edge replication around a decoded window (see ``decode``).
    ``boundary_blend``: in ``generate``, each later window's continuous codes and global rotation (not the foot
    contact, a 0 / 1 decision) are shifted to
    continue from the frame before it, the shift fading out over this many frames (0 = off): windows are
    generated separately and otherwise jump where they meet.
    """

    def __init__(self, generator: MambaTalk, vqvaes: Mapping[str, VQVAE],
                 decode_from: Mapping[str, str] | None = None, edge_pad: int = 8, boundary_blend: int = 0) -> None:
        super().__init__()
        missing = set(VQ_PARTS) - set(vqvaes)
        if missing:
            raise ValueError(f"GestureModel: missing VQ-VAEs for parts {sorted(missing)}")
        for p in VQ_PARTS:
            vq = vqvaes[p]
            if vq.part != p:
                raise ValueError(f"GestureModel: the VQ-VAE given for {p!r} was trained on {vq.part!r}")
            if vq.down_t != 0:
                raise ValueError(f"GestureModel: {p} VQ-VAE has down_t={vq.down_t}; the generator needs one code "
                                 "per frame (down_t 0)")
            if vq.code_dim != generator.code_dims[p] or vq.n_codes != generator.codebook_sizes[p]:
                raise ValueError(
                    f"GestureModel: {p} VQ-VAE codes ({vq.n_codes} x {vq.code_dim}) do not match the generator "
                    f"({generator.codebook_sizes[p]} x {generator.code_dims[p]})")
        self.generator = generator
        self.vqvaes = nn.ModuleDict({p: vqvaes[p] for p in VQ_PARTS})
        self.vqvaes.eval().requires_grad_(False)
        sources = {"body": "logits", "hand": "logits", "face": "latent", **dict(decode_from or {})}
        bad = {p: s for p, s in sources.items() if p not in VQ_PARTS or s not in DECODE_SOURCES}
        if bad:
            raise ValueError(f"decode_from: parts must be in {VQ_PARTS} and sources in {DECODE_SOURCES}, got {bad}")
        self.decode_from = sources
        if boundary_blend < 0:
            raise ValueError(f"boundary_blend must be >= 0, got {boundary_blend}")
        self.boundary_blend = boundary_blend
        if edge_pad < 0:
            raise ValueError(f"edge_pad must be >= 0, got {edge_pad}")
        self.edge_pad = edge_pad

    def train(self, mode: bool = True) -> GestureModel:
        """Switch the generator only: the VQ-VAEs stay in eval mode (frozen quantiser statistics, no dropout)."""
        super().train(mode)
        self.vqvaes.eval()
        return self

    def forward(self, *args, **kwargs) -> GeneratorOutput:
        """The generator's forward (see ``MambaTalk.forward``)."""
        return self.generator(*args, **kwargs)

    def indices(self, out: GeneratorOutput) -> dict[str, torch.Tensor]:
        """Codes per VQ part, ``[b, t]`` long, from the logits' argmax or the nearest code to the latent."""
        return {p: (out.logits[p].argmax(dim=-1) if self.decode_from[p] == "logits"
                    else self.vqvaes[p].quantizer.map2index(out.latents[p])) for p in VQ_PARTS}

    def codes(self, out: GeneratorOutput, indices: Mapping[str, torch.Tensor] | None = None
              ) -> dict[str, torch.Tensor]:
        """The vectors each VQ part decodes, ``[b, t, code_dim]``: the codebook entries of ``indices`` (default
        ``self.indices(out)``) for ``logits`` / ``latent`` parts, the regressed latent itself for ``continuous``."""
        indices = self.indices(out) if indices is None else indices
        return {p: (self.vqvaes[p].quantizer.guard(out.latents[p]) if self.decode_from[p] == "continuous"
                    else self.vqvaes[p].quantizer.get_codebook_entry(indices[p])) for p in VQ_PARTS}

    def _decode_padded(self, part: str, z_q: torch.Tensor) -> torch.Tensor:
        """Codes ``[b, t, code_dim] -> [b, t, part_dim]``, the first / last code repeated ``edge_pad`` times around
        the window before decoding (and cropped after): the decoder's zero padding would otherwise distort the
        frames at both ends of every window, and those frames seed the next window."""
        pad = self.edge_pad
        if pad > 0:
            z_q = torch.cat([z_q[:, :1].expand(-1, pad, -1), z_q, z_q[:, -1:].expand(-1, pad, -1)], dim=1)
        decoded = self.vqvaes[part].decode(z_q)
        return decoded[:, pad:decoded.shape[1] - pad]

    def decode_codes(self, codes: Mapping[str, torch.Tensor], global_motion: torch.Tensor) -> torch.Tensor:
        """``{part: [b, t, code_dim]}`` code vectors and ``global_motion [b, t, 7]`` -> motion ``[b, t, 320]``."""
        parts = {p: self._decode_padded(p, codes[p]) for p in VQ_PARTS}
        return join_parts({**parts, "global": global_motion})

    def decode_latents(self, out: GeneratorOutput, parts: Iterable[str] = PARTS) -> dict[str, torch.Tensor]:
        """Differentiable decoding for training losses: ``{part: [b, t, part_dim]}`` for ``parts``, VQ parts as the
        straight-through nearest codes of the predicted latents (the latents themselves for ``continuous`` parts)
        through the frozen decoders, "global" as regressed."""
        def latent_codes(p: str) -> torch.Tensor:
            if self.decode_from[p] == "continuous":
                return out.latents[p]
            return straight_through(self.vqvaes[p], out.latents[p])

        return {p: (out.global_motion if p == "global" else self._decode_padded(p, latent_codes(p))) for p in parts}

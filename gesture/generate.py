"""Autoregressive gesture generation over whole clips: windows of ``pose_length`` frames overlapping by
``pre_frames``, each seeded with the previous window's last predicted frames, decoded by the frozen VQ-VAEs.

``GestureModel`` bundles the generator with the VQ-VAEs that turn its codes into motion; ``generate`` runs it over
a clip. Nothing here writes into an input (a window written back through a view would overwrite the ground truth).
Works in the normalised motion space; de-normalising and file output are ``gesture.infer``'s job.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from common.shapes import expect_shape
from gesture.data.audio import frame_bounds
from gesture.data.textgrid import PAD
from gesture.layout import GLOBAL_ROT_DIM, PARTS, POSE_DIM, VQ_PARTS
from gesture.models.mamba import MambaState
from gesture.models.mambatalk import GeneratorOutput, MambaStream, MambaTalk
from gesture.models.vqvae import VQVAE

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """Frames ``[start, stop)`` go through the model; ``[start, start + known)`` are already decided (seed frames
    or earlier output) and ``[start + known, stop)`` are generated. ``stop`` may pass the clip end (padding)."""

    start: int
    known: int
    stop: int

    @property
    def first_new(self) -> int:
        return self.start + self.known


def plan_windows(n_frames: int, pose_length: int = 64, pre_frames: int = 4) -> list[Window]:
    """Windows covering ``n_frames``: hop ``pose_length - pre_frames``; the last one is shifted back so that it
    ends at the clip end (its known prefix is then longer than ``pre_frames``); clips shorter than a window get
    one padded window. Every frame from ``pre_frames`` on is generated exactly once."""
    if pose_length <= pre_frames or pre_frames < 1:
        raise ValueError(f"need pose_length > pre_frames >= 1, got {pose_length}, {pre_frames}")
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    if n_frames <= pose_length:
        return [Window(0, pre_frames, pose_length)]
    windows, done = [], pre_frames
    while done < n_frames:
        start = min(done - pre_frames, n_frames - pose_length)
        windows.append(Window(start, done - start, start + pose_length))
        done = start + pose_length
    return windows


def continue_from(new: torch.Tensor, previous: torch.Tensor, known: int, frames: int) -> torch.Tensor:
    """Shift ``new [b, L, d]`` after its first ``known`` frames so that it continues from ``previous [b, d]`` (the
    value already decided for frame ``known - 1``): frame ``known + i`` moves by the offset at ``known - 1`` times
    ``1 - (i + 1) / (frames + 1)``, zero from ``known + frames`` on. Returns a new tensor; frames before ``known``
    are unchanged."""
    offset = previous - new[:, known - 1]
    steps = torch.arange(1, new.shape[1] - known + 1, device=new.device, dtype=new.dtype)
    ramp = (1 - steps / (frames + 1)).clamp(min=0)
    return torch.cat([new[:, :known], new[:, known:] + offset[:, None] * ramp[None, :, None]], dim=1)


def _pad_frames(x: torch.Tensor, length: int, value: float = 0.0) -> torch.Tensor:
    """Pad dim 1 of ``x [b, t, ...]`` with ``value`` up to ``length`` (new tensor when padded)."""
    missing = length - x.shape[1]
    if missing <= 0:
        return x
    pad = x.new_full((x.shape[0], missing, *x.shape[2:]), value)
    return torch.cat([x, pad], dim=1)


@dataclass
class Generation:
    """``motion [b, n, 320]`` (normalised), ``indices[part] [b, n]``, the windows used, and ``boundaries``: the
    first generated frame of every window after the first (where a jump would show)."""

    motion: torch.Tensor
    indices: dict[str, torch.Tensor]
    windows: list[Window]
    boundaries: list[int] = field(default_factory=list)


@torch.no_grad()
def generate(
    model: GestureModel,
    audio: torch.Tensor,
    words: torch.Tensor,
    speaker: torch.Tensor,
    seed_frames: torch.Tensor,
    n_frames: int,
    *,
    pose_length: int = 64,
    pre_frames: int = 4,
    sr: int = 16000,
    fps: float = 30.0,
    streaming: bool = False,
    use_word: bool = True,
) -> Generation:
    """Generate ``n_frames`` of motion for a clip, window by window.

    audio [b, n, C] per-frame rows (generator ``audio_rate="frame"``) or [b, S, C] samples with
    ``S = frame_bounds(n, sr, fps)[-1]`` (``audio_rate="sample"``; each window gets the samples
    ``bounds[start]:bounds[stop]``, exact at every frame, no drift), words [b, n], speaker [b],
    seed_frames [b, >= pre_frames, 320] (normalised; only the first ``pre_frames`` are used) -> Generation.
    As in MambaTalk's test loop, the output's first ``pre_frames`` frames are the model's reconstruction of the seed;
    every later window is seeded with frames of the output itself.

    ``streaming=True`` carries every Mamba layer's state from each window to the next (taken at the frame where
    the next window starts), so the Mamba layers see the clip from its start; convolutions and attention still see
    one window. The first window is the same in both modes; later windows differ (the windowed mode restarts the
    Mamba states from zero in every window, as training did). The model is run in eval mode and restored after.
    """
    gen = model.generator
    windows = plan_windows(n_frames, pose_length, pre_frames)
    b = expect_shape(speaker, (None,), "speaker").shape[0]
    expect_shape(words, (b, n_frames), "words")
    expect_shape(seed_frames, (b, None, POSE_DIM), "seed_frames")
    if seed_frames.shape[1] < pre_frames:
        raise ValueError(f"seed_frames has {seed_frames.shape[1]} frames, need at least pre_frames={pre_frames}")
    if gen.audio_rate == "frame":
        expect_shape(audio, (b, n_frames, gen.audio_dim), "audio (per-frame rows)")
        bounds = None
    else:
        bounds = frame_bounds(max(n_frames, pose_length), sr, fps)
        need = int(frame_bounds(n_frames, sr, fps)[-1])
        expect_shape(audio, (b, None, gen.audio_dim), "audio (samples)")
        if audio.shape[1] != need:
            raise ValueError(f"audio has {audio.shape[1]} samples; {n_frames} frames at {fps} fps and {sr} Hz need "
                             f"exactly {need} (gesture.data.audio.fit_to_frames)")
    total = max(n_frames, pose_length)
    device = seed_frames.device
    motion_out = seed_frames.new_zeros(b, total, POSE_DIM)
    motion_out[:, :pre_frames] = seed_frames[:, :pre_frames]
    indices_out = {p: torch.zeros(b, total, dtype=torch.long, device=device) for p in VQ_PARTS}
    codes_out = {p: seed_frames.new_zeros(b, total, model.vqvaes[p].code_dim) for p in VQ_PARTS}
    words_all = _pad_frames(words, total, PAD)
    audio_all = _pad_frames(audio, total if bounds is None else int(bounds[-1]))

    was_training = model.training
    model.eval()
    states: dict[str, MambaState] = {}
    try:
        for k, w in enumerate(windows):
            if bounds is None:
                audio_w = audio_all[:, w.start:w.stop]
            else:
                audio_w = audio_all[:, int(bounds[w.start]):int(bounds[w.stop])]
            motion_w = motion_out[:, w.start:w.stop].clone()
            mask = torch.zeros(b, pose_length, POSE_DIM, dtype=torch.bool, device=device)
            mask[:, w.known:] = True
            stream = None
            if streaming:
                carry_at = windows[k + 1].start - w.start if k + 1 < len(windows) else None
                stream = MambaStream(states=states, carry_at=carry_at)
            out = model(audio_w, words_all[:, w.start:w.stop], speaker, motion_w, mask, use_word=use_word,
                        stream=stream)
            states = out.mamba_states
            new_idx = model.indices(out)
            new_codes, new_global = model.codes(out, new_idx), out.global_motion
            keep = 0 if k == 0 else w.known  # the first window decides its seed frames' codes too
            if keep and model.boundary_blend:
                last = w.start + keep - 1
                new_codes = {p: (continue_from(c, codes_out[p][:, last], keep, model.boundary_blend)
                                 if model.decode_from[p] == "continuous" else c) for p, c in new_codes.items()}
                # Only the rotation is continuous: foot contact is a decision (0 / 1), never blended.
                rot = slice(0, GLOBAL_ROT_DIM)
                new_global = torch.cat([
                    continue_from(new_global[..., rot], motion_out[:, last, PARTS["global"]][..., rot], keep,
                                  model.boundary_blend),
                    new_global[..., GLOBAL_ROT_DIM:]], dim=-1)
            codes_w = {p: torch.cat([codes_out[p][:, w.start:w.start + keep], new_codes[p][:, keep:]], dim=1)
                       for p in VQ_PARTS}
            global_w = torch.cat([motion_out[:, w.start:w.start + keep, PARTS["global"]],
                                  new_global[:, keep:]], dim=1)
            decoded = model.decode_codes(codes_w, global_w)  # [b, pose_length, 320]
            motion_out[:, w.start + keep:w.stop] = decoded[:, keep:]
            for p in VQ_PARTS:
                indices_out[p][:, w.start + keep:w.stop] = new_idx[p][:, keep:]
                codes_out[p][:, w.start + keep:w.stop] = codes_w[p][:, keep:]
    finally:
        model.train(was_training)
    return Generation(
        motion=motion_out[:, :n_frames].clone(),
        indices={p: v[:, :n_frames].clone() for p, v in indices_out.items()},
        windows=windows,
        boundaries=[w.first_new for w in windows[1:]],
    )


def seed_from_mean(batch: int, pre_frames: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Seed frames at the training mean pose (zeros in the normalised space): ``[batch, pre_frames, 320]``."""
    return torch.zeros(batch, pre_frames, POSE_DIM, device=device, dtype=dtype)


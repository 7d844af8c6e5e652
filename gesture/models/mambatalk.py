"""MambaTalk generator on the 320-d MHR layout: audio + words + speaker + seed/masked motion -> per-part VQ latents,
code logits and the directly regressed 7-d global part, for one window. No training logic (``gesture.lit.mambatalk``),
no autoregression over clips (``gesture.generate``), no VQ decoding (the frozen VQ-VAEs do that).

Layout: global scan (masked motion -> conv encoder -> speaker + position -> transformer encoder layer; Mamba over
the fused audio/text and over the motion features) then local scan (transformer decoder over the audio, per-part
MLP heads, per-part branches of attention + Mamba). Mamba layers can carry their state between calls
(``MambaStream``), which is what streaming generation uses.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from common.shapes import expect_shape
from gesture.layout import CONTACT_DIM, GLOBAL_DIM, GLOBAL_ROT_DIM, PARTS, POSE_DIM, VQ_PARTS
from gesture.models.mamba import MambaState, make_mamba
from gesture.models.vqvae import ResBlock1d

log = logging.getLogger(__name__)

AUDIO_RATES = ("frame", "sample")
CONTACT_HEADS = ("classify", "regress")
BRANCH_PARTS = ("body", "hand", "global")  # parts decoded from the shared motion stream; face has its own


# --------------------------------------------------------------------------------------------------------------
# Output and streaming containers
# --------------------------------------------------------------------------------------------------------------


@dataclass
class GeneratorOutput:
    """One window's prediction. ``latents[p] [b, t, code_dim]`` and ``logits[p] [b, t, n_codes]`` for each part
    of ``VQ_PARTS``; ``global_motion [b, t, 7]`` (normalised global slice: rotation, then foot contact);
    ``mamba_states``: the carried state of every Mamba layer when the call was given a ``MambaStream`` (else
    empty); ``contact_logits [b, t, 4]`` when foot contact is classified (``global_motion``'s contact channels are
    then its 0/1 decisions, normalised), ``None`` when it is regressed with the rotation."""

    latents: dict[str, torch.Tensor]
    logits: dict[str, torch.Tensor]
    global_motion: torch.Tensor
    mamba_states: dict[str, MambaState] = field(default_factory=dict)
    contact_logits: torch.Tensor | None = None


@dataclass(frozen=True)
class MambaStream:
    """Mamba states to start from (``states``: layer name -> state; missing = zeros) and the frame ``carry_at``
    whose state is returned for the next call (``None``: the state after the last frame). Never modified."""

    states: Mapping[str, MambaState] = field(default_factory=dict)
    carry_at: int | None = None


# --------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------


def sinusoidal_positions(length: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """Fixed sinusoidal encoding of positions ``0..length-1`` within the window: ``[length, dim]``."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device, dtype=torch.float32)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe.to(dtype) if dtype is not None else pe


def hold_last_visible(x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Each value replaced by the last visible value of its channel at or before it (0 before the first one):
    ``x [b, t, d], visible [b, t, d] bool -> [b, t, d]``. Hidden values of ``x`` are never read."""
    steps = torch.arange(x.shape[1], device=x.device).view(1, -1, 1).expand_as(x)
    last = torch.where(visible, steps, torch.full_like(steps, -1)).cummax(dim=1).values
    held = torch.gather(x, 1, last.clamp(min=0))
    return torch.where(last >= 0, held, torch.zeros_like(held))


def add_positions(x: torch.Tensor) -> torch.Tensor:
    """``x [b, t, d] -> x + PE [t, d]`` (new tensor)."""
    return x + sinusoidal_positions(x.shape[1], x.shape[2], x.device, x.dtype)


class MLP(nn.Module):
    """``x [..., d_in] -> [..., d_out]``: Linear, LeakyReLU, Linear."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_hidden), nn.LeakyReLU(0.2), nn.Linear(d_hidden, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., d_in] -> [..., d_out]``."""
        return self.net(x)


class FrameConvEncoder(nn.Module):
    """Per-frame features through a length-preserving 1-D conv stack: ``x [b, t, c_in] -> [b, t, c_out]``."""

    def __init__(self, c_in: int, c_out: int, depth: int = 2, dilation_growth: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(c_in, c_out, 3, padding=1),
            *[ResBlock1d(c_out, dilation_growth**i) for i in range(depth)],
            nn.LeakyReLU(0.2),
            nn.Conv1d(c_out, c_out, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [b, t, c_in] -> [b, t, c_out]``."""
        return rearrange(self.net(rearrange(x, "b t c -> b c t")), "b c t -> b t c")


class SampleConvEncoder(nn.Module):
    """Sample-rate features (e.g. 16 kHz amplitude/onset channels) to frame rate: strided convs, then an adaptive
    average over ``t`` equal spans of the window's samples. ``x [b, S, c_in], t -> [b, t, c_out]``.

    The window's samples must start at a frame boundary (``gesture.generate`` slices them with ``frame_bounds``);
    inside the window the spans are equal, so a frame's span is within one downsampled step of its exact bounds.
    """

    def __init__(self, c_in: int, c_out: int, strides: tuple[int, ...] = (5, 4, 4), depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = c_in
        for s in strides:
            layers += [nn.Conv1d(c, c_out, 2 * s, stride=s, padding=s // 2), nn.LeakyReLU(0.2)]
            c = c_out
        self.down = nn.Sequential(*layers)
        self.frames = FrameConvEncoder(c_out, c_out, depth=depth)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        """``x [b, S, c_in], num_frames -> [b, num_frames, c_out]``."""
        h = self.down(rearrange(x, "b s c -> b c s"))
        h = F.adaptive_avg_pool1d(h, num_frames)
        return self.frames(rearrange(h, "b c t -> b t c"))


class GatedFusion(nn.Module):
    """MambaTalk's audio/text fusion: a per-channel softmax gate over the two streams.

    ``text, audio [b, t, f] -> alpha_text * text + alpha_audio * audio [b, t, f]``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate = nn.Linear(2 * dim, 2 * dim)

    def forward(self, text: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """``text, audio [b, t, f] -> [b, t, f]``."""
        alpha = rearrange(self.gate(torch.cat([text, audio], dim=-1)), "b t (f two) -> b t f two", two=2)
        alpha = alpha.softmax(dim=-1)
        return text * alpha[..., 1] + audio * alpha[..., 0]


class MambaLayer(nn.Module):
    """Pre-norm residual Mamba: ``x [b, t, d] -> x + mamba(norm(x))``; with a ``MambaStream`` it starts from the
    stream's state for this layer (``state_key``, set by the owning model) and reports its carried state."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mamba = make_mamba(dim, d_state=d_state, d_conv=d_conv, expand=expand)
        self.state_key = ""

    def forward(self, x: torch.Tensor, stream: MambaStream | None = None,
                states_out: dict[str, MambaState] | None = None) -> torch.Tensor:
        """``x [b, t, d] -> [b, t, d]``; ``states_out`` (a dict owned by the caller) receives the carried state."""
        h = self.norm(x)
        if stream is None:
            return x + self.mamba(h)
        state = stream.states.get(self.state_key)
        split = stream.carry_at
        if split is None or split >= h.shape[1]:
            y, carried = self.mamba(h, state=state, return_state=True)
        elif split <= 0:
            carried = state if state is not None else self.mamba.allocate_state(h.shape[0], h.device, h.dtype)
            y = self.mamba(h, state=state)
        else:  # the scan is causal: two calls with the state handed over equal one call over the window
            y_head, carried = self.mamba(h[:, :split], state=state, return_state=True)
            y = torch.cat([y_head, self.mamba(h[:, split:], state=carried)], dim=1)
        if states_out is not None:
            states_out[self.state_key] = carried
        return x + y


class AttentionLayer(nn.Module):
    """Pre-norm residual self-attention: ``x [b, t, d] -> x + attn(norm(x))`` (bidirectional within a window)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [b, t, d] -> [b, t, d]``."""
        h = self.norm(x)
        return x + self.attn(h, h, h, need_weights=False)[0]


class MambaStack(nn.Module):
    """``n`` residual Mamba layers: ``x [b, t, d] -> [b, t, d]``."""

    def __init__(self, dim: int, n_layers: int, **mamba_kw: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList([MambaLayer(dim, **mamba_kw) for _ in range(n_layers)])

    def forward(self, x, stream=None, states_out=None):
        """``x [b, t, d] -> [b, t, d]``."""
        for layer in self.layers:
            x = layer(x, stream, states_out)
        return x


class PartBranch(nn.Module):
    """One part's local scan: project ``[own, context]`` to ``dim``, then ``n_layers`` x (attention + Mamba).

    ``own, context [b, t, d_own], [b, t, d_ctx] -> [b, t, dim]``.
    """

    def __init__(self, d_in: int, dim: int, n_layers: int, heads: int, dropout: float, **mamba_kw: Any) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, dim)
        self.attn = nn.ModuleList([AttentionLayer(dim, heads, dropout) for _ in range(n_layers)])
        self.mamba = nn.ModuleList([MambaLayer(dim, **mamba_kw) for _ in range(n_layers)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, own, context, stream=None, states_out=None):
        """``own [b, t, d1], context [b, t, d2] -> [b, t, dim]``."""
        x = self.proj(torch.cat([own, context], dim=-1))
        for attn, mamba in zip(self.attn, self.mamba):
            x = mamba(attn(x), stream, states_out)
        return self.norm(x)


# --------------------------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------------------------


def _per_part(value: int | Mapping[str, int], name: str) -> dict[str, int]:
    if isinstance(value, Mapping):
        missing = set(VQ_PARTS) - set(value)
        if missing:
            raise ValueError(f"{name}: missing parts {sorted(missing)} (needs {VQ_PARTS})")
        return {p: int(value[p]) for p in VQ_PARTS}
    return {p: int(value) for p in VQ_PARTS}


class MambaTalk(nn.Module):
    """MambaTalk generator for one window of ``t`` frames of the 320-d layout (``gesture.layout``).

    Args:
        num_speakers: embedding rows = known speakers + the unknown slot (``SpeakerMap.num_embeddings``).
        vocab_size: word embedding rows (PAD 0, UNK 1 included).
        audio_dim: audio feature channels.
        code_dim, n_codes: per-part VQ latent size and codebook size (an int for all parts, or a mapping).
        hidden: model width. audio_f, motion_f: widths of the audio/text and motion feature streams.
        decoder_layers: transformer decoder layers of the local scan (paper: 8).
        global_layers: transformer encoder layers over the masked motion (paper: 1).
        scan_layers: Mamba layers in each global scan (audio/text and motion).
        branch_layers: attention + Mamba layers per body/hand/global branch; face_layers for the face branch.
        heads, ffn_mult, dropout: transformer settings. d_state, d_conv, expand: Mamba settings.
        word_dim: word embedding size; ``word_vectors [vocab, word_dim]`` initialises it (frozen if
            ``freeze_word_vectors``).
        audio_rate: "frame" (``audio [b, t, C]``, one row per frame) or "sample" (``audio [b, S, C]`` at the
            audio sample rate, downsampled by ``SampleConvEncoder``).
        audio_depth: residual blocks of the audio encoder.
        global_residual: regress the 7-d global part as a residual on its last visible value (the last seed frame
            when generating; its head starts at zero), so a new window starts where the seed left off. False:
            regressed from scratch, as MambaTalk.
        contact: "classify": foot contact from per-foot logits (trained with a binary cross-entropy, decided at
            0.5 and normalised with the stats of ``set_contact_stats``), the residual only on the rotation.
            "regress": the 7-d global part regressed as one vector, as MambaTalk. Contact is a 0/1 label that is
            nearly always 1 (synthetic corpus: mean 0.98, std 0.14), so a lifted foot is a -7 std outlier in
            normalised units: regressed, its squared error was 10-30x the rotation's and drowned it (per-channel
            MSE 1.5-3.5 against 0.1-0.27), and the global rotation barely moved (velocity ratio 0.25).

    ``config`` holds the constructor arguments (without ``word_vectors``); checkpoints store it.
    """

    def __init__(
        self,
        num_speakers: int,
        vocab_size: int,
        audio_dim: int,
        code_dim: int | Mapping[str, int] = 256,
        n_codes: int | Mapping[str, int] = 256,
        hidden: int = 256,
        audio_f: int = 128,
        motion_f: int = 128,
        decoder_layers: int = 2,
        global_layers: int = 1,
        scan_layers: int = 1,
        branch_layers: int = 1,
        face_layers: int = 1,
        heads: int = 4,
        ffn_mult: int = 1,
        dropout: float = 0.1,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        word_dim: int = 64,
        word_vectors: torch.Tensor | None = None,
        freeze_word_vectors: bool = False,
        audio_rate: str = "frame",
        audio_depth: int = 2,
        global_residual: bool = True,
        contact: str = "classify",
    ) -> None:
        super().__init__()
        if num_speakers < 1:
            raise ValueError(f"num_speakers must be >= 1 (known speakers + unknown), got {num_speakers}")
        if audio_rate not in AUDIO_RATES:
            raise ValueError(f"audio_rate must be one of {AUDIO_RATES}, got {audio_rate!r}")
        if contact not in CONTACT_HEADS:
            raise ValueError(f"contact must be one of {CONTACT_HEADS}, got {contact!r}")
        if hidden % heads != 0:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        code_dims, codebook_sizes = _per_part(code_dim, "code_dim"), _per_part(n_codes, "n_codes")
        if word_vectors is not None:
            expect_shape(word_vectors, (vocab_size, None), "word_vectors")
            word_dim = word_vectors.shape[1]
        self.config: dict[str, Any] = dict(
            num_speakers=num_speakers, vocab_size=vocab_size, audio_dim=audio_dim, code_dim=code_dims,
            n_codes=codebook_sizes, hidden=hidden, audio_f=audio_f, motion_f=motion_f,
            decoder_layers=decoder_layers, global_layers=global_layers, scan_layers=scan_layers,
            branch_layers=branch_layers, face_layers=face_layers, heads=heads, ffn_mult=ffn_mult, dropout=dropout,
            d_state=d_state, d_conv=d_conv, expand=expand, word_dim=word_dim,
            freeze_word_vectors=freeze_word_vectors, audio_rate=audio_rate, audio_depth=audio_depth,
            global_residual=global_residual, contact=contact,
        )
        self.num_speakers, self.vocab_size, self.audio_dim = num_speakers, vocab_size, audio_dim
        self.audio_rate, self.code_dims, self.codebook_sizes = audio_rate, code_dims, codebook_sizes
        mamba_kw = dict(d_state=d_state, d_conv=d_conv, expand=expand)
        ffn = hidden * ffn_mult

        # Text and audio, fused by a learned gate; one stream for the face, one for the body (as MambaTalk).
        self.word_embedding = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        if word_vectors is not None:
            with torch.no_grad():
                self.word_embedding.weight.copy_(word_vectors)
            self.word_embedding.weight.requires_grad_(not freeze_word_vectors)
        self.text_face, self.text_body = nn.Linear(word_dim, audio_f), nn.Linear(word_dim, audio_f)
        if audio_rate == "frame":
            self.audio_face = FrameConvEncoder(audio_dim, audio_f, depth=audio_depth)
            self.audio_body = FrameConvEncoder(audio_dim, audio_f, depth=audio_depth)
        else:
            self.audio_face = SampleConvEncoder(audio_dim, audio_f, depth=audio_depth)
            self.audio_body = SampleConvEncoder(audio_dim, audio_f, depth=audio_depth)
        self.fuse_face, self.fuse_body = GatedFusion(audio_f), GatedFusion(audio_f)

        self.speaker_face = nn.Embedding(num_speakers, hidden)
        self.speaker_body = nn.Embedding(num_speakers, hidden)

        # Global scan.
        self.mask_token = nn.Parameter(torch.zeros(POSE_DIM))
        self.motion_encoder = FrameConvEncoder(POSE_DIM, motion_f, depth=3)
        self.motion_proj = nn.Sequential(MLP(motion_f, hidden, motion_f), nn.Linear(motion_f, hidden))
        self.motion_self_attn = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(hidden, heads, ffn, dropout, batch_first=True), global_layers,
            enable_nested_tensor=False)
        self.audio_scan = MambaStack(audio_f, scan_layers, **mamba_kw)
        self.motion_scan = MambaStack(motion_f, scan_layers, **mamba_kw)
        self.global_features = nn.Linear(audio_f + motion_f, hidden)

        # Local scan.
        self.audio_memory = nn.Linear(audio_f, hidden)
        self.cross_attn = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(hidden, heads, ffn, dropout, batch_first=True), decoder_layers)
        self.to_part = nn.ModuleDict({p: MLP(hidden, hidden, hidden) for p in BRANCH_PARTS})
        self.branches = nn.ModuleDict({
            p: PartBranch(2 * hidden, hidden, branch_layers, heads, dropout, **mamba_kw) for p in BRANCH_PARTS})
        self.branches["face"] = PartBranch(2 * hidden, hidden, face_layers, heads, dropout, **mamba_kw)
        self.to_latent = nn.ModuleDict({p: nn.Linear(hidden, code_dims[p]) for p in VQ_PARTS})
        self.classifiers = nn.ModuleDict({p: MLP(code_dims[p], hidden, codebook_sizes[p]) for p in VQ_PARTS})
        self.to_global = nn.Linear(hidden, GLOBAL_DIM)
        self.global_residual = global_residual
        if global_residual:
            nn.init.zeros_(self.to_global.weight)
            nn.init.zeros_(self.to_global.bias)
        self.contact_head = contact
        # Normalisation of the contact channels (the data's mean / std), so that classified 0/1 contact is
        # returned in the same normalised units as the rest of the motion. Saved with the weights.
        self.register_buffer("contact_mean", torch.zeros(CONTACT_DIM))
        self.register_buffer("contact_std", torch.ones(CONTACT_DIM))

        for name, module in self.named_modules():
            if isinstance(module, MambaLayer):
                module.state_key = name

    def set_contact_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """The data's contact normalisation: ``mean, std [4]`` (raw 0/1 label = normalised * std + mean)."""
        expect_shape(mean, (CONTACT_DIM,), "contact mean")
        expect_shape(std, (CONTACT_DIM,), "contact std")
        if not bool((std > 0).all()):
            raise ValueError(f"contact std must be positive, got {std.tolist()}")
        self.contact_mean.copy_(mean)
        self.contact_std.copy_(std)

    # ---------------------------------------------------------------------------------------------- checks
    def check_speakers(self, speaker: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the ids outside ``[0, num_speakers)``; never clamps (a clamped id silently trains another speaker's embedding)."""
        if speaker.is_floating_point() or speaker.dtype == torch.bool:
            raise TypeError(f"speaker ids must be an integer tensor, got {speaker.dtype}")
        bad = (speaker < 0) | (speaker >= self.num_speakers)
        if bool(bad.any()):
            ids = sorted({int(v) for v in speaker[bad].reshape(-1).tolist()})
            raise ValueError(
                f"speaker ids {ids} are outside the valid range [0, {self.num_speakers - 1}] (known speakers "
                f"0..{self.num_speakers - 2}, unknown speaker {self.num_speakers - 1}); map raw ids with "
                "SpeakerMap.index (raw -1 -> the unknown index)")

    def _check_inputs(self, audio, words, speaker, motion, mask) -> tuple[int, int]:
        b, t = expect_shape(words, (None, None), "words").shape
        expect_shape(motion, (b, t, POSE_DIM), "motion")
        expect_shape(mask, (b, t, POSE_DIM), "mask")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool (True = frame/value to generate), got {mask.dtype}")
        expect_shape(speaker, (b,), "speaker")
        if self.audio_rate == "frame":
            expect_shape(audio, (b, t, self.audio_dim), "audio (per-frame rows)")
        else:
            expect_shape(audio, (b, None, self.audio_dim), "audio (sample rate)")
        self.check_speakers(speaker)
        return b, t

    # --------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        audio: torch.Tensor,
        words: torch.Tensor,
        speaker: torch.Tensor,
        motion: torch.Tensor,
        mask: torch.Tensor,
        use_word: bool = True,
        stream: MambaStream | None = None,
    ) -> GeneratorOutput:
        """audio [b, t, C] (or [b, S, C] at sample rate), words [b, t], speaker [b], motion [b, t, 320],
        mask [b, t, 320] bool (True = replaced by the mask token) -> GeneratorOutput (latents/logits [b, t, .],
        global_motion [b, t, 7])."""
        b, t = self._check_inputs(audio, words, speaker, motion, mask)
        states_out: dict[str, MambaState] | None = {} if stream is not None else None

        text = self.word_embedding(words)
        if not use_word:
            text = torch.zeros_like(text)
        if self.audio_rate == "frame":
            audio_face, audio_body = self.audio_face(audio), self.audio_body(audio)
        else:
            audio_face, audio_body = self.audio_face(audio, t), self.audio_body(audio, t)
        fused_face = self.fuse_face(self.text_face(text), audio_face)  # [b, t, audio_f]
        fused_body = self.fuse_body(self.text_body(text), audio_body)
        spk_face = self.speaker_face(speaker)[:, None, :].expand(b, t, -1)  # [b, t, hidden]
        spk_body = self.speaker_body(speaker)[:, None, :].expand(b, t, -1)

        # Global scan.
        masked = torch.where(mask, self.mask_token.to(motion.dtype).expand_as(motion), motion)
        motion_feat = self.motion_encoder(masked)  # [b, t, motion_f]
        global_motion = self.motion_self_attn(add_positions(self.motion_proj(motion_feat) + spk_body))
        scanned = torch.cat([self.audio_scan(fused_face, stream, states_out),
                             self.motion_scan(motion_feat, stream, states_out)], dim=-1)
        global_feat = self.global_features(scanned)  # [b, t, hidden]

        # Local scan.
        refined = self.cross_attn(tgt=add_positions(global_motion), memory=self.audio_memory(fused_body))
        global_motion = global_motion + refined
        part = {p: self.to_part[p](global_motion) for p in BRANCH_PARTS}
        branch_in = {p: add_positions(part[p] + spk_body) for p in BRANCH_PARTS}
        others = {p: sum(part[q] for q in BRANCH_PARTS if q != p) for p in BRANCH_PARTS}
        out = {p: self.branches[p](branch_in[p], others[p], stream, states_out) + part[p] for p in BRANCH_PARTS}
        out["face"] = self.branches["face"](add_positions(spk_face), global_feat, stream, states_out)

        latents = {p: self.to_latent[p](out[p]) for p in VQ_PARTS}
        logits = {p: self.classifiers[p](latents[p]) for p in VQ_PARTS}
        global_out = self.to_global(out["global"])  # [b, t, 7]
        held = None
        if self.global_residual:
            g = PARTS["global"]
            held = hold_last_visible(motion[..., g], ~mask[..., g])
        contact_logits = None
        if self.contact_head == "regress":
            global_motion = global_out if held is None else global_out + held
        else:
            rot, contact_logits = global_out[..., :GLOBAL_ROT_DIM], global_out[..., GLOBAL_ROT_DIM:]
            if held is not None:
                rot = rot + held[..., :GLOBAL_ROT_DIM]
            decided = (contact_logits > 0).to(rot.dtype)  # p > 0.5
            contact = (decided - self.contact_mean.to(rot.dtype)) / self.contact_std.to(rot.dtype)
            global_motion = torch.cat([rot, contact], dim=-1)
        return GeneratorOutput(latents=latents, logits=logits, global_motion=global_motion,
                               mamba_states=states_out or {}, contact_logits=contact_logits)


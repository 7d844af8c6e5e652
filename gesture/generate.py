"""Autoregressive gesture generation over whole clips: windows of ``pose_length`` frames overlapping by
``pre_frames``, each seeded with the previous window's last predicted frames, decoded by the frozen VQ-VAEs.

``generate`` runs a ``gesture.models.generator.GestureModel`` (the generator with the VQ-VAEs that turn its codes
into motion) over a clip. Nothing here writes into an input (a window written back through a view would overwrite
the ground truth). Works in the normalised motion space; de-normalising and file output are ``gesture.infer``'s job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from common.shapes import expect_shape
from gesture.data.audio import frame_bounds
from gesture.data.textgrid import PAD
from gesture.layout import GLOBAL_ROT_DIM, PARTS, POSE_DIM, VQ_PARTS
from gesture.models.generator import GestureModel
from gesture.models.mamba import MambaState
from gesture.models.mambatalk import MambaStream

log = logging.getLogger(__name__)

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


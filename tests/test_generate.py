"""Autoregressive generation: the window plan keeps every frame (no dropped tail), inputs stay bitwise unchanged
(predicted seeds written into a view would overwrite the ground truth), audio windows start at the
exact sample of their frame (no 533-per-frame drift), and streaming equals the windowed path on the first window."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from gesture.generate import Window, continue_from, generate, plan_windows
from gesture.layout import GLOBAL_ROT_DIM, PARTS, POSE_DIM, SUB_SLICES, VQ_PARTS
from gesture.models.generator import GestureModel, join_parts
from gesture.models.mambatalk import MambaTalk
from gesture.models.vqvae import VQVAE

AUDIO_DIM = 2
L, PRE, HOP = 64, 4, 60


def tiny_model(audio_rate: str = "frame", seed: int = 0, decode_from: dict | None = None, **kw) -> GestureModel:
    torch.manual_seed(seed)
    gen = MambaTalk(num_speakers=3, vocab_size=5, audio_dim=AUDIO_DIM, code_dim=8, n_codes=16, hidden=16,
                    audio_f=8, motion_f=8, decoder_layers=1, heads=2, word_dim=4, dropout=0.0,
                    audio_rate=audio_rate, audio_depth=1, **kw)
    vqs = {p: VQVAE(p, hidden=8, code_dim=8, n_codes=16, depth=1) for p in VQ_PARTS}
    return GestureModel(gen, vqs, decode_from).eval()


CONTINUOUS = dict.fromkeys(VQ_PARTS, "continuous")


def clip_inputs(n: int, b: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, n, AUDIO_DIM, generator=g), torch.randint(0, 5, (b, n), generator=g),
            torch.tensor([1, 2][:b]), torch.randn(b, n, POSE_DIM, generator=g))


def exact_bound(i: int, sr: int = 16000, fps: int = 30) -> int:
    """round(i * sr / fps), half up, in exact rational arithmetic."""
    return int(Fraction(i * sr, fps) + Fraction(1, 2))


# ---------------------------------------------------------------------------------------------- window plan
@pytest.mark.parametrize("n", [L, L + 1, L + HOP, L + 2 * HOP + 17, L + 5 * HOP, 1000, 2 * L - 3])
def test_window_plan_generates_every_frame_once(n):
    windows = plan_windows(n, L, PRE)
    assert windows[0] == Window(0, PRE, L)
    assert windows[-1].stop == n
    generated = [f for w in windows for f in range(w.first_new, w.stop)]
    assert generated == list(range(PRE, n)), "each frame after the seed is generated exactly once, tail included"
    for w in windows:
        assert w.stop - w.start == L and w.known >= PRE
    for a, b in zip(windows[:-2], windows[1:-1]):  # regular windows hop by pose_length - pre_frames
        assert b.start - a.start == HOP and b.known == PRE


def test_short_clip_gets_one_padded_window():
    assert plan_windows(10, L, PRE) == [Window(0, PRE, L)]
    with pytest.raises(ValueError):
        plan_windows(0, L, PRE)
    with pytest.raises(ValueError):
        plan_windows(100, 4, 4)


# ------------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("n", [L + 2 * HOP + 17, 40])
def test_output_has_exactly_n_frames(n):
    model = tiny_model()
    audio, words, speaker, gt = clip_inputs(n)
    out = generate(model, audio, words, speaker, gt[:, :PRE], n)
    assert out.motion.shape == (1, n, POSE_DIM)
    assert all(v.shape == (1, n) for v in out.indices.values())
    assert torch.isfinite(out.motion).all()
    # the last frames are generated (decoded codes), not left at the zero initialisation
    assert out.motion[0, -17:].abs().sum() > 0
    assert out.boundaries == [w.first_new for w in plan_windows(n, L, PRE)[1:]]


@pytest.mark.parametrize("decode_from", [None, CONTINUOUS])
def test_generation_leaves_every_input_bitwise_unchanged(decode_from):
    """The seed is passed as the whole ground-truth clip (only its first frames are read): if generation used it as
    its working buffer (no clone), the ground truth would be overwritten at every window boundary."""
    n = L + 3 * HOP + 17
    model = tiny_model(decode_from=decode_from)
    audio, words, speaker, gt = clip_inputs(n, b=2)
    originals = [x.clone() for x in (audio, words, speaker, gt)]
    seed_view = gt[:, :PRE]  # a view into gt, as MambaTalk's test loop sliced it
    for streaming in (False, True):
        generate(model, audio, words, speaker, gt, n, streaming=streaming)
        generate(model, audio, words, speaker, seed_view, n, streaming=streaming)
    for before, after in zip(originals, (audio, words, speaker, gt)):
        assert torch.equal(before, after)
        assert before.dtype == after.dtype


def test_output_starts_from_the_seed_and_later_windows_use_earlier_output():
    """Each window's known frames are the output generated before it (not ground truth)."""
    n = L + HOP + 10
    model = tiny_model()
    audio, words, speaker, gt = clip_inputs(n)
    seen = []
    original = model.generator.forward

    def spy(audio, words, speaker, motion, mask, **kw):
        seen.append((motion.clone(), mask.clone()))
        return original(audio, words, speaker, motion, mask, **kw)

    model.generator.forward = spy
    out = generate(model, audio, words, speaker, gt, n)
    windows = plan_windows(n, L, PRE)
    assert len(seen) == len(windows)
    torch.testing.assert_close(seen[0][0][:, :PRE], gt[:, :PRE], rtol=0, atol=0)
    for (motion, mask), w in zip(seen, windows):
        assert not mask[:, :w.known].any() and mask[:, w.known:].all()
        if w.start > 0:
            torch.testing.assert_close(motion[:, :w.known], out.motion[:, w.start:w.first_new], rtol=0, atol=0)


def test_frame_rate_audio_windows_are_the_frame_rows():
    n = L + HOP + 17
    model = tiny_model()
    audio, words, speaker, gt = clip_inputs(n)
    audio = torch.arange(n, dtype=torch.float32)[None, :, None].expand(1, n, AUDIO_DIM).contiguous()
    seen = []
    original = model.generator.forward
    model.generator.forward = lambda a, *args, **kw: (seen.append(a[0, :, 0].clone()), original(a, *args, **kw))[1]
    generate(model, audio, words, speaker, gt, n)
    for rows, w in zip(seen, plan_windows(n, L, PRE)):
        assert rows.tolist() == list(range(w.start, w.stop))


def test_sample_rate_audio_is_sliced_at_exact_frame_bounds():
    """A 100 s clip at 30 fps / 16 kHz: every window starts at round(i * sr / fps); the original's 533 samples
    per frame would be 600 samples (> 1 frame) late by frame 1800."""
    n, sr, fps = 3000, 16000, 30
    model = tiny_model("sample")
    s = exact_bound(n)
    audio = torch.arange(s, dtype=torch.float32)[None, :, None].expand(1, s, AUDIO_DIM).contiguous()
    _, words, speaker, gt = clip_inputs(n)
    seen = []
    original = model.generator.forward

    def spy(a, *args, **kw):
        seen.append((int(a[0, 0, 0]), a.shape[1]))
        return original(a, *args, **kw)

    model.generator.forward = spy
    generate(model, audio, words, speaker, gt, n, sr=sr, fps=fps)
    windows = plan_windows(n, L, PRE)
    assert len(seen) == len(windows)
    for (first, length), w in zip(seen, windows):
        assert first == exact_bound(w.start)
        assert length == exact_bound(w.stop) - exact_bound(w.start)
    late = max(abs(533 * w.start - exact_bound(w.start)) for w in windows)
    assert late > sr / fps  # the fixed-hop scheme drifts by more than a frame; ours is exact everywhere
    with pytest.raises(ValueError, match="need exactly"):
        generate(model, audio[:, :-1], words, speaker, gt, n, sr=sr, fps=fps)


def test_streaming_equals_windowed_on_the_first_window_and_carries_state():
    n = L + 2 * HOP + 17
    model = tiny_model(global_residual=False)  # a global head that is not at its zero init shows the state
    audio, words, speaker, gt = clip_inputs(n)
    windowed = generate(model, audio, words, speaker, gt, n)
    streamed = generate(model, audio, words, speaker, gt, n, streaming=True)
    torch.testing.assert_close(streamed.motion[:, :L], windowed.motion[:, :L], atol=1e-5, rtol=1e-5)
    for p in VQ_PARTS:
        assert torch.equal(streamed.indices[p][:, :L], windowed.indices[p][:, :L])
    # later windows start from the carried Mamba state, so they differ
    assert not torch.allclose(streamed.motion[:, L:], windowed.motion[:, L:], atol=1e-4)


def test_generation_restores_the_training_mode():
    model = tiny_model().train()
    audio, words, speaker, gt = clip_inputs(L)
    generate(model, audio, words, speaker, gt, L)
    assert model.generator.training and not any(vq.training for vq in model.vqvaes.values())


def test_edge_padding_removes_decoder_edge_artefacts():
    """A window of one repeated code decodes to the same frame everywhere once its edges are padded."""
    model = tiny_model()
    codes = {p: model.vqvaes[p].quantizer.get_codebook_entry(torch.full((1, 20), 3)) for p in VQ_PARTS}
    glob = torch.zeros(1, 20, PARTS["global"].stop - PARTS["global"].start)
    padded = model.decode_codes(codes, glob)
    torch.testing.assert_close(padded, padded[:, 10:11].expand_as(padded), atol=1e-6, rtol=0)
    model.edge_pad = 0
    unpadded = model.decode_codes(codes, glob)
    assert not torch.allclose(unpadded[:, 0], unpadded[:, 10], atol=1e-4)  # the zero padding shows at the ends
    torch.testing.assert_close(unpadded[:, 10], padded[:, 10], atol=1e-6, rtol=0)


def test_join_parts_follows_the_layout():
    parts = {p: torch.full((1, 2, s.stop - s.start), float(i)) for i, (p, s) in enumerate(PARTS.items())}
    joined = join_parts(parts)
    for i, s in enumerate(PARTS.values()):
        assert (joined[..., s] == i).all()
    with pytest.raises(ValueError, match="missing parts"):
        join_parts({k: v for k, v in parts.items() if k != "face"})


def test_gesture_model_rejects_mismatched_vqvaes():
    model = tiny_model()
    vqs = dict(model.vqvaes.items())
    with pytest.raises(ValueError, match="do not match"):
        GestureModel(model.generator, {**vqs, "hand": VQVAE("hand", hidden=8, code_dim=4, n_codes=16, depth=1)})
    with pytest.raises(ValueError, match="trained on"):
        GestureModel(model.generator, {**vqs, "hand": vqs["body"]})


def test_continuous_decoding_decodes_the_regressed_latents_themselves():
    """``continuous``: one window's output is the frozen decoders applied to the predicted latents (no codebook
    snap), so consecutive frames are not held at one code; ``logits`` decodes codebook entries."""
    model = tiny_model(decode_from=CONTINUOUS)
    audio, words, speaker, gt = clip_inputs(L)
    out = generate(model, audio, words, speaker, gt[:, :PRE], L)
    mask = torch.zeros(1, L, POSE_DIM, dtype=torch.bool)
    mask[:, PRE:] = True
    with torch.no_grad():
        pred = model(audio, words, speaker, gt[:, :PRE].new_zeros(1, L, POSE_DIM).index_copy(
            1, torch.arange(PRE), gt[:, :PRE]), mask)
        expected = {p: model._decode_padded(p, pred.latents[p]) for p in VQ_PARTS}
        codebook = {p: model.vqvaes[p].quantizer.get_codebook_entry(model.indices(pred)[p]) for p in VQ_PARTS}
    for p in VQ_PARTS:
        torch.testing.assert_close(out.motion[..., PARTS[p]], expected[p], atol=1e-5, rtol=1e-5)
        assert torch.equal(model.codes(pred)[p], pred.latents[p])
        assert not torch.allclose(pred.latents[p], codebook[p])  # not snapped to the codebook
    snapped = tiny_model()
    with torch.no_grad():
        pred = snapped(audio, words, speaker, torch.zeros(1, L, POSE_DIM), mask)
    for p in VQ_PARTS:
        codes = snapped.codes(pred)[p]
        book = snapped.vqvaes[p].quantizer.codebook
        assert ((codes[0, :, None, :] - book[None]).abs().amax(-1).amin(-1) == 0).all()  # every vector is a code
    with pytest.raises(ValueError, match="decode_from"):
        tiny_model(decode_from={"body": "smooth"})


def test_continue_from_removes_the_offset_at_the_boundary_and_fades_it_out():
    g = torch.Generator().manual_seed(0)
    new, previous = torch.randn(2, 16, 3, generator=g), torch.randn(2, 3, generator=g)
    out = continue_from(new, previous, known=4, frames=5)
    assert torch.equal(out[:, :4], new[:, :4]) and torch.equal(out[:, 10:], new[:, 10:])
    offset = previous - new[:, 3]
    for i in range(5):  # linear fade: 5/6, 4/6, ... of the offset
        torch.testing.assert_close(out[:, 4 + i], new[:, 4 + i] + offset * (1 - (i + 1) / 6))
    # the step into the first new frame is the window's own step, not the jump between the windows
    torch.testing.assert_close(out[:, 4] - previous, (new[:, 4] - new[:, 3]) + offset * (-1 / 6))


def test_boundary_blend_makes_later_windows_continue_from_the_previous_one():
    n = L + 2 * HOP + 17
    audio, words, speaker, gt = clip_inputs(n)
    jumps = {}
    for blend in (0, 8):
        model = tiny_model(decode_from=CONTINUOUS)
        model.boundary_blend = blend
        out = generate(model, audio, words, speaker, gt[:, :PRE], n)
        body = out.motion[0, :, PARTS["body"]]
        jumps[blend] = torch.stack([(body[b] - body[b - 1]).norm() for b in out.boundaries])
        if blend == 0:
            first = out
    assert (jumps[8] < jumps[0]).all(), jumps
    # the first window is not touched
    torch.testing.assert_close(out.motion[:, :out.boundaries[0]], first.motion[:, :first.boundaries[0]])


def test_boundary_blend_leaves_classified_foot_contact_a_decision():
    """The blend shifts continuous channels only: classified contact stays exactly 0 / 1 after every boundary
    (blending the whole global slice gave values like 0.11 for the blend's frames)."""
    n = L + 2 * HOP + 17
    audio, words, speaker, gt = clip_inputs(n)
    model = tiny_model(decode_from=CONTINUOUS)
    mean, std = torch.tensor([0.3, 0.5, 0.2, 0.6]), torch.tensor([0.5, 0.4, 0.3, 0.45])
    model.generator.set_contact_stats(mean, std)
    model.boundary_blend = 8
    # Contact logits that change sign from frame to frame, so that the decisions on the two sides of a boundary
    # differ (a blend over them then leaves values between 0 and 1).
    with torch.no_grad():
        rows = model.generator.to_global.weight[GLOBAL_ROT_DIM:]
        rows.copy_(torch.randn(rows.shape, generator=torch.Generator().manual_seed(3)) * 5.0)
        model.generator.to_global.bias[GLOBAL_ROT_DIM:] = 0.0
    out = generate(model, audio, words, speaker, gt[:, :PRE], n)
    raw = out.motion[0, PRE:, SUB_SLICES["contact"]] * std + mean
    assert 0 < float(raw.mean()) < 1  # both decisions occur
    assert ((raw - 0).abs() < 1e-5).logical_or((raw - 1).abs() < 1e-5).all(), raw[(raw > 1e-5) & (raw < 1 - 1e-5)]

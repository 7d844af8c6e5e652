"""MambaTalk generator and its LightningModule: shape contracts, speaker-id validation (never clamped), masking that
never leaks the values to generate, the loss against float64 / numpy references, frozen VQ-VAEs, the mask-ratio
schedule, and the NaN-loss skip (counted, weights untouched, raising after N in a row)."""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from common.shapes import ShapeError
from gesture.data.info import DataInfo
from gesture.data.speakers import SpeakerMap
from gesture.layout import GLOBAL_DIM, GLOBAL_ROT_DIM, PARTS, POSE_DIM, SUB_SLICES, VQ_PARTS
from gesture.lit.mambatalk import MambaTalkModule
from gesture.loss import LossTargets, MambaTalkLoss
from gesture.masks import mask_ratio, random_mask, seed_mask
from gesture.models.mambatalk import GeneratorOutput, MambaLayer, MambaStream, MambaTalk, hold_last_visible
from gesture.models.vqvae import VQVAE

TINY_GEN = dict(hidden=32, audio_f=16, motion_f=16, decoder_layers=1, heads=2, word_dim=8, dropout=0.0)
TINY_VQ = dict(hidden=16, code_dim=8, n_codes=16, depth=1)
SPEAKERS = SpeakerMap([2, 4])  # 2 known + unknown -> 3 embedding rows
AUDIO_DIM = 3


def tiny_generator(**kw) -> MambaTalk:
    torch.manual_seed(0)
    return MambaTalk(num_speakers=SPEAKERS.num_embeddings, vocab_size=6, audio_dim=AUDIO_DIM, code_dim=8,
                     n_codes=16, **{**TINY_GEN, **kw})


def tiny_vqvaes() -> dict[str, VQVAE]:
    torch.manual_seed(1)
    return {p: VQVAE(p, **TINY_VQ) for p in VQ_PARTS}


def tiny_info() -> DataInfo:
    return DataInfo(mean=[0.0] * POSE_DIM, std=[1.0] * POSE_DIM, audio_mean=[0.0] * AUDIO_DIM,
                    audio_std=[1.0] * AUDIO_DIM, vocab_words=["yes", "no", "hello", "hands"],
                    speaker_raw_ids=list(SPEAKERS.raw_ids), audio=dict(kind="onset_amp", n_mels=64, sr=16000, fps=30.0))


def tiny_module(**kw) -> MambaTalkModule:
    module = MambaTalkModule(functools.partial(MambaTalk, **TINY_GEN), tiny_vqvaes(),
                             functools.partial(torch.optim.Adam, lr=1e-3), data_info=tiny_info(),
                             **{"fgd_encoder": None, "pose_length": 16, **kw})
    torch.manual_seed(0)
    module.configure_model()
    return module


def inputs(b=2, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(audio=torch.randn(b, t, AUDIO_DIM, generator=g), words=torch.randint(0, 6, (b, t), generator=g),
                speaker=torch.tensor([0, SPEAKERS.unknown_index])[:b],
                motion=torch.randn(b, t, POSE_DIM, generator=g), mask=seed_mask(b, t, 4))


def window_batch(i: int, t: int = 16, nan_audio: bool = False) -> dict:
    g = torch.Generator().manual_seed(100 + i)
    motion = torch.randn(t, POSE_DIM, generator=g)
    audio = torch.full((t, AUDIO_DIM), float("nan")) if nan_audio else torch.randn(t, AUDIO_DIM, generator=g)
    return dict(motion=motion, motion_raw=motion.clone(), audio=audio, words=torch.randint(0, 6, (t,), generator=g),
                speaker=torch.tensor(i % SPEAKERS.num_embeddings), clip=f"c{i}", start=torch.tensor(0))


# ------------------------------------------------------------------------------------------------- generator
@pytest.mark.parametrize("audio_rate", ["frame", "sample"])
def test_output_shapes(audio_rate):
    model = tiny_generator(audio_rate=audio_rate).eval()
    x = inputs(b=2, t=16)
    if audio_rate == "sample":
        x["audio"] = torch.randn(2, 16 * 533 + 5, AUDIO_DIM)
    out = model(**x)
    for p in VQ_PARTS:
        assert out.latents[p].shape == (2, 16, 8)
        assert out.logits[p].shape == (2, 16, 16)
    assert out.global_motion.shape == (2, 16, GLOBAL_DIM)
    assert out.mamba_states == {}


def test_bad_shapes_raise():
    model = tiny_generator().eval()
    x = inputs()
    with pytest.raises(ShapeError, match="audio"):
        model(**{**x, "audio": x["audio"][:, :-1]})
    with pytest.raises(ShapeError, match="motion"):
        model(**{**x, "motion": x["motion"][..., :-1]})
    with pytest.raises(TypeError, match="mask must be bool"):
        model(**{**x, "mask": x["mask"].float()})


@pytest.mark.parametrize("bad", [-1, SPEAKERS.num_embeddings, 99])
def test_out_of_range_speaker_raises_before_the_embedding(bad):
    model = tiny_generator().eval()
    calls = []
    for emb in (model.speaker_face, model.speaker_body):
        emb.register_forward_pre_hook(lambda m, a: calls.append(a[0].clone()))
    x = inputs()
    with pytest.raises(ValueError, match=rf"speaker ids \[{bad}\].*\[0, {SPEAKERS.num_embeddings - 1}\]"):
        model(**{**x, "speaker": torch.tensor([0, bad])})
    assert calls == [], "the embedding must never see an invalid id (clamping -1 to 0 would train speaker 0)"


def test_raw_unknown_speaker_maps_to_the_unknown_row():
    # -1 (unknown) is handled by the data's SpeakerMap, giving the reserved last row that the model accepts.
    model = tiny_generator().eval()
    idx = SPEAKERS.index(-1)
    assert idx == SPEAKERS.unknown_index == model.num_speakers - 1
    x = inputs()
    out = model(**{**x, "speaker": torch.tensor([idx, idx])})
    assert torch.isfinite(out.global_motion).all()
    with pytest.raises(KeyError, match="not in the speaker map"):
        SPEAKERS.index(7)


def test_masked_values_do_not_reach_the_output():
    """Whatever the ground truth holds in the frames to generate, the prediction is the same (no leak)."""
    model = tiny_generator().eval()
    x = inputs()
    changed = x["motion"].clone()
    changed[:, 4:] = torch.randn_like(changed[:, 4:]) * 10
    a, b = model(**x), model(**{**x, "motion": changed})
    for p in VQ_PARTS:
        torch.testing.assert_close(a.logits[p], b.logits[p], rtol=0, atol=0)
    torch.testing.assert_close(a.global_motion, b.global_motion, rtol=0, atol=0)
    # ...while the seed frames do matter
    seeded = x["motion"].clone()
    seeded[:, :4] += 1.0
    assert not torch.allclose(model(**{**x, "motion": seeded}).logits["body"], a.logits["body"])


def test_hold_last_visible_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    x, visible = torch.randn(2, 9, 5, generator=g), torch.rand(2, 9, 5, generator=g) < 0.4
    expect = torch.zeros_like(x)
    for b in range(2):
        for d in range(5):
            last = None
            for t in range(9):
                if visible[b, t, d]:
                    last = x[b, t, d]
                expect[b, t, d] = 0.0 if last is None else last
    torch.testing.assert_close(hold_last_visible(x, visible), expect, rtol=0, atol=0)


def test_global_residual_starts_where_the_seed_ends():
    """With the residual head at its zero initialisation, the generated global part holds the last seed frame:
    the rotation when contact is classified, all 7 channels when it is regressed (MambaTalk's single vector)."""
    x = inputs()
    g, rot = PARTS["global"], slice(0, GLOBAL_ROT_DIM)
    held = x["motion"][:, 3:4, g].expand(-1, 12, -1)
    for contact, channels in (("classify", rot), ("regress", slice(None))):
        out = tiny_generator(contact=contact).eval()(**x).global_motion
        torch.testing.assert_close(out[:, :4, channels], x["motion"][:, :4, g][..., channels], rtol=0, atol=0)
        torch.testing.assert_close(out[:, 4:, channels], held[..., channels], rtol=0, atol=0)
        plain = tiny_generator(global_residual=False, contact=contact).eval()(**x).global_motion
        assert not torch.allclose(plain[:, 4:, channels], held[..., channels])


def test_classified_contact_is_the_normalised_label_of_its_logit():
    """Contact comes out as exact 0/1 labels (logit > 0) in the data's normalised units, with its logits; the
    regressing head has no logits."""
    model = tiny_generator(global_residual=False).eval()
    mean, std = torch.tensor([0.9, 0.95, 0.5, 0.98]), torch.tensor([0.3, 0.2, 0.5, 0.14])
    model.set_contact_stats(mean, std)
    out = model(**inputs())
    c = slice(GLOBAL_ROT_DIM, GLOBAL_DIM)
    raw = out.global_motion[..., c].double() * std.double() + mean.double()
    expect = (out.contact_logits > 0).double()
    torch.testing.assert_close(raw, expect, rtol=0, atol=1e-6)
    assert 0 < float(expect.mean()) < 1  # both decisions occur at this random init
    assert tiny_generator(contact="regress")(**inputs()).contact_logits is None
    assert "contact_mean" in model.state_dict()  # the normalisation travels with the weights
    with pytest.raises(ValueError, match="contact std"):
        model.set_contact_stats(mean, torch.zeros(4))
    with pytest.raises(ValueError, match="contact must be one of"):
        tiny_generator(contact="threshold")


def test_words_off_changes_the_output():
    model = tiny_generator().eval()
    x = inputs()
    assert not torch.allclose(model(**x).logits["body"], model(**x, use_word=False).logits["body"])


def test_mamba_layer_split_with_carried_state_equals_one_pass():
    torch.manual_seed(0)
    layer = MambaLayer(8).eval()
    x = torch.randn(2, 12, 8)
    states: dict = {}
    y = layer(x, MambaStream(carry_at=5), states)
    torch.testing.assert_close(y, layer(x), atol=1e-5, rtol=1e-5)
    # the carried state is the state after frame 5: continuing from it reproduces frames 5.. of the full pass
    y_tail = layer.mamba(layer.norm(x[:, 5:]), state=states[layer.state_key])
    torch.testing.assert_close(x[:, 5:] + y_tail, y[:, 5:], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------ loss
def _targets(b=2, t=16, seed=0) -> tuple[GeneratorOutput, LossTargets]:
    g = torch.Generator().manual_seed(seed)
    out = GeneratorOutput(latents={p: torch.randn(b, t, 8, generator=g) for p in VQ_PARTS},
                          logits={p: torch.randn(b, t, 16, generator=g) for p in VQ_PARTS},
                          global_motion=torch.randn(b, t, GLOBAL_DIM, generator=g))
    tgt = LossTargets(motion=torch.randn(b, t, POSE_DIM, generator=g),
                      latents={p: torch.randn(b, t, 8, generator=g) for p in VQ_PARTS},
                      indices={p: torch.randint(0, 16, (b, t), generator=g) for p in VQ_PARTS})
    return out, tgt


def test_loss_terms_match_numpy_references():
    out, tgt = _targets()
    decoded = torch.randn_like(tgt.motion)
    loss = MambaTalkLoss(acc={"body": 0.7})
    terms = loss(out, tgt, {p: decoded[..., PARTS[p]] for p in loss.decoded_parts})
    assert loss.decoded_parts == ("body", "hand", "global")
    n = lambda x: x.detach().double().numpy()  # noqa: E731
    expect = {f"latent/{p}": ((n(out.latents[p]) - n(tgt.latents[p])) ** 2).mean() for p in VQ_PARTS}
    expect["latent/global"] = ((n(out.global_motion) - n(tgt.motion[..., PARTS["global"]])) ** 2).mean()
    for p, eps in (("body", 0.1), ("hand", 0.0)):
        logits, idx = n(out.logits[p]).reshape(-1, 16), tgt.indices[p].numpy().reshape(-1)
        logp = logits - logits.max(1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
        expect[f"cls/{p}"] = ((1 - eps) * -logp[np.arange(len(idx)), idx] + eps * -logp.mean(1)).mean()
    for p in ("global", "body", "hand"):
        d_pred, d_gt = np.diff(n(decoded[..., PARTS[p]]), axis=1), np.diff(n(tgt.motion[..., PARTS[p]]), axis=1)
        ch = slice(0, GLOBAL_ROT_DIM) if p == "global" else slice(None)  # global: rotation, not contact
        expect[f"vel/{p}"] = np.abs(d_pred[..., ch] - d_gt[..., ch]).mean()
    a_pred = np.diff(n(decoded[..., PARTS["body"]]), 2, axis=1)
    expect["acc/body"] = np.abs(a_pred - np.diff(n(tgt.motion[..., PARTS["body"]]), 2, axis=1)).mean()
    assert "cls/face" not in terms  # weight 0 by default
    for k, v in expect.items():
        assert float(terms[k]) == pytest.approx(v, rel=1e-5), k
    weights = {**{f"latent/{p}": 3.0 for p in (*VQ_PARTS, "global")}, "cls/body": 1.0, "cls/hand": 2.0,
               "vel/global": 2.0, "vel/body": 0.5, "vel/hand": 1.0, "acc/body": 0.7}
    assert float(terms["loss"]) == pytest.approx(sum(weights[k] * expect[k] for k in weights), rel=1e-5)


def test_global_velocity_term_ignores_foot_contact_steps():
    out, tgt = _targets()
    decoded = {p: tgt.motion[..., PARTS[p]] for p in ("body", "hand", "global")}
    flipped = decoded["global"].clone()
    flipped[:, 3::2, GLOBAL_ROT_DIM:] += 1.0  # contact switching every frame: a label, not a motion
    terms = MambaTalkLoss()(out, tgt, {**decoded, "global": flipped})
    assert float(terms["vel/global"]) == 0.0
    turned = decoded["global"].clone()
    turned[:, 3::2, :GLOBAL_ROT_DIM] += 1.0  # the same steps on the rotation are penalised
    assert float(MambaTalkLoss()(out, tgt, {**decoded, "global": turned})["vel/global"]) > 0.1


def test_classified_contact_is_a_binary_cross_entropy_and_leaves_the_global_mse_to_the_rotation():
    out, tgt = _targets()
    g = torch.Generator().manual_seed(3)
    b, t = tgt.motion.shape[:2]
    logits = torch.randn(b, t, GLOBAL_DIM - GLOBAL_ROT_DIM, generator=g)
    labels = (torch.rand(b, t, GLOBAL_DIM - GLOBAL_ROT_DIM, generator=g) < 0.8).float()
    classified = GeneratorOutput(out.latents, out.logits, out.global_motion, contact_logits=logits)
    with_labels = LossTargets(tgt.motion, tgt.latents, tgt.indices, contact=labels)
    terms = MambaTalkLoss(contact=0.5)(classified, with_labels)
    n = lambda x: x.detach().double().numpy()  # noqa: E731
    z, y = n(logits), n(labels)
    bce = (np.logaddexp(0.0, z) - y * z).mean()  # -y log s(z) - (1 - y) log(1 - s(z))
    assert float(terms["cls/contact"]) == pytest.approx(bce, rel=1e-5)
    rot = slice(0, GLOBAL_ROT_DIM)
    mse = ((n(out.global_motion)[..., rot] - n(tgt.motion[..., PARTS["global"]])[..., rot]) ** 2).mean()
    assert float(terms["latent/global"]) == pytest.approx(mse, rel=1e-5)
    plain = MambaTalkLoss(contact=0.5)(out, with_labels)  # regressed contact: the 7-d MSE, no cross-entropy
    assert "cls/contact" not in plain
    assert float(plain["latent/global"]) == pytest.approx(
        ((n(out.global_motion) - n(tgt.motion[..., PARTS["global"]])) ** 2).mean(), rel=1e-5)
    with pytest.raises(ValueError, match="LossTargets.contact"):
        MambaTalkLoss()(classified, tgt)
    assert MambaTalkLoss().without_parts(["global"]).contact_w == 0.0


def test_module_targets_hold_the_raw_contact_labels():
    module = tiny_module()
    mean, std = module.motion_mean.clone(), module.motion_std.clone()
    c = SUB_SLICES["contact"]
    mean[c], std[c] = 0.9, 0.3
    module.motion_mean.copy_(mean)
    module.motion_std.copy_(std)
    labels = (torch.rand(2, 16, 4, generator=torch.Generator().manual_seed(0)) < 0.7).float()
    motion = torch.randn(2, 16, POSE_DIM)
    motion[..., c] = (labels - 0.9) / 0.3
    torch.testing.assert_close(module.targets(motion).contact, labels, rtol=0, atol=0)


def test_speed_term_asks_for_the_amount_of_motion_not_its_timing():
    out, tgt = _targets()
    gt = {p: tgt.motion[..., PARTS[p]] for p in ("body", "hand", "global")}
    loss = MambaTalkLoss(vel={}, speed={"global": 1.0, "body": 0.5})
    assert loss.decoded_parts == ("body", "global")
    reversed_time = {p: v.flip(1) for p, v in gt.items()}  # the same moves in another order
    terms = loss(out, tgt, reversed_time)
    assert float(terms["speed/global"]) == pytest.approx(0.0, abs=1e-6) and float(terms["speed/body"]) < 1e-6
    assert float(MambaTalkLoss()(out, tgt, reversed_time)["vel/global"]) > 0.1  # vel does ask for the timing
    still = {p: v[:, :1].expand_as(v) for p, v in gt.items()}
    n = lambda x: x.detach().double().numpy()  # noqa: E731
    g = n(gt["global"])[..., :GLOBAL_ROT_DIM]  # the rotation channels only
    expect = np.abs(np.abs(np.diff(g, axis=1)).mean(axis=(1, 2))).mean()  # still: predicted speed 0
    assert float(loss(out, tgt, still)["speed/global"]) == pytest.approx(expect, rel=1e-5)
    with pytest.raises(ValueError, match="speed: unknown parts"):
        MambaTalkLoss(speed={"feet": 1.0})


def test_profile_term_asks_for_the_speed_curve_not_the_direction():
    out, tgt = _targets()
    gt = {p: tgt.motion[..., PARTS[p]] for p in ("body", "hand")}
    loss = MambaTalkLoss(vel={}, profile={"body": 1.0, "hand": 0.5})
    scale = 0.5 + torch.rand(POSE_DIM, generator=torch.Generator().manual_seed(1))
    loss.set_channel_scale(scale)
    assert loss.decoded_parts == ("body", "hand")
    mirrored = {p: 2 * v[:, :1] - v for p, v in gt.items()}  # every move in the opposite direction, same speeds
    terms = loss(out, tgt, mirrored)
    assert float(terms["profile/body"]) < 1e-6 and float(terms["profile/hand"]) < 1e-6
    assert float(MambaTalkLoss()(out, tgt, {**mirrored, "global": tgt.motion[..., PARTS["global"]]})["vel/body"]) > 0.1
    # numpy reference on another prediction: raw-unit speeds of BC's groups over the gt's mean speed per sample
    g = torch.Generator().manual_seed(2)
    pred = {p: v + 0.3 * torch.randn(v.shape, generator=g) for p, v in gt.items()}
    terms = loss(out, tgt, pred)
    n = lambda x: x.detach().double().numpy()  # noqa: E731
    for p, groups in (("body", [slice(None)]), ("hand", [slice(0, 54), slice(54, 108)])):
        s = n(scale)[PARTS[p]]
        errs = []
        for grp in groups:
            sp = np.linalg.norm((np.diff(n(pred[p]), axis=1) * s)[..., grp], axis=-1)  # [b, t - 1]
            sg = np.linalg.norm((np.diff(n(gt[p]), axis=1) * s)[..., grp], axis=-1)
            errs.append(np.abs(sp - sg) / sg.mean(axis=1, keepdims=True))
        assert float(terms[f"profile/{p}"]) == pytest.approx(np.mean(errs), rel=1e-4), p
    # the loss copy without a part keeps the raw scale
    assert torch.equal(loss.without_parts(["face"]).channel_scale, scale)
    with pytest.raises(ValueError, match="channel_scale"):
        loss.set_channel_scale(torch.full((POSE_DIM,), float("nan")))


def test_module_gives_the_loss_the_training_std():
    info = tiny_info()
    std = [0.5 + 0.01 * i for i in range(POSE_DIM)]
    module = MambaTalkModule(functools.partial(MambaTalk, **TINY_GEN), tiny_vqvaes(),
                             functools.partial(torch.optim.Adam, lr=1e-3), fgd_encoder=None, pose_length=16,
                             data_info=DataInfo(**{**info.to_dict(), "std": std}))
    module.configure_model()
    torch.testing.assert_close(module.loss.channel_scale, torch.tensor(std))


def test_loss_never_broadcasts():
    out, tgt = _targets()
    short = LossTargets(motion=tgt.motion, latents={**tgt.latents, "body": tgt.latents["body"][:, :1]},
                        indices=tgt.indices)
    with pytest.raises(ShapeError, match="latent body"):
        MambaTalkLoss()(out, short)
    decoded = {p: tgt.motion[:, :1, PARTS[p]] for p in ("body", "hand", "global")}
    with pytest.raises(ShapeError, match="decoded"):
        MambaTalkLoss()(out, tgt, decoded)
    with pytest.raises(KeyError, match="hand"):
        MambaTalkLoss()(out, tgt, {p: tgt.motion[..., PARTS[p]] for p in ("body", "global")})


def test_zero_variance_part_switches_its_terms_off():
    loss = MambaTalkLoss().without_parts(["face"])
    assert loss.latent_w["face"] == 0 and loss.latent_w["body"] == 3.0
    with pytest.raises(ValueError, match="unknown parts"):
        MambaTalkLoss(vel={"jaw": 1.0})


# ---------------------------------------------------------------------------------------------------- module
def test_mask_ratio_schedule():
    assert mask_ratio(0.0) == pytest.approx(0.05)
    assert mask_ratio(0.5) == pytest.approx(0.525)
    assert mask_ratio(1.0) == pytest.approx(1.0)
    assert mask_ratio(-1.0) == pytest.approx(0.05) and mask_ratio(3.0) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    for ratio in (0.05, 0.5, 1.0):
        frac = random_mask(8, 64, ratio, generator=g).float().mean().item()
        n = 8 * 64 * POSE_DIM
        assert abs(frac - ratio) <= 5 * math.sqrt(ratio * (1 - ratio) / n) + 1e-9
    m = seed_mask(2, 10, 4)
    assert not m[:, :4].any() and m[:, 4:].all()


def test_mask_ratio_rises_over_training():
    module = tiny_module()
    data = [window_batch(i) for i in range(8)]
    ratios = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            ratios.append(pl_module.current_mask_ratio())

    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Record()], limit_val_batches=0)
    trainer.fit(module, DataLoader(data, batch_size=4))
    assert ratios[0] == pytest.approx(0.05)
    assert all(b > a for a, b in zip(ratios, ratios[1:]))
    assert ratios[-1] == pytest.approx(0.05 + 0.95 * 3 / 4)  # step 3 of 4


def test_vqvaes_stay_frozen_in_train_mode():
    module = tiny_module()
    module.train()
    assert module.model.generator.training
    assert all(not m.training for vq in module.model.vqvaes.values() for m in vq.modules())
    assert all(not p.requires_grad for p in module.model.vqvaes.parameters())
    opt = module.configure_optimizers()
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in module.model.generator.parameters()}


def _fit(module, data, **kw):
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, **kw)
    trainer.fit(module, DataLoader(data, batch_size=2))
    return trainer


def test_nonfinite_loss_skips_the_step_counts_it_and_leaves_weights(caplog):
    module = tiny_module()
    before = {k: v.clone() for k, v in module.model.generator.state_dict().items()}
    data = [window_batch(i, nan_audio=True) for i in range(4)]  # two batches, both NaN
    trainer = _fit(module, data)
    assert module.nonfinite_skipped == 2
    assert float(trainer.callback_metrics["train/nonfinite_skipped"]) == 2.0
    after = module.model.generator.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step must not change the weights"
    assert "non-finite loss" in caplog.text
    # a finite batch afterwards trains normally and resets the run of non-finite steps
    _fit(module, [window_batch(10), window_batch(11)])
    assert module._consecutive_nonfinite == 0 and module.nonfinite_skipped == 2
    assert not all(torch.equal(before[k], v) for k, v in module.model.generator.state_dict().items())


def test_too_many_nonfinite_losses_in_a_row_raise():
    module = tiny_module(max_consecutive_nonfinite=2)
    with pytest.raises(RuntimeError, match="2 consecutive non-finite losses"):
        _fit(module, [window_batch(i, nan_audio=True) for i in range(6)])


def test_weight_averaging_callback_builds_the_model_from_the_datamodule_before_setup(monkeypatch, tmp_path):
    # Lightning's weight averaging calls configure_model in its own setup, before the module's setup: the sizes
    # must come from the (already set up) datamodule there too, and the average must then follow the training.
    from common.callbacks import EMA

    data = [window_batch(i) for i in range(4)]

    class WindowData(L.LightningDataModule):
        cache = "in memory"

        def train_dataloader(self):
            return DataLoader(data, batch_size=2)

    seen = []
    monkeypatch.setattr(DataInfo, "from_datamodule", classmethod(lambda cls, dm: seen.append(dm) or tiny_info()))
    module = MambaTalkModule(functools.partial(MambaTalk, **TINY_GEN), tiny_vqvaes(),
                             functools.partial(torch.optim.Adam, lr=1e-3), fgd_encoder=None, pose_length=16)
    assert module.model is None
    dm = WindowData()
    ema = EMA(decay=0.5, update_starting_at_step=1)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[ema])
    trainer.fit(module, datamodule=dm)
    assert seen == [dm] and module.data_info is not None
    assert int(ema._average_model.n_averaged) > 0


def test_validation_logs_the_first_windows_parameter_view_on_rank_zero(monkeypatch):
    logged = []
    monkeypatch.setattr("gesture.lit.mambatalk.log_image",
                        lambda module, key, image, caption=None: logged.append((key, image)))
    module = tiny_module()
    data = [window_batch(i) for i in range(4)]
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_train_batches=1)
    trainer.fit(module, DataLoader(data, batch_size=2), DataLoader(data, batch_size=2))
    assert [key for key, _ in logged] == ["val/motion"], "one figure per validation (first batch only)"
    image = logged[0][1]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.std() > 10, "the figure has content, not a blank canvas"


def test_frozen_vqvae_guard_counters_are_logged_by_the_generator():
    module = tiny_module()
    body_q = module.model.vqvaes["body"].quantizer
    body_q.map2index(torch.full((1, 2, TINY_VQ["code_dim"]), float("nan")))  # a NaN latent reached the quantizer
    caught = int(body_q.nonfinite_inputs)
    assert caught > 0
    trainer = _fit(module, [window_batch(i) for i in range(2)])
    assert float(trainer.callback_metrics["train/vq_body_nonfinite"]) == caught
    assert float(trainer.callback_metrics["train/vq_hand_nonfinite"]) == 0.0
    assert {"train/vq_body_clamped", "train/vq_face_clamped"} <= set(trainer.callback_metrics)


def test_missing_fgd_encoder_warns_and_training_goes_on_with_val_loss_as_monitor(tmp_path, caplog):
    """An FGD encoder that does not fit the data must not crash training: one warning, no FGD, and
    the best checkpoint follows val/loss instead of a metric that will never be logged."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = tiny_module(fgd_encoder=str(tmp_path / "no_such_encoder.ckpt"))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", monitor="val/fgd", mode="min", save_top_k=1)
    data = [window_batch(i) for i in range(4)]
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ckpt], limit_train_batches=1, num_sanity_val_steps=0)
    with caplog.at_level(logging.WARNING):
        trainer.fit(module, DataLoader(data, batch_size=2), DataLoader(data, batch_size=2))
    assert trainer.current_epoch == 2 and module.global_step == 2
    assert ckpt.monitor == "val/loss" and Path(ckpt.best_model_path).is_file()
    assert "val/fgd" not in trainer.callback_metrics and "val/vel_ratio/body" in trainer.callback_metrics
    fgd_warnings = [r for r in caplog.records if "FGD" in r.getMessage() and r.levelno == logging.WARNING]
    assert 1 <= len(fgd_warnings) <= 2, [r.getMessage() for r in fgd_warnings]  # metrics + monitor switch, once


def test_continuous_latent_target_is_the_vq_encoder_output_and_decodes_continuously():
    quantised, continuous = tiny_module(), tiny_module(latent_target="continuous")
    assert continuous.decode_from == dict.fromkeys(VQ_PARTS, "continuous")
    assert quantised.decode_from == {"body": "logits", "hand": "logits", "face": "latent"}
    motion = window_batch(0)["motion"][None]
    t_q, t_c = quantised.targets(motion), continuous.targets(motion)
    for p in VQ_PARTS:
        vq = continuous.model.vqvaes[p]
        with torch.no_grad():
            z_e = vq.encode(motion[..., PARTS[p]])
        torch.testing.assert_close(t_c.latents[p], z_e)
        torch.testing.assert_close(t_q.latents[p], vq.quantizer.get_codebook_entry(vq.quantizer.map2index(z_e)))
        assert torch.equal(t_q.indices[p], t_c.indices[p])  # classification targets do not change
    with pytest.raises(ValueError, match="latent_target"):
        tiny_module(latent_target="soft")
    _fit(continuous, [window_batch(i) for i in range(2)])  # trains end to end


@pytest.mark.parametrize("failure", ["window_longer_than_validation", "encoder_raises"])
def test_fgd_lost_after_setup_falls_back_to_val_loss(tmp_path, caplog, monkeypatch, failure):
    """FGD can also vanish after setup: an encoder trained on longer windows than validation has (no FGD window
    ever), or one whose forward raises during a validation. Either way the checkpoint that follows val/fgd must
    switch to val/loss (one warning) instead of stopping training with a MisconfigurationException."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from test_gesture_metrics import TINY_ENCODER, save_encoder

    from gesture.models.motion_encoder import MotionEncoder

    window = 64 if failure == "window_longer_than_validation" else 8
    save_encoder(tmp_path / "enc.ckpt", MotionEncoder(**{**TINY_ENCODER, "window": window}))
    if failure == "encoder_raises":
        def broken(self, motion_raw):
            raise RuntimeError("simulated encoder failure")
        monkeypatch.setattr(MotionEncoder, "features", broken)
    module = tiny_module(fgd_encoder=str(tmp_path / "enc.ckpt"))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpts", monitor="val/fgd", mode="min", save_top_k=1)
    data = [window_batch(i) for i in range(4)]  # 16-frame validation windows
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ckpt], limit_train_batches=1, num_sanity_val_steps=0)
    with caplog.at_level(logging.WARNING):
        trainer.fit(module, DataLoader(data, batch_size=2), DataLoader(data, batch_size=2))
    assert trainer.current_epoch == 2
    assert ckpt.monitor == "val/loss" and Path(ckpt.best_model_path).is_file()
    switches = [r for r in caplog.records if "now tracks val/loss" in r.getMessage()]
    assert len(switches) == 1, [r.getMessage() for r in caplog.records]

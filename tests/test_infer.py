"""Inference end to end on a tiny synthetic corpus: a tiny MambaTalk trained two steps by Lightning, tested against
baselines, saved; the checkpoint alone rebuilds the model; wav + TextGrid -> an npz with every SAM-3D-Body key and
the per-clip render constants (constants present, cam_t constant over the clip); test-split mode."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from gesture.data.corpus import load_clip
from gesture.data.datamodule import GestureDataModule
from gesture.data.synthetic import SyntheticConfig
from gesture.data.synthetic import generate as make_corpus
from gesture.generate import generate
from gesture.infer import load_generator, main
from gesture.layout import POSE_DIM, VQ_PARTS, pack
from gesture.lit.mambatalk import MambaTalkModule
from gesture.models.mambatalk import MambaTalk
from gesture.models.vqvae import VQVAE

TINY_GEN = dict(hidden=16, audio_f=8, motion_f=8, decoder_layers=1, heads=2, word_dim=4, dropout=0.0,
                audio_depth=1)
POSE_LENGTH = 16
FRAME_SHAPES = {"body_pose_params": 133, "hand_pose_params": 108, "expr_params": 72, "global_rot": 3, "contact": 4}
CONSTANT_SHAPES = {"cam_t": (3,), "focal_length": (), "scale_params": (28,), "shape_params": (45,), "width": (),
                   "height": (), "fps": ()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer")
    root = tmp / "corpus"
    make_corpus(root, SyntheticConfig(seed=3, num_speakers=2, clips_per_speaker=3, seconds=2.5, unknown_clips=1))
    dm = GestureDataModule(root=str(root), cache_dir=str(tmp / "cache"), pose_length=POSE_LENGTH, stride=8,
                           batch_size=4)
    torch.manual_seed(0)
    vqvaes = {p: VQVAE(p, hidden=8, code_dim=8, n_codes=16, depth=1) for p in VQ_PARTS}
    # Lists as Hydra passes them (ListConfig): the checkpoint must still load with weights_only=True.
    module = MambaTalkModule(functools.partial(MambaTalk, **TINY_GEN), vqvaes,
                             functools.partial(torch.optim.Adam, lr=1e-3), pose_length=POSE_LENGTH,
                             passes=OmegaConf.create(["seed", "random"]), fgd_encoder=None, val_bc_skip=2,
                             baselines=OmegaConf.create(["gt", "mean_pose"]))
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(tmp))
    trainer.fit(module, datamodule=dm)
    ckpt = tmp / "tiny.ckpt"
    trainer.save_checkpoint(ckpt)
    torch.load(ckpt, weights_only=True)
    results = trainer.test(module, datamodule=dm, ckpt_path=str(ckpt), verbose=False)[0]  # as common.train does
    return SimpleNamespace(tmp=tmp, root=root, dm=dm, module=module, ckpt=ckpt, results=results)


def _check_result(path: Path, n: int) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        d = {k: z[k] for k in z.files}
    for k, size in FRAME_SHAPES.items():
        assert d[k].shape == (n, size), k
        assert np.isfinite(d[k]).all(), k
    for k, shape in CONSTANT_SHAPES.items():
        assert d[k].shape == shape, k  # per-clip constants: one value, never per frame (a per-frame cam_t jitters the camera)
    # SAM-3D-Body's own name beside ours: its per-frame camera, here the clip's, every frame the same
    assert d["pred_cam_t"].shape == (n, 3) and (d["pred_cam_t"] == d["cam_t"]).all()
    return d


def test_lightning_test_reports_the_model_next_to_baselines(trained):
    r = trained.results
    for key in ("test/l1div", "test/vel_ratio/body", "test/boundary_jump", "test/baseline_gt/l1div",
                "test/baseline_mean_pose/l1div"):
        assert key in r, key
    assert r["test/baseline_gt/vel_ratio/body"] == pytest.approx(1.0)
    assert r["test/baseline_mean_pose/l1div"] == pytest.approx(0.0, abs=1e-9)


def test_checkpoint_alone_rebuilds_the_trained_model(trained):
    gen = load_generator(trained.ckpt)
    assert gen.info.speaker_raw_ids == trained.dm.speakers.raw_ids
    assert gen.info.vocab_words == trained.dm.vocab.words
    np.testing.assert_allclose(gen.info.mean, trained.dm.stats["mean"].numpy())
    assert gen.pose_length == POSE_LENGTH and gen.pre_frames == 4
    n = 40
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, n, gen.info.audio_dim, generator=g), torch.randint(0, gen.info.vocab_size, (1, n), generator=g),
            torch.tensor([0]), torch.randn(1, n, POSE_DIM, generator=g), n)
    kw = dict(pose_length=POSE_LENGTH, pre_frames=4)
    expected = generate(trained.module.model, *args, **kw).motion
    torch.testing.assert_close(generate(gen.model, *args, **kw).motion, expected, rtol=0, atol=0)


def test_single_clip_npz_has_every_key_and_the_source_constants(trained, tmp_path):
    clip = sorted(p.stem for p in (trained.root / "wave16k").glob("*.wav"))[0]
    wav, tg = trained.root / "wave16k" / f"{clip}.wav", trained.root / "textgrid" / f"{clip}.TextGrid"
    raw = load_clip(trained.root, clip)
    out = tmp_path / "res.npz"
    main(["--ckpt", str(trained.ckpt), "--wav", str(wav), "--textgrid", str(tg), "--speaker",
          str(raw.raw_speaker if raw.raw_speaker is not None else -1), "--out", str(out)])
    n = int(np.floor(sf.info(str(wav)).frames * 30 / 16000 + 0.5))
    d = _check_result(out, n)
    np.testing.assert_allclose(d["cam_t"], raw.constants.cam_t, rtol=1e-6)
    np.testing.assert_allclose(d["scale_params"], raw.constants.scale_params, rtol=1e-6)
    assert int(d["width"]) == raw.constants.width and float(d["fps"]) == 30.0
    # the arrays are the layout vector's parts: packing them back gives a [N, 320] motion
    assert pack({k: d[k] for k in FRAME_SHAPES if k != "contact"}, d["contact"]).shape == (n, POSE_DIM)


def test_constants_fall_back_to_the_speakers_training_average(trained, tmp_path):
    clip = sorted(p.stem for p in (trained.root / "wave16k").glob("*.wav"))[0]
    shutil.copy(trained.root / "wave16k" / f"{clip}.wav", tmp_path / "a.wav")
    shutil.copy(trained.root / "textgrid" / f"{clip}.TextGrid", tmp_path / "a.TextGrid")
    info = load_generator(trained.ckpt).info
    raw = info.speaker_raw_ids[0]
    train = trained.dm.cache.records("train")
    np.testing.assert_allclose(info.constants[str(raw)]["cam_t"],
                               np.mean([r["constants"]["cam_t"] for r in train if r["raw_speaker"] == raw], axis=0))
    np.testing.assert_allclose(info.constants["default"]["cam_t"],
                               np.mean([r["constants"]["cam_t"] for r in train], axis=0))
    for speaker, key in ((raw, str(raw)), (-1, "default")):
        out = tmp_path / f"res_{speaker}.npz"
        main(["--ckpt", str(trained.ckpt), "--wav", str(tmp_path / "a.wav"), "--textgrid",
              str(tmp_path / "a.TextGrid"), "--speaker", str(speaker), "--out", str(out)])
        with np.load(out) as d:
            np.testing.assert_allclose(d["cam_t"], info.constants[key]["cam_t"], rtol=1e-6)
    with pytest.raises(KeyError, match="--speaker -1"):
        main(["--ckpt", str(trained.ckpt), "--wav", str(tmp_path / "a.wav"), "--textgrid",
              str(tmp_path / "a.TextGrid"), "--speaker", "77", "--out", str(tmp_path / "x.npz")])


def test_split_mode_writes_one_npz_per_test_clip_and_metrics(trained, tmp_path):
    main(["--ckpt", str(trained.ckpt), "--split", "test", "--out-dir", str(tmp_path)])
    test_clips = [r["name"] for r in trained.dm.cache.records("test")]
    assert sorted(p.stem for p in tmp_path.glob("*.npz")) == sorted(test_clips)
    for rec in trained.dm.cache.records("test"):
        d = _check_result(tmp_path / f"{rec['name']}.npz", rec["length"])
        assert d["gt"].shape == (rec["length"], POSE_DIM)
        np.testing.assert_allclose(d["cam_t"], rec["constants"]["cam_t"], rtol=1e-6)
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert sorted(report["clips"]) == sorted(test_clips)
    assert {"model", "gt", "same_speaker", "mean_pose", "random"} <= set(report["metrics"])
    assert "l1div" in report["metrics"]["model"]


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.ckpt"):
        load_generator(tmp_path / "nothing.ckpt")


def test_truncated_checkpoint_is_named(tmp_path):
    """A generator checkpoint cut short: an error naming the file, not torch's bare PytorchStreamReader one."""
    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(ValueError, match=r"could not read .*cut\.ckpt as a torch file \(truncated or corrupt"):
        load_generator(path)


def test_package_api_exports_the_documented_entry_points():
    """README's Python examples: `gesture.load_generator` / `gesture.infer_clip`, `handpose.HandTracker`."""
    import gesture
    import handpose
    from gesture import infer
    from handpose import tracker

    assert gesture.load_generator is infer.load_generator and gesture.infer_clip is infer.infer_clip
    assert handpose.HandTracker is tracker.HandTracker and hasattr(handpose.HandTracker, "from_checkpoint")
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        gesture.nope  # noqa: B018


def test_sam3d_checkpoint_adds_the_mhr_model_params_gesture_render_reads(trained, tmp_path):
    """With a SAM-3D-Body checkpoint's head bases, the npz carries the MHR model parameters composed from its own
    per-frame parameters (what gesture.render's MHR backend draws)."""
    from gesture.mhr_params import HeadBases, compose_model_params
    from gesture.render import load_result

    g = torch.Generator().manual_seed(0)
    state = {"head_pose.scale_mean": torch.randn(68, generator=g), "head_pose.scale_comps": torch.randn(28, 68, generator=g),
             "head_pose.hand_pose_mean": torch.randn(54, generator=g), "head_pose.hand_pose_comps": torch.randn(54, 54, generator=g),
             "head_pose.hand_joint_idxs_left": torch.arange(6, 33), "head_pose.hand_joint_idxs_right": torch.arange(40, 67)}
    torch.save({"state_dict": state}, tmp_path / "model.ckpt")
    clip = sorted(p.stem for p in (trained.root / "wave16k").glob("*.wav"))[0]
    out = tmp_path / "res.npz"
    main(["--ckpt", str(trained.ckpt), "--wav", str(trained.root / "wave16k" / f"{clip}.wav"), "--textgrid",
          str(trained.root / "textgrid" / f"{clip}.TextGrid"), "--out", str(out), "--sam3d-checkpoint",
          str(tmp_path / "model.ckpt")])
    with np.load(out) as z:
        d = {k: z[k] for k in z.files}
    t = {k: torch.from_numpy(d[k].astype(np.float64)) for k in ("global_rot", "body_pose_params", "hand_pose_params")}
    want = compose_model_params(t["global_rot"], t["body_pose_params"], t["hand_pose_params"],
                                torch.from_numpy(d["scale_params"].astype(np.float64))[None],
                                HeadBases.from_checkpoint(tmp_path / "model.ckpt"))
    assert d["mhr_model_params"].shape == (len(d["global_rot"]), 204)
    np.testing.assert_allclose(d["mhr_model_params"], want.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(load_result(out).model_params, d["mhr_model_params"])

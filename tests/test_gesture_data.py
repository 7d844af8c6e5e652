"""Gesture corpus loader, cache, synthetic corpus and datamodule on a tiny generated corpus (issue #4, 2-3).

Each bad input of the issue is written into a copy of the tiny corpus; strict mode must name the clip and
field, non-strict mode must count one skip. Independent references: exact rational frame bounds, loops over
raw samples, librosa onsets on the written wav files.
"""

import logging
import os
import shutil
from fractions import Fraction
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch

from gesture.data.audio import audio_features, fit_to_frames, frame_bounds, onset_amp_features
from gesture.data.corpus import CorpusError, foot_contact, load_clip
from gesture.data.preprocess import PreprocessConfig, build_gesture_cache
from gesture.data.speakers import SpeakerMap, speaker_from_name
from gesture.data.synthetic import EXPR_DRIFT_RANK, SyntheticConfig, generate
from gesture.data.textgrid import PAD, UNK, Vocabulary, frame_words, read_words
from gesture.layout import PARTS, POSE_DIM, SUB_SLICES
from gesture.metrics import BC_PARAM_GROUPS, group_speed, motion_beats

TINY = SyntheticConfig(seed=3, num_speakers=2, clips_per_speaker=2, seconds=4.0, unknown_clips=1)
VICTIM = "2_scott_0_1_1"  # a training clip; the corpus keeps other training data without it


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("corpus") / "tiny", TINY)


@pytest.fixture(scope="module")
def tiny_cache_dir(tiny, tmp_path_factory) -> Path:
    """Cache folder of the unmodified tiny corpus with the default config, built once for the module."""
    cache_dir = tmp_path_factory.mktemp("cache")
    build_gesture_cache(tiny, cache_dir)
    return cache_dir


def _copy(tiny: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "corpus"
    shutil.copytree(tiny, dst)
    return dst


# ------------------------------------------------------------------------------------------------ speakers
def test_speaker_map_contiguous_unknown_and_out_of_range():
    m = SpeakerMap([6, 2, 30, 2])
    assert m.raw_ids == [2, 6, 30] and m.num_known == 3 and m.unknown_index == 3 and m.num_embeddings == 4
    assert [m.index(r) for r in (2, 6, 30)] == [0, 1, 2]
    assert m.index(-1) == m.index(None) == 3
    for bad in (5, 31, 0, -2):
        with pytest.raises(KeyError, match=str(bad)):
            m.index(bad)
    assert SpeakerMap.from_json(m.to_json()).raw_ids == m.raw_ids
    with pytest.raises(ValueError):
        SpeakerMap([-1, 2])


def test_speaker_from_beat_names_only():
    assert speaker_from_name("2_scott_0_1_1") == 2
    assert speaker_from_name("30_katya_1_10_12") == 30
    for name in ("podcast_0001", "2_scott_0_1", "scott_2_0_1_1", "interview"):
        assert speaker_from_name(name) is None


def test_cache_speakers_are_valid_embedding_indices(tiny, tiny_cache_dir):
    cache = build_gesture_cache(tiny, tiny_cache_dir)
    assert not cache.built
    sp = cache.speakers
    assert sp.raw_ids == [2, 4] and sp.num_embeddings == 3
    seen = {}
    for split in ("train", "val", "test"):
        for r in cache.records(split):
            assert 0 <= r["speaker"] < sp.num_embeddings
            seen[r["clip"]] = r["speaker"]
    assert seen["podcast_0001"] == sp.unknown_index  # vid = -1, non-BEAT name
    assert seen["2_scott_0_1_1"] == 0 and seen["4_lawrence_0_1_1"] == 1
    emb = torch.nn.Embedding(sp.num_embeddings, 4)
    emb(torch.tensor(list(seen.values())))  # would raise on -1 or an out-of-range index
    assert cache.meta["speakers"]["counts"]["unknown"]["train"][0] == 1


# --------------------------------------------------------------------------------------------------- audio
def test_frame_bounds_match_exact_rational_rounding():
    b = frame_bounds(301, 16000, 30.0)
    exact = [int(Fraction(i * 16000, 30) + Fraction(1, 2)) for i in range(302)]
    assert b.tolist() == exact
    assert set(np.diff(b).tolist()) == {533, 534} and b[30] == 16000  # no drift: 1 s == 16000 samples


def test_onset_amp_features_align_with_samples():
    sr, fps, n = 16000, 30.0, 60
    bounds = frame_bounds(n, sr, fps)
    rng = np.random.default_rng(0)
    wave = (0.001 * rng.standard_normal(bounds[-1])).astype(np.float32)
    clicks = [int(bounds[15]) + 100, int(bounds[40]) + 400]
    for c in clicks:
        wave[c:c + 400] += np.hanning(400).astype(np.float32) * np.sin(np.arange(400) * 0.9).astype(np.float32)
    feats = onset_amp_features(wave, bounds, sr)
    assert feats.shape == (n, 3)
    amp_loop = [np.abs(wave[bounds[i]:bounds[i + 1]]).max() for i in range(n)]
    np.testing.assert_allclose(feats[:, 0], amp_loop, rtol=0, atol=0)
    onset_frames = np.flatnonzero(feats[:, 1])
    for f in (15, 40):
        assert np.abs(onset_frames - f).min() <= 1, onset_frames
    assert audio_features(wave, n, sr, fps, "mel", n_mels=16).shape == (n, 19)


def test_fit_to_frames_pads_one_frame_and_rejects_more():
    sr, fps = 16000, 30.0
    need = int(frame_bounds(90, sr, fps)[-1])
    assert len(fit_to_frames(np.zeros(need - 500, np.float32), 90, sr, fps)) == need
    assert len(fit_to_frames(np.zeros(need + 999, np.float32), 90, sr, fps)) == need
    with pytest.raises(ValueError, match="shorter than the motion"):
        fit_to_frames(np.zeros(need - 600, np.float32), 90, sr, fps)
    with pytest.raises(ValueError, match=r"1\.200x the motion .* captured at 25 fps"):
        fit_to_frames(np.zeros(int(need * 1.2), np.float32), 90, sr, fps)
    assert len(fit_to_frames(np.zeros(int(need * 1.2), np.float32), 90, sr, fps, max_excess=None)) == need


def test_foot_contact_speed_threshold():
    kp = np.zeros((5, 70, 3), np.float32)
    kp[3:, 15, 1] = 0.05  # left big toe lifts between frames 2 and 3
    c = foot_contact(kp, (13, 14, 15, 18), 0.01)
    assert c.shape == (5, 4)
    assert c[:, 2].tolist() == [1, 1, 0, 1, 1] and c[:, [0, 1, 3]].all()


# ---------------------------------------------------------------------------------------------------- text
def test_words_per_frame_and_vocabulary(tiny):
    words = read_words(tiny / "textgrid" / f"{VICTIM}.TextGrid")
    assert words and all(w.end > w.start for w in words)
    labels = frame_words(words, 120, 30.0)
    for i in (int(words[0].start * 30) + 1, int(words[-1].end * 30) - 1):
        t = (i + 0.5) / 30
        expect = next((w.word for w in words if w.start <= t < w.end), "")
        assert labels[i] == expect
    vocab = Vocabulary(["hello", "world"])
    assert [vocab.encode(w) for w in ("", "hello", "WORLD ", "zebra")] == [PAD, 2, 3, UNK]
    assert len(vocab) == 4


# ---------------------------------------------------------------------------------------------------- cache
def test_cache_rebuilds_on_config_or_file_change_only(tiny, tmp_path):
    """Keyed on content: a same-size edit that keeps the modification time rebuilds; a touch alone does not."""
    corpus, cache_dir = _copy(tiny, tmp_path), tmp_path / "cache"
    first = build_gesture_cache(corpus, cache_dir)
    assert first.built
    again = build_gesture_cache(corpus, cache_dir)
    assert not again.built and again.path == first.path
    wav = corpus / "wave16k" / f"{VICTIM}.wav"
    st = wav.stat()
    os.utime(wav, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert not build_gesture_cache(corpus, cache_dir).built  # same bytes
    data = bytearray(wav.read_bytes())
    data[-2:] = bytes([data[-2] ^ 0x55, data[-1] ^ 0x55])  # the last sample changes, the size does not
    st = wav.stat()
    wav.write_bytes(bytes(data))
    os.utime(wav, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert wav.stat().st_size == st.st_size and wav.stat().st_mtime_ns == st.st_mtime_ns
    touched = build_gesture_cache(corpus, cache_dir)
    assert touched.built and touched.path != first.path and not first.path.exists()  # stale one removed
    assert not build_gesture_cache(corpus, cache_dir).built
    changed = build_gesture_cache(corpus, cache_dir, PreprocessConfig(stride=10))
    assert changed.built and changed.meta["windows"]["train"] > touched.meta["windows"]["train"]
    assert build_gesture_cache(corpus, cache_dir, PreprocessConfig(stride=10), force=True).built


def _truncate_wav(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _short_wav(p: Path) -> None:
    wave, sr = sf.read(str(p), dtype="float32")
    sf.write(str(p), wave[: len(wave) // 2], sr, subtype="PCM_16")


def _long_wav(p: Path) -> None:
    """The audio of a clip whose motion was captured at 25 fps and has no fps key: 1.2x the motion read at 30."""
    wave, sr = sf.read(str(p), dtype="float32")
    sf.write(str(p), np.concatenate([wave, wave[: len(wave) // 5]]), sr, subtype="PCM_16")


def _edit_npz(p: Path, fn) -> None:
    with np.load(p) as z:
        d = {k: z[k] for k in z.files}
    fn(d)
    np.savez(p, **d)


def _nan_frames(d, value=np.nan):
    body = d["body_pose_params"].copy()
    body[70:73] = value
    d["body_pose_params"] = body


def _inf_frames(d):
    _nan_frames(d, value=np.inf)


DEFECTS = {
    # name: (edit(corpus), field named in the error, message fragment)
    "unreadable_wav": (lambda c: (c / "wave16k" / f"{VICTIM}.wav").write_bytes(b"not a wav at all" * 10),
                       "wav", "unreadable"),
    "truncated_wav": (lambda c: _truncate_wav(c / "wave16k" / f"{VICTIM}.wav"), "wav", "truncated"),
    "short_audio": (lambda c: _short_wav(c / "wave16k" / f"{VICTIM}.wav"), "wav", "shorter than the motion"),
    "motion_at_another_rate": (lambda c: _long_wav(c / "wave16k" / f"{VICTIM}.wav"), "wav",
                               r"1\.2\d*x the motion.*captured at 2[45]"),
    "missing_key": (lambda c: _edit_npz(c / "mhr_30" / f"{VICTIM}.npz", lambda d: d.pop("expr_params")),
                    "expr_params", "missing key"),
    "wrong_shape": (lambda c: _edit_npz(c / "mhr_30" / f"{VICTIM}.npz",
                                        lambda d: d.update(hand_pose_params=d["hand_pose_params"][:, :100])),
                    "hand_pose_params", "shape"),
    "trailing_axis": (lambda c: _edit_npz(c / "mhr_30" / f"{VICTIM}.npz",
                                          lambda d: d.update(body_pose_params=d["body_pose_params"][..., None])),
                      "body_pose_params", r"shape \(\d+, 133, 1\), expected \(N, 133\)"),
    "nan_frames": (lambda c: _edit_npz(c / "mhr_30" / f"{VICTIM}.npz", _nan_frames), "body_pose_params",
                   "non-finite"),
    "malformed_textgrid": (lambda c: (c / "textgrid" / f"{VICTIM}.TextGrid").write_text("File type = garbage\n"),
                           "textgrid", "malformed"),
    "no_word_tier": (lambda c: (c / "textgrid" / f"{VICTIM}.TextGrid").write_text(
        (c / "textgrid" / f"{VICTIM}.TextGrid").read_text().replace('name = "words"', 'name = "phones"')),
        "textgrid", "no word tier"),
    "bad_vid": (lambda c: _edit_npz(c / "mhr_30" / f"{VICTIM}.npz", lambda d: d.update(vid=np.array(-5))),
                "vid", "integer >= -1"),
    "inf_frames": (lambda c: _edit_npz(c / "mhr_30" / f"{VICTIM}.npz", _inf_frames), "body_pose_params",
                   "non-finite"),
    "missing_on_disk": (lambda c: (c / "mhr_30" / f"{VICTIM}.npz").unlink(), "npz", "missing file"),
    "missing_wav": (lambda c: (c / "wave16k" / f"{VICTIM}.wav").unlink(), "wav", "missing file"),
    "missing_textgrid": (lambda c: (c / "textgrid" / f"{VICTIM}.TextGrid").unlink(), "textgrid", "missing file"),
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_bad_input_strict_names_clip_and_field(defect, tiny, tmp_path):
    edit, field, fragment = DEFECTS[defect]
    corpus = _copy(tiny, tmp_path)
    edit(corpus)
    with pytest.raises(CorpusError, match=fragment) as info:
        build_gesture_cache(corpus, tmp_path / "cache", PreprocessConfig(strict=True))
    assert info.value.clip == VICTIM and info.value.field == field
    assert VICTIM in str(info.value) and field in str(info.value)
    leftovers = list((tmp_path / "cache").iterdir()) if (tmp_path / "cache").exists() else []
    assert leftovers == []  # no half-built cache (or temp folder) left behind


@pytest.mark.parametrize("defect", sorted(set(DEFECTS) - {"nan_frames", "inf_frames"}))
def test_bad_input_non_strict_is_a_counted_skip(defect, tiny, tmp_path):
    edit, field, _ = DEFECTS[defect]
    corpus = _copy(tiny, tmp_path)
    edit(corpus)
    cache = build_gesture_cache(corpus, tmp_path / "cache", PreprocessConfig(strict=False))
    skips = cache.meta["skips"]
    assert skips["skipped_clips"] == 1 and skips["by_field"] == {field: 1}
    assert skips["clips"][0]["clip"] == VICTIM
    clips = {r["clip"] for s in ("train", "val", "test") for r in cache.records(s)}
    assert VICTIM not in clips and "4_lawrence_0_1_1" in clips


def test_split_file_clip_missing_on_disk_named(tiny, tmp_path):
    corpus = _copy(tiny, tmp_path)
    with open(corpus / "train_test_split.csv", "a") as f:
        f.write("9_ghost_0_1_1,train\n")
    with pytest.raises(CorpusError, match="missing file") as info:
        build_gesture_cache(corpus, tmp_path / "cache", PreprocessConfig(strict=True))
    assert info.value.clip == "9_ghost_0_1_1" and info.value.field == "npz"
    cache = build_gesture_cache(corpus, tmp_path / "cache")
    assert cache.meta["skips"]["by_field"] == {"npz": 1}


@pytest.mark.parametrize("edit", [_nan_frames, _inf_frames])
def test_nonfinite_frames_never_enter_the_cache(edit, tiny, tmp_path):
    corpus = _copy(tiny, tmp_path)
    _edit_npz(corpus / "mhr_30" / f"{VICTIM}.npz", edit)
    cache = build_gesture_cache(corpus, tmp_path / "cache")
    assert cache.meta["skips"]["dropped_nonfinite_frames"] == {VICTIM: 3}
    for split in ("train", "val", "test"):
        a = cache.arrays(split)
        assert np.isfinite(a["motion"]).all() and np.isfinite(a["audio"]).all()
    recs = [r for r in cache.records("train") if r["clip"] == VICTIM]
    n = np.load(tiny / "mhr_30" / f"{VICTIM}.npz")["body_pose_params"].shape[0]
    assert 73 + 64 > n  # the clip splits around frames 70..72: [0, 70) is kept, [73, n) is too short
    assert [(r["clip_start"], r["length"], r["name"]) for r in recs] == [(0, 70, f"{VICTIM}@0")]
    assert f"train/{VICTIM}[73:{n}]" in cache.meta["skips"]["short_segments"]


def test_stats_from_training_split_only(tiny, tiny_cache_dir):
    cache = build_gesture_cache(tiny, tiny_cache_dir)
    train = np.asarray(cache.arrays("train")["motion"], dtype=np.float64)
    np.testing.assert_allclose(cache.stats["mean"], train.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cache.stats["std"], np.maximum(train.std(0), 1e-4), rtol=1e-4, atol=1e-6)
    assert (cache.stats["std"] >= 1e-4).all()


def test_vocabulary_is_the_training_words(tiny, tiny_cache_dir):
    cache = build_gesture_cache(tiny, tiny_cache_dir)
    train_clips = {r["clip"] for r in cache.records("train")}
    words = {w.word for c in train_clips for w in read_words(tiny / "textgrid" / f"{c}.TextGrid")}
    assert set(cache.vocab.words) == words and len(cache.vocab) == len(words) + 2
    ids = np.asarray(cache.arrays("train")["words"])
    assert ids.min() >= PAD and ids.max() < len(cache.vocab) and (ids == PAD).any() and (ids > UNK).any()


def test_additional_clips_and_word_vectors(tiny, tmp_path):
    corpus = _copy(tiny, tmp_path)
    split = corpus / "train_test_split.csv"
    split.write_text(split.read_text().replace("podcast_0001,train", "podcast_0001,additional"))
    default = build_gesture_cache(corpus, tmp_path / "cache")
    assert default.meta["ignored_additional"] == 1
    assert "podcast_0001" not in {r["clip"] for r in default.records("train")}
    known = default.vocab.words[0]
    vec = tmp_path / "words.vec"
    vec.write_text(f"2 3\n{known} 1 2 3\nzzz-not-a-word 4 5 6\n")
    cfg = PreprocessConfig(use_additional=True, word_vectors=str(vec))
    cache = build_gesture_cache(corpus, tmp_path / "cache", cfg)
    assert "podcast_0001" in {r["clip"] for r in cache.records("train")}
    table = cache.word_vectors
    assert table.shape == (len(cache.vocab), 3)
    np.testing.assert_array_equal(table[cache.vocab.encode(known)], [1, 2, 3])
    assert (np.abs(table).sum(1) > 0).sum() == 1  # PAD, UNK and words the file lacks stay zero


def test_zero_variance_face_is_detected_and_warned(tmp_path, caplog):
    corpus = generate(tmp_path / "zero_face", SyntheticConfig(seed=1, num_speakers=1, clips_per_speaker=2,
                                                             seconds=3.0, unknown_clips=1, zero_face=True))
    with caplog.at_level(logging.WARNING, logger="gesture.data.preprocess"):
        cache = build_gesture_cache(corpus, tmp_path / "cache")
    assert cache.zero_variance_parts == ["face"]
    assert any("face part has zero variance" in r.message and "SAM-3D-Body" in r.message for r in caplog.records)
    assert cache.meta["zero_variance_dims"]["jaw"] == 3 and cache.meta["zero_variance_dims"]["expr"] == 72


# ----------------------------------------------------------------------------------------------- synthetic
def _corpus_content(root: Path) -> dict:
    out = {"split": (root / "train_test_split.csv").read_text()}
    for p in sorted(root.rglob("*")):
        if p.suffix == ".npz":
            with np.load(p) as z:
                out[p.name] = {k: z[k] for k in z.files}
        elif p.suffix in (".wav", ".TextGrid"):
            out[p.name] = p.read_bytes()
    return out


def test_synthetic_is_deterministic_for_a_seed(tmp_path):
    cfg = SyntheticConfig(seed=11, num_speakers=1, clips_per_speaker=1, seconds=2.5, unknown_clips=1)
    a = _corpus_content(generate(tmp_path / "a", cfg))
    b = _corpus_content(generate(tmp_path / "b", cfg))
    c = _corpus_content(generate(tmp_path / "c", SyntheticConfig(**{**cfg.__dict__, "seed": 12})))
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert a[k].keys() == b[k].keys()
            for key in a[k]:
                np.testing.assert_array_equal(a[k][key], b[k][key], err_msg=f"{k}:{key}")
        else:
            assert a[k] == b[k], k
    assert not np.array_equal(a["2_scott_0_1_1.npz"]["hand_pose_params"], c["2_scott_0_1_1.npz"]["hand_pose_params"])


def test_synthetic_stroke_apexes_are_bc_motion_beats_at_audio_onsets(tiny):
    """Speed minima (BC's motion beats) sit on the audio onsets and the speed peaks follow them.

    Onsets from librosa on the written wav (not the generator's syllable list); motion beats from the metric's
    own extraction (local minima over +-7 frames of the body / hand parameter speed, above 0.3 of its mean). The
    previous generator put the speed peaks on the onsets: its few beats lay between them.
    """
    near, chance, beats_per_s, profile = [], [], [], []
    for npz in sorted((tiny / "mhr_30").glob("*.npz")):
        clip = load_clip(tiny, npz.stem)
        wave, sr = sf.read(str(tiny / "wave16k" / f"{npz.stem}.wav"), dtype="float32")
        onsets = np.round(librosa.onset.onset_detect(y=wave, sr=sr, units="time", hop_length=160) * 30).astype(int)
        speed = group_speed(clip.vec, 30.0, BC_PARAM_GROUPS)
        scale = speed.mean(axis=0)
        t, skip = speed.shape[0], 8
        for beats in motion_beats(speed, scale, skip=skip):
            near += [np.abs(onsets - b).min() <= 1 for b in beats]
            beats_per_s.append(len(beats) / ((t - 2 * skip) / 30))
        frames = np.arange(skip, t - skip)
        chance += list(np.abs(frames[:, None] - onsets[None]).min(axis=1) <= 1)
        inside = onsets[(onsets >= 3) & (onsets < t - 6)]
        profile.append(np.stack([speed[inside + lag] / scale for lag in range(-1, 6)], axis=-1).reshape(-1, 7))
    assert np.mean(beats_per_s) > 1.0, beats_per_s
    assert np.mean(near) > max(0.6, np.mean(chance) + 0.3), (np.mean(near), np.mean(chance))
    median = np.median(np.concatenate(profile), axis=0)  # normalised speed at lags -1..5 frames from an onset
    assert median[:3].min() < 0.75 and median[4:].max() > 1.5 * median[:3].min(), median


def test_synthetic_clip_passes_the_loader(tiny):
    clip = load_clip(tiny, "podcast_0001")
    assert clip.raw_speaker is None and clip.valid.all() and clip.vec.shape == (clip.num_frames, POSE_DIM)
    assert len(clip.wave) == frame_bounds(clip.num_frames, 16000, 30.0)[-1]
    cam = np.load(tiny / "mhr_30" / "podcast_0001.npz")["pred_cam_t"]
    np.testing.assert_allclose(clip.constants.cam_t, cam.mean(0), rtol=1e-5)
    sources = {load_clip(tiny, c).contact_source for c in ("2_scott_0_1_1", "2_scott_0_2_2")}
    assert sources == {"keypoints", "contact"}


def test_synthetic_expression_is_low_rank_over_all_clips(tiny):
    """Expression = loudness on one fixed direction + a slow drift on EXPR_DRIFT_RANK shared directions, so the 72
    dims of every clip together span at most 1 + EXPR_DRIFT_RANK directions (independent per-dim drifts were noise
    that neither the face VQ-VAE nor the generator could learn)."""
    clips = sorted((tiny / "mhr_30").glob("*.npz"))
    expr = np.concatenate([(e := np.load(f)["expr_params"].astype(np.float64)) - e.mean(0) for f in clips])
    sv = np.linalg.svd(expr, compute_uv=False)
    rank = 1 + EXPR_DRIFT_RANK
    assert sv[rank - 1] > 1e-2 * sv[0]  # every direction is used ...
    assert sv[rank] < 1e-4 * sv[0]  # ... and nothing beyond them (float32 rounding only)


def test_contact_falls_back_to_key_then_ones(tiny, tmp_path):
    corpus = _copy(tiny, tmp_path)
    kp_clip = next(c for c in ("2_scott_0_1_1", "2_scott_0_2_2")
                   if load_clip(corpus, c).contact_source == "keypoints")
    with np.load(corpus / "mhr_30" / f"{kp_clip}.npz") as z:
        kp = z["pred_keypoints_3d"]
    from_kp = load_clip(corpus, kp_clip).vec[:, SUB_SLICES["contact"]]
    np.testing.assert_array_equal(from_kp, foot_contact(kp, (13, 14, 15, 18), 0.01))
    npz = corpus / "mhr_30" / f"{kp_clip}.npz"
    _edit_npz(npz, lambda d: d.update(contact=1 - from_kp) or d.pop("pred_keypoints_3d"))
    clip = load_clip(corpus, kp_clip)
    assert clip.contact_source == "contact"
    np.testing.assert_array_equal(clip.vec[:, SUB_SLICES["contact"]], 1 - from_kp)
    _edit_npz(corpus / "mhr_30" / f"{kp_clip}.npz", lambda d: d.pop("contact"))
    clip = load_clip(corpus, kp_clip)
    assert clip.contact_source == "ones" and (clip.vec[:, SUB_SLICES["contact"]] == 1).all()


# ---------------------------------------------------------------------------------------------- datamodule
def test_datamodule_batches(tiny, tiny_cache_dir):
    from gesture.data.datamodule import GestureDataModule

    dm = GestureDataModule(root=str(tiny), cache_dir=str(tiny_cache_dir), batch_size=4, pose_length=64,
                           stride=20)
    dm.prepare_data()
    dm.setup()
    assert dm.vocab_size > 2 and dm.audio_dim == 3 and dm.zero_variance_parts == []
    assert dm.speakers.num_embeddings == 3 and dm.stats["mean"].shape == (320,)
    batch = next(iter(dm.train_dataloader()))
    assert batch["motion"].shape == batch["motion_raw"].shape == (4, 64, 320)
    assert batch["motion"].dtype == torch.float32 and batch["words"].dtype == torch.long
    assert batch["audio"].shape == (4, 64, 3) and batch["speaker"].shape == (4,) and len(batch["clip"]) == 4
    torch.testing.assert_close(dm.normalise(batch["motion_raw"]), batch["motion"])
    torch.testing.assert_close(dm.denormalise(batch["motion"]), batch["motion_raw"], rtol=1e-5, atol=1e-5)
    assert len(dm.datasets["val"]) > 0 and dm.has_split("test")
    test = next(iter(dm.test_dataloader()))
    n = test["motion"].shape[1]
    assert test["motion"].shape == (1, n, 320) and test["wave"].shape == (1, frame_bounds(n, 16000, 30.0)[-1])
    assert test["cam_t"].shape == (1, 3) and test["shape_params"].shape == (1, 45)
    assert test["scale_params"].shape == (1, 28) and test["focal_length"].shape == (1,)
    # Parts used by the VQ-VAEs exist in the normalised batch with their layout widths.
    for part, s in PARTS.items():
        assert batch["motion"][..., s].shape[-1] == s.stop - s.start, part


def test_datamodule_generates_missing_corpus(tmp_path, monkeypatch):
    from gesture.data import datamodule as dm_mod

    calls = []

    def fake_generate(root, cfg):  # the real generator is tested above; here only the wiring
        calls.append(cfg)
        return generate(root, SyntheticConfig(seed=5, num_speakers=1, clips_per_speaker=3, seconds=3.0,
                                              unknown_clips=0))

    monkeypatch.setattr(dm_mod, "generate", fake_generate)
    dm = dm_mod.GestureDataModule(root=str(tmp_path / "new"), cache_dir=str(tmp_path / "cache"), batch_size=2,
                                  synthetic={"seed": 5})
    dm.prepare_data()
    assert len(calls) == 1 and calls[0].seed == 5 and (tmp_path / "new" / "train_test_split.csv").is_file()
    dm.setup("fit")
    assert len(dm.datasets["train"]) > 0
    with pytest.raises(FileNotFoundError):
        dm_mod.GestureDataModule(root=str(tmp_path / "absent"), cache_dir=str(tmp_path / "c2"), batch_size=2,
                                 generate_if_missing=False).prepare_data()

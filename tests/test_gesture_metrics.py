"""Gesture metrics: Fréchet distance against closed forms and scipy, FGD skipped with one warning when the encoder
checkpoint is missing / corrupt / of another layout, EMAGE beat consistency on synthetic onset-aligned motion,
velocity ratios, boundary jumps, L1 diversity against EMAGE's loop, baselines, and the encoder's Lightning wiring."""

from __future__ import annotations

import logging
import math

import lightning as L
import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import scipy.stats
import torch
from torch.utils.data import DataLoader

from gesture.data.corpus import load_clip
from gesture.data.synthetic import SyntheticConfig, generate
from gesture.layout import PARTS, POSE_DIM, SUB_SLICES
from gesture.lit.motion_encoder import MotionEncoderModule
from gesture.metrics import (
    BASELINES,
    BC_PARAM_GROUPS,
    EvalClip,
    GestureMetrics,
    alignment_score,
    audio_onsets,
    beat_consistency,
    boundary_jumps,
    evaluate_baselines,
    format_comparison,
    frechet_distance,
    frechet_distance_features,
)
from gesture.models.motion_encoder import CONFIG_KEY, STATE_PREFIX, MotionEncoder, load_motion_encoder

FPS = 30.0
SR = 16000
TINY_ENCODER = dict(hidden=16, latent=4, down=1, window=16)


def smooth_motion(t: int, seed: int, scale: float = 0.05) -> np.ndarray:
    """``[t, 320]`` random smooth motion (low-passed random walk), contact channels kept in {0, 1}."""
    rng = np.random.default_rng(seed)
    x = np.cumsum(rng.normal(size=(t, POSE_DIM)) * scale, axis=0)
    x = scipy.ndimage.gaussian_filter1d(x, sigma=2.0, axis=0)
    x[:, SUB_SLICES["contact"]] = (x[:, SUB_SLICES["contact"]] > 0).astype(np.float64)
    return x


def save_encoder(path, encoder: MotionEncoder) -> None:
    state = {STATE_PREFIX + k: v for k, v in encoder.state_dict().items()}
    torch.save({CONFIG_KEY: dict(encoder.config), "state_dict": state}, path)


# ---------------------------------------------------------------------------------------------------- Fréchet
def test_frechet_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_matches_closed_form_for_commuting_covariances():
    rng = np.random.default_rng(1)
    q = scipy.stats.ortho_group.rvs(8, random_state=2)
    a, b = rng.uniform(0.01, 5.0, size=8), rng.uniform(0.01, 5.0, size=8)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_one_dimensional_is_mean_and_std_gap():
    # N(m1, s1^2) vs N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-0.5]), np.array([[0.25]])) == \
        pytest.approx(1.5**2 + 1.5**2, rel=1e-12)


def test_frechet_matches_scipy_sqrtm_on_well_conditioned_covariances():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(400, 10)), rng.normal(size=(300, 10)) @ rng.normal(size=(10, 10)) * 0.5 + 0.3
    mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-7)


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e4])
def test_frechet_never_negative_on_near_singular_covariances(scale):
    rng = np.random.default_rng(4)
    low_rank = rng.normal(size=(5, 3)) @ rng.normal(size=(3, 32)) * scale  # 5 samples in 32-d: rank <= 3
    assert frechet_distance_features(low_rank, low_rank) == pytest.approx(0.0, abs=1e-9 * max(scale**2, 1.0))
    assert frechet_distance_features(low_rank, low_rank) >= 0.0
    for seed in range(5):
        jitter = np.random.default_rng(seed).normal(size=low_rank.shape) * 1e-9 * scale
        assert frechet_distance_features(low_rank, low_rank + jitter) >= 0.0


# --------------------------------------------------------------------------------------------------------- FGD
def _metrics_run(metrics: GestureMetrics, clips: int = 3) -> dict[str, float]:
    for i in range(clips):
        gt = smooth_motion(64, seed=i)
        metrics.update(gt + 0.01, gt, names=f"c{i}")
    return metrics.compute()


@pytest.mark.parametrize("defect", ["missing", "corrupt", "wrong_dims"])
def test_fgd_skipped_with_exactly_one_warning(defect, tmp_path, caplog):
    path = tmp_path / f"{defect}.ckpt"
    if defect == "corrupt":
        path.write_bytes(b"not a checkpoint")
    elif defect == "wrong_dims":  # an encoder of another motion layout (323-d)
        save_encoder(path, MotionEncoder(pose_dim=323, parts=None, **TINY_ENCODER))
    with caplog.at_level(logging.WARNING, logger="gesture.metrics"):
        metrics = GestureMetrics(encoder_ckpt=path)
        first = _metrics_run(metrics)
        metrics.reset()
        second = _metrics_run(metrics)
        GestureMetrics(encoder_ckpt=path).update(smooth_motion(64, 9), smooth_motion(64, 9))  # a second instance
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "FGD skipped" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert str(path) in warnings[0].getMessage()
    for result in (first, second):
        assert "fgd" not in result
        assert result["vel_ratio/body"] == pytest.approx(1.0)
        assert all(math.isfinite(v) for v in result.values())


def test_fgd_zero_for_identical_motion_and_grows_with_noise(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "enc.ckpt"
    save_encoder(path, MotionEncoder(**TINY_ENCODER))
    results = {}
    for noise in (0.0, 0.05, 0.5):
        metrics = GestureMetrics(encoder_ckpt=path)
        rng = np.random.default_rng(0)
        for i in range(4):
            gt = smooth_motion(64, seed=i)
            metrics.update(gt + noise * rng.normal(size=gt.shape), gt, names=f"c{i}")
        results[noise] = metrics.compute()["fgd"]
    assert results[0.0] == pytest.approx(0.0, abs=1e-9)
    assert 0.0 < results[0.05] < results[0.5]


def test_encoder_module_checkpoint_round_trip(tmp_path):
    """Lightning fit -> last.ckpt -> load_motion_encoder: same features, and the datamodule's stats inside."""

    class Windows(L.LightningDataModule):
        def __init__(self):
            super().__init__()
            motion = torch.as_tensor(np.stack([smooth_motion(16, s) for s in range(8)]), dtype=torch.float32)
            self.stats = {"mean": motion.mean((0, 1)), "std": motion.std((0, 1)).clamp_min(1e-3)}
            self.data = [{"motion": (m - self.stats["mean"]) / self.stats["std"]} for m in motion]

        def train_dataloader(self):
            return DataLoader(self.data, batch_size=4)

        def val_dataloader(self):
            return DataLoader(self.data, batch_size=4)

    torch.manual_seed(0)
    module = MotionEncoderModule(MotionEncoder(**TINY_ENCODER), optimizer=lambda p: torch.optim.Adam(p, 1e-3))
    dm = Windows()
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = L.Trainer(max_epochs=2, logger=False, callbacks=[ckpt], enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    assert {"val/rec", "val/vel", "val/rec_mean_baseline"} <= set(trainer.callback_metrics)
    loaded = load_motion_encoder(tmp_path / "last.ckpt")
    torch.testing.assert_close(loaded.mean, dm.stats["mean"])
    torch.testing.assert_close(loaded.std, dm.stats["std"])
    raw = torch.as_tensor(smooth_motion(16, 42)[None], dtype=torch.float32)
    module.encoder.eval()
    torch.testing.assert_close(loaded.features(raw), module.encoder.features(raw))
    assert loaded.features(raw).shape == (1, loaded.feature_dim) == (1, 8)


# ------------------------------------------------------------------------------------------- beat consistency
def gahr_reference(motion_times, onset_times, sigma):
    """EMAGE's GAHR as loops: for each onset, nearest motion beat."""
    total = 0.0
    for b in onset_times:
        nearest = min((abs(a - b) for a in motion_times), default=math.inf)
        total += math.exp(-(nearest**2) / (2 * sigma**2))
    return total / len(onset_times)


def test_alignment_score_matches_emage_loop():
    rng = np.random.default_rng(5)
    beats, onsets = np.sort(rng.uniform(0, 10, 14)), np.sort(rng.uniform(0, 10, 9))
    assert alignment_score(beats, onsets, 0.3) == pytest.approx(gahr_reference(beats, onsets, 0.3), rel=1e-12)
    assert alignment_score(np.array([]), onsets, 0.3) == 0.0
    assert math.isnan(alignment_score(beats, np.array([]), 0.3))


def clicks(times: np.ndarray, seconds: float, seed: int = 0) -> np.ndarray:
    """Silence with faint noise and a 20 ms decaying noise burst at each time."""
    rng = np.random.default_rng(seed)
    wave = rng.normal(size=int(seconds * SR)) * 1e-3
    burst = rng.normal(size=int(0.02 * SR)) * np.exp(-np.arange(int(0.02 * SR)) / (0.004 * SR))
    for t in times:
        i = int(t * SR)
        wave[i:i + len(burst)] += burst
    return wave.astype(np.float32)


def motion_with_speed_dips(dips: np.ndarray, t: int, seed: int = 0) -> np.ndarray:
    """``[t, 320]`` whose body / hand speeds are 1 except dips to 0.5 (minima) at the given seconds."""
    time = np.arange(t) / FPS
    speed = 1.0 - 0.5 * np.exp(-((time[:, None] - dips[None]) ** 2) / (2 * 0.08**2)).sum(axis=1)
    path = np.cumsum(speed) / FPS
    rng = np.random.default_rng(seed)
    x = np.zeros((t, POSE_DIM))
    for s in BC_PARAM_GROUPS.values():
        direction = rng.normal(size=s.stop - s.start)
        x[:, s] = path[:, None] * direction / np.linalg.norm(direction)
    return x


def test_beat_consistency_high_when_speed_minima_meet_onsets():
    t = 600  # 20 s; the first and last 2 s are ignored
    onsets = np.cumsum(np.random.default_rng(6).uniform(0.9, 1.4, size=14)) + 2.0
    onsets = onsets[onsets < 17.5]
    wave = clicks(onsets, t / FPS)
    detected = audio_onsets(wave, SR)
    assert len(detected) >= len(onsets) - 1  # the clicks are found
    aligned = beat_consistency(motion_with_speed_dips(onsets, t), detected, FPS)
    shifted = beat_consistency(motion_with_speed_dips(onsets + 0.45, t), detected, FPS)
    random_dips = np.sort(np.random.default_rng(7).uniform(2.0, 18.0, size=len(onsets)))
    random = beat_consistency(motion_with_speed_dips(random_dips, t), detected, FPS)
    assert aligned > 0.9
    assert shifted < 0.6
    assert random < aligned - 0.1
    # Through GestureMetrics with the waveform: the same numbers, gt as its own reference.
    metrics = GestureMetrics(fps=FPS)
    gt = motion_with_speed_dips(onsets, t)
    metrics.update(motion_with_speed_dips(onsets + 0.45, t), gt, wave=wave, sr=SR, names="clip")
    out = metrics.compute()
    assert out["bc/gt"] == pytest.approx(aligned, abs=1e-9)
    assert out["bc"] < out["bc/gt"] - 0.3


def test_beat_consistency_ignores_still_motion_and_edges():
    onsets = np.array([3.0, 5.0, 7.0])
    still = np.zeros((300, POSE_DIM))
    scale = np.ones(len(BC_PARAM_GROUPS))
    assert beat_consistency(still, onsets, FPS, scale=scale) == 0.0  # no beats above the speed threshold
    assert math.isnan(beat_consistency(still, np.array([0.5, 9.8]), FPS, scale=scale))  # onsets in the margins


# --------------------------------------------------------------------------------------------- diagnostics
def test_velocity_ratio_one_for_identical_two_for_doubled_change():
    metrics = GestureMetrics()
    doubled = GestureMetrics()
    for i in range(3):
        gt = smooth_motion(90, seed=i)
        metrics.update(gt, gt, names=f"c{i}")
        doubled.update(gt[:1] + 2.0 * (gt - gt[:1]), gt, names=f"c{i}")
    same, double = metrics.compute(), doubled.compute()
    for part in ("body", "hand", "face", "global"):
        assert same[f"vel_ratio/{part}"] == pytest.approx(1.0, rel=1e-12)
        assert double[f"vel_ratio/{part}"] == pytest.approx(2.0, rel=1e-12)
    assert same["face_mse"] == 0.0 and same["face_vel_err"] == 0.0
    assert double["global_rot_std_ratio"] == pytest.approx(2.0, rel=1e-12)


def test_face_errors_match_numpy_reference():
    gt, pred = smooth_motion(50, 1), smooth_motion(50, 2)
    metrics = GestureMetrics()
    metrics.update(pred, gt)
    out = metrics.compute()
    f = PARTS["face"]
    assert out["face_mse"] == pytest.approx(np.mean((pred[:, f] - gt[:, f]) ** 2), rel=1e-12)
    vel = np.diff(pred[:, f], axis=0) - np.diff(gt[:, f], axis=0)
    assert out["face_vel_err"] == pytest.approx(np.mean(np.abs(vel)), rel=1e-12)


def test_zero_variance_face_has_no_velocity_ratio():
    gt = smooth_motion(60, 3)
    gt[:, PARTS["face"]] = 0.0  # SAM-3D-Body estimates: face constant
    metrics = GestureMetrics()
    metrics.update(smooth_motion(60, 4), gt)
    out = metrics.compute()
    assert "vel_ratio/face" not in out and out["vel_ratio/body"] > 0


def test_boundary_jump_detects_an_injected_jump():
    gt = smooth_motion(200, 5)
    bounds = [64, 124, 184]  # windows every 60 frames, each seeded by the previous window's last 4
    pred = gt.copy()
    pred[124:] += 0.5  # one window starts from the wrong place
    jumps = boundary_jumps(pred, bounds)
    assert jumps[1] > 10 * max(jumps[0], jumps[2])
    metrics = GestureMetrics()
    metrics.update(pred, gt, boundaries=bounds)
    out = metrics.compute()
    assert out["boundary_jump"] > 3.0
    assert 0.2 < out["boundary_jump/gt"] < 3.0


def l1div_emage(clips: list[np.ndarray]) -> float:
    """EMAGE's L1div class: per clip, |x - temporal mean| summed over frames and dims; divided by total frames."""
    total, frames = 0.0, 0
    for x in clips:
        mean = np.mean(x, 0)
        for i in range(x.shape[0]):
            total += float(np.sum(np.abs(x[i] - mean)))
        frames += x.shape[0]
    return total / frames


def test_l1_diversity_matches_emage_reference():
    preds = [smooth_motion(40 + 10 * i, seed=i) for i in range(3)]
    gts = [smooth_motion(40 + 10 * i, seed=10 + i) for i in range(3)]
    metrics = GestureMetrics()
    for p, g in zip(preds, gts, strict=True):
        metrics.update(p, g)
    out = metrics.compute()
    dims = np.r_[PARTS["body"], PARTS["hand"]]  # body + both hands when there is no skeleton
    assert out["l1div"] == pytest.approx(l1div_emage([p[:, dims] for p in preds]), rel=1e-12)
    assert out["l1div/gt"] == pytest.approx(l1div_emage([g[:, dims] for g in gts]), rel=1e-12)


def test_joints_fn_hook_drives_diversity_and_beats():
    joints_fn = lambda m: m[:, :30].reshape(len(m), 10, 3)  # noqa: E731 - a stand-in skeleton
    gt, pred = smooth_motion(80, 1), smooth_motion(80, 2)
    metrics = GestureMetrics(joints_fn=joints_fn, bc_skip=5)
    metrics.update(pred, gt, onsets=np.array([0.5, 1.0, 1.5, 2.0]))
    out = metrics.compute()
    assert out["l1div"] == pytest.approx(l1div_emage([pred[:, :30]]), rel=1e-12)
    assert 0.0 <= out["bc"] <= 1.0


def test_nonfinite_clip_is_a_counted_skip_and_duplicates_count_once():
    metrics = GestureMetrics()
    gt = smooth_motion(40, 1)
    bad = gt.copy()
    bad[3, 5] = np.nan
    metrics.update(bad, gt, names="broken")
    metrics.update(np.stack([gt, gt]), np.stack([gt, gt]), names=["a", "a"])  # a padded sampler repeats "a"
    metrics.update(np.stack([gt, gt]), np.stack([gt, gt]))  # anonymous clips are all kept
    assert metrics.skipped == ["broken"]
    assert len(metrics._gathered(sync=False)) == 3
    with pytest.raises(ValueError, match="320"):
        metrics.update(gt[:, :300], gt[:, :300])
    with pytest.raises(ValueError, match="differ"):
        metrics.update(gt[:-1], gt)


def test_baselines_rank_as_expected(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "enc.ckpt"
    save_encoder(path, MotionEncoder(**TINY_ENCODER))
    clips = [EvalClip(name=f"s{s}_c{c}", motion=smooth_motion(64, 10 * s + c), speaker=s) for s in range(2)
             for c in range(3)]
    all_motion = np.concatenate([c.motion for c in clips])
    results = evaluate_baselines(clips, all_motion.mean(0), all_motion.std(0),
                                 lambda: GestureMetrics(encoder_ckpt=path))
    assert set(results) == set(BASELINES)
    assert results["gt"]["fgd"] == pytest.approx(0.0, abs=1e-9)
    assert results["gt"]["vel_ratio/body"] == pytest.approx(1.0)
    assert results["mean_pose"]["vel_ratio/body"] == 0.0
    assert results["mean_pose"]["l1div"] == pytest.approx(0.0, abs=1e-9)
    for part in ("body", "hand", "global"):  # smooth random motion, its velocity matched to each clip's
        assert results["random"][f"vel_ratio/{part}"] == pytest.approx(1.0, rel=0.02), part
    assert results["random"]["fgd"] > results["same_speaker"]["fgd"] > 0.0
    table = format_comparison({"model": results["same_speaker"], **results}).splitlines()
    assert table[0].split() == ["metric", "model", *BASELINES]
    fgd_row = next(line.split() for line in table if line.startswith("fgd"))
    assert float(fgd_row[2]) == pytest.approx(0.0, abs=1e-6) and float(fgd_row[5]) > 0


def test_ground_truth_beats_smooth_random_and_other_clips_on_synthetic_speech(tmp_path):
    """On the synthetic corpus (strokes reach their apex on syllable onsets) the ground truth's BC clearly beats
    smooth random motion of the same speed and real motion of another clip; i.i.d. random frames do not make a
    reference (a speed minimum every few frames puts one near every onset)."""
    root = generate(tmp_path / "corpus", SyntheticConfig(seed=0, num_speakers=2, clips_per_speaker=2, seconds=8.0,
                                                          unknown_clips=0))
    names = [line.split(",")[0] for line in (root / "train_test_split.csv").read_text().split()[1:]]
    raw = [load_clip(root, name) for name in names]
    clips = [EvalClip(name=n, motion=c.vec.astype(np.float64), speaker=i // 2, wave=c.wave)
             for i, (n, c) in enumerate(zip(names, raw))]
    all_motion = np.concatenate([c.motion for c in clips])
    results = evaluate_baselines(clips, all_motion.mean(0), all_motion.std(0),
                                 lambda: GestureMetrics(fps=FPS, bc_skip=30))
    bc = {kind: values["bc"] for kind, values in results.items()}
    assert bc["gt"] > 0.8 and bc["mean_pose"] == 0.0, bc
    assert bc["gt"] > bc["random"] + 0.1, bc
    assert bc["gt"] > bc["same_speaker"] + 0.02, bc
    assert results["random"]["vel_ratio/body"] == pytest.approx(1.0, rel=0.02)
    rng = np.random.default_rng(0)
    iid = [beat_consistency(rng.standard_normal(c.motion.shape), audio_onsets(c.wave, SR), FPS, skip=30)
           for c in clips]
    assert np.mean(iid) > bc["random"] + 0.05, (np.mean(iid), bc)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    metrics = GestureMetrics()
    for i in range(rank, 5, world):  # rank 0: clips 0, 2, 4; rank 1: clips 1, 3 (+ a padded repeat of clip 0)
        metrics.update(smooth_motion(60, 20 + i), smooth_motion(60, i), names=f"c{i}")
    if rank == 1:
        metrics.update(smooth_motion(60, 20), smooth_motion(60, 0), names="c0")
    metrics.update(smooth_motion(60, 40 + rank), smooth_motion(60, 30 + rank))  # anonymous: never merged
    out = metrics.compute()
    np.save(f"{out_dir}/rank{rank}.npy", np.array(sorted(out.items()), dtype=object), allow_pickle=True)
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_compute_gathers_all_ranks_like_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = GestureMetrics()
    for i in range(5):
        single.update(smooth_motion(60, 20 + i), smooth_motion(60, i), names=f"c{i}")
    for rank in range(2):
        single.update(smooth_motion(60, 40 + rank), smooth_motion(60, 30 + rank))
    expected = single.compute(sync=False)
    for rank in range(2):
        got = dict(np.load(tmp_path / f"rank{rank}.npy", allow_pickle=True))
        assert got.keys() == expected.keys()
        for k, v in expected.items():
            assert got[k] == pytest.approx(v, rel=1e-12), k

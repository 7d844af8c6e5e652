"""Evaluation command and tracker demo on tiny Stage 1 / Stage 2 runs made from the real configs.

A run folder is built the way common.train builds it (composed configs, resolved config.yaml, a Lightning
checkpoint from a real Trainer). The reported MPJPE and root error of the model and of the mean-pose baseline are
checked against numpy recomputations from the checkpoint's own weights and the dataset's frames.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import imageio_ffmpeg
import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from scipy.spatial.transform import Rotation
from test_handpose_metrics import align_reference

from common.mano import ManoLayer
from handpose import demo, evaluate
from handpose.data.dataset import HandWindowDataset
from handpose.data.synthetic import SyntheticConfig, generate_dataset
from handpose.metrics import METRIC_NAMES

ROOT = Path(__file__).resolve().parents[1]
IMG = 32
TINY = SyntheticConfig(seed=1, num_seqs=3, image_size=64, min_frames=10, max_frames=10)
TINY_MODEL = [
    f"model.net.backbone.img_size={IMG}", "model.net.backbone.dense_dim=8", "model.net.decoder.joint_mlp=16",
    "model.lift_batch=4", "model.net.decoder.dim=32",
    "model.net.decoder.depth=1", "model.net.decoder.heads=2", "model.stage1_weight=null", "model.num_vis=2",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("eval") / "hands", TINY, workers=1)


def make_run(out_root: Path, data_root: Path, stage: str, num_frame: int) -> Path:
    """Train one step of a tiny run with a real Trainer; returns ``<run>/checkpoints/last.ckpt``."""
    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    overrides = [
        "data=hand_synthetic", f"model=handpose_{stage}", f"experiment_name={stage}", f"paths.output_root={out_root}",
        f"data.root={data_root}", f"data.img_size={IMG}", f"data.num_frame={num_frame}", "data.batch_size=4",
        "data.num_workers=0", "data.generate_if_missing=false", *TINY_MODEL,
    ]
    if stage == "stage2":
        overrides.append("model.net.temporal.heads=2")
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(0)
    lit, dm = instantiate(cfg.model), instantiate(cfg.data)
    if stage == "stage2":  # leave the zero initialisation so the temporal path (the window average) matters
        torch.nn.init.normal_(lit.net.temporal.average_gate, std=0.2)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=run_dir)
    trainer.fit(lit, datamodule=dm)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("runs")
    return {"stage1": make_run(out, data_root, "stage1", 1), "stage2": make_run(out, data_root, "stage2", 3)}


def _samples(root: Path, split: str, num_frame: int, ckpt: Path) -> dict[str, np.ndarray]:
    """Every window of ``split`` with the run's crop settings."""
    bbox_scale = float(OmegaConf.load(ckpt.parent.parent / "config.yaml").data.bbox_scale)
    ds = HandWindowDataset(root, split, num_frame=num_frame, img_size=IMG, bbox_scale=bbox_scale)
    samples = [ds[i] for i in range(len(ds))]
    return {k: np.stack([s[k] for s in samples]) for k in samples[0]}


def _mpjpe_and_root_mm(joints_pred: np.ndarray, joints_gt: np.ndarray) -> tuple[float, float]:
    """float64 numpy: root-relative MPJPE and wrist error (mm) over [n, 21, 3] camera-space joints."""
    rel = (joints_pred - joints_pred[:, :1]) - (joints_gt - joints_gt[:, :1])
    return 1000 * np.linalg.norm(rel, axis=-1).mean(), 1000 * np.linalg.norm(joints_pred[:, 0] - joints_gt[:, 0], axis=-1).mean()


@pytest.mark.parametrize(("stage", "num_frame", "split"), [("stage1", 1, "val"), ("stage2", 3, "test")])
def test_evaluate_writes_all_metrics_and_the_baseline_matching_a_recomputation(
    runs, data_root, tmp_path, stage, num_frame, split
):
    out = tmp_path / "eval.json"
    evaluate.main(["--ckpt", str(runs[stage]), "--split", split, "--json", str(out), "--no-progress"])
    report = json.loads(out.read_text())
    assert set(report["metrics"]) == set(METRIC_NAMES) and set(report["baseline"]) == set(METRIC_NAMES)
    assert all(np.isfinite(v) for v in [*report["metrics"].values(), *report["baseline"].values()])
    assert report["split"] == split and report["num_frame"] == num_frame and report["stage"] == stage

    # Recompute from the checkpoint tensors and the dataset, without the evaluation code.
    state = torch.load(runs[stage], map_location="cpu", weights_only=False)["state_dict"]
    lit, _ = evaluate.load_checkpoint(runs[stage])
    for k, v in lit.state_dict().items():
        assert torch.equal(v, state[k]), k
    ev = _samples(data_root, split, num_frame, runs[stage])
    valid = ev["valid"][:, -1]
    assert report["num_evaluated"] == int(valid.sum()) > 0
    mano = ManoLayer()
    with torch.no_grad():
        (pose, shape, trans), _ = lit.net.predict_mano_param(*(torch.from_numpy(ev[k]) for k in
                                                             ("img", "bbox", "focal", "princpt", "timestamp")))
        joints_pred = mano(pose[:, 0], shape[:, 0], trans[:, 0]).joints.double().numpy()
    gt = ev["joints_cam"][:, -1].astype(np.float64)
    mpjpe, root = _mpjpe_and_root_mm(joints_pred[valid], gt[valid])
    assert report["metrics"]["mpjpe"] == pytest.approx(mpjpe, rel=1e-4)
    assert report["metrics"]["root_err"] == pytest.approx(root, rel=1e-4)

    train = _samples(data_root, "train", 1, runs[stage])
    keep = train["valid"][:, 0]
    mean = {k: train[k][:, 0][keep].astype(np.float64).mean(0) for k in ("mano_pose", "mano_shape", "mano_trans")}
    # rotations: scipy's chordal L2 mean per joint, not the mean axis-angle
    joint_rotvecs = train["mano_pose"][:, 0][keep].astype(np.float64).reshape(-1, 16, 3)
    mean["mano_pose"] = np.concatenate([Rotation.from_rotvec(joint_rotvecs[:, j]).mean().as_rotvec()
                                        for j in range(16)])
    with torch.no_grad():
        base = mano(*(torch.from_numpy(mean[k]).float()[None] for k in ("mano_pose", "mano_shape", "mano_trans")))
    mpjpe_b, root_b = _mpjpe_and_root_mm(np.repeat(base.joints.double().numpy(), int(valid.sum()), 0), gt[valid])
    assert report["baseline"]["mpjpe"] == pytest.approx(mpjpe_b, rel=1e-4)
    assert report["baseline"]["root_err"] == pytest.approx(root_b, rel=1e-4)
    assert "PA-MPJPE" in evaluate.format_table(report)


def test_evaluate_default_json_next_to_the_run_and_clear_errors(runs, tmp_path):
    report = evaluate.main(["--ckpt", str(runs["stage1"]), "--split", "val", "--no-baseline", "--no-progress"])
    path = runs["stage1"].parent.parent / "eval" / "last_val.json"
    assert json.loads(path.read_text())["metrics"] == report["metrics"] and report["baseline"] is None
    with pytest.raises(ValueError, match="stage1 model"):
        evaluate.evaluate(runs["stage1"], "val", num_frame=3)
    lonely = tmp_path / "elsewhere" / "last.ckpt"
    lonely.parent.mkdir()
    lonely.write_bytes(runs["stage1"].read_bytes())
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        evaluate.load_checkpoint(lonely)


def test_demo_writes_an_overlay_video_of_every_frame(runs, data_root, tmp_path):
    path = demo.main(["--ckpt", str(runs["stage2"]), "--out", str(tmp_path / "demo.mp4"), "--max-frames", "6"])
    assert path.exists() and path.stat().st_size > 0
    if path.suffix == ".mp4":
        assert imageio_ffmpeg.count_frames_and_secs(str(path))[0] == 6
    else:
        import imageio.v3 as iio

        assert iio.imread(path, index=None).shape[0] == 6
    gif = demo.main(["--ckpt", str(runs["stage1"]), "--out", str(tmp_path / "demo.gif"), "--max-frames", "3",
                     "--sequence", str(data_root / "seq_0000")])
    import imageio.v3 as iio

    frames = iio.imread(gif, index=None)
    assert frames.shape[0] == 3
    # both skeleton colours are drawn (GT red, prediction green) on the upscaled frames
    assert ((frames[..., 0] > 200) & (frames[..., 1] < 100)).any() and ((frames[..., 1] > 200) & (frames[..., 0] < 100)).any()


def test_compare_stage1_evaluates_it_on_exactly_the_stage2_frames_with_subsets_and_acceleration(runs, data_root,
                                                                                                 tmp_path):
    out = tmp_path / "cmp.json"
    evaluate.main(["--ckpt", str(runs["stage2"]), "--split", "val", "--json", str(out), "--no-progress",
                   "--compare-stage1", str(runs["stage1"])])
    report = json.loads(out.read_text())
    details = report["details"]
    assert set(details["subsets"]) == {"all", "occluded", "after_drop", "occluded_or_after_drop"}
    assert details["subsets"]["all"]["count"] == report["num_evaluated"]
    # every window ends at a frame with 2 predecessors (T=3): consecutive ends give acceleration triples
    assert details["accel_triples"] > 0 and np.isfinite(details["accel_err"])
    assert report["baseline_details"]["accel_triples"] == details["accel_triples"]

    # Stage 1 on the same last frames, recomputed from its checkpoint without the evaluation code
    lit1, _ = evaluate.load_checkpoint(runs["stage1"])
    ev = _samples(data_root, "val", 3, runs["stage2"])
    valid = ev["valid"][:, -1]
    with torch.no_grad():
        (pose, shape, trans), _ = lit1.net.predict_mano_param(*(torch.from_numpy(ev[k][:, -1:]) for k in
                                                              ("img", "bbox", "focal", "princpt", "timestamp")))
        joints = ManoLayer()(pose[:, 0], shape[:, 0], trans[:, 0]).joints.double().numpy()
    mpjpe, root = _mpjpe_and_root_mm(joints[valid], ev["joints_cam"][:, -1][valid].astype(np.float64))
    assert report["stage1"]["metrics"]["mpjpe"] == pytest.approx(mpjpe, rel=1e-4)
    assert report["stage1"]["metrics"]["root_err"] == pytest.approx(root, rel=1e-4)
    assert report["stage1"]["details"]["subsets"]["all"]["count"] == int(valid.sum())
    table = evaluate.format_comparison(report)
    assert "stage1, same frames" in table and "accel. error" in table


def test_tracker_from_checkpoint_is_the_runs_network_with_its_settings(runs, data_root):
    """`handpose.HandTracker.from_checkpoint(path)` (the documented Python API) rebuilds the run's network with its
    window length and crop scale: it predicts exactly what a tracker built by hand from the loaded run does
    (``from_lit``, itself checked against the batch forward in tests/test_tracker.py)."""
    import handpose
    from handpose.data.dataset import read_frame
    from handpose.data.format import read_sequence, read_splits

    ckpt = runs["stage2"]
    tracker = handpose.HandTracker.from_checkpoint(ckpt, channel_order="bgr")
    cfg = OmegaConf.load(ckpt.parent.parent / "config.yaml")
    assert tracker.num_frame == cfg.data.num_frame == 3 and tracker.bbox_scale == float(cfg.data.bbox_scale)
    lit, _ = handpose.load_checkpoint(ckpt)
    by_hand = handpose.HandTracker.from_lit(lit, 3, bbox_scale=float(cfg.data.bbox_scale), channel_order="bgr")
    seq = read_sequence(data_root / read_splits(data_root)["val"][0])
    for f in range(4):
        args = (read_frame(seq.frame_path(f), seq.image_size), seq["bbox"][f], seq["focal"][f], seq["princpt"][f],
                float(seq["timestamp"][f]), "right")
        a, b = tracker.update(*args), by_hand.update(*args)
        np.testing.assert_array_equal(a.joints_cam, b.joints_cam)
        assert np.isfinite(a.joints_cam).all() and a.window == min(f + 1, 3)


def test_a_run_written_before_the_module_rename_still_loads(runs, tmp_path, caplog):
    """A run folder whose config.yaml names `handpose.model.*` (the package's old name) loads with the new one."""
    import logging
    import shutil

    old = tmp_path / "old_run"
    shutil.copytree(runs["stage1"].parent.parent, old)
    config = old / "config.yaml"
    config.write_text(config.read_text().replace("handpose.models.", "handpose.model."))
    assert "handpose.model.PoseNet" in config.read_text()
    with caplog.at_level(logging.INFO, logger="handpose.runs"):
        lit, cfg = evaluate.load_checkpoint(old / "checkpoints" / "last.ckpt")
    assert "old paths" in caplog.text and cfg.model.net._target_ == "handpose.models.PoseNet"
    reference, _ = evaluate.load_checkpoint(runs["stage1"])
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in lit.state_dict().items())


def test_headroom_stage1_row_is_evaluate_and_the_oracles_follow_their_definitions(runs, data_root, tmp_path):
    from handpose import headroom

    out = tmp_path / "headroom.json"
    report = headroom.main(["--ckpt", str(runs["stage1"]), "--split", "val", "--num-frame", "3", "--json", str(out)])
    assert json.loads(out.read_text()) == report
    cmp = evaluate.main(["--ckpt", str(runs["stage2"]), "--split", "val", "--json", str(tmp_path / "e.json"),
                         "--no-progress", "--no-baseline", "--compare-stage1", str(runs["stage1"])])
    own = report["rows"]["last frame (Stage 1)"]
    assert own["windows"] == cmp["stage1"]["details"]["subsets"]["all"]["count"]
    assert own["pa_mpjpe"] == pytest.approx(cmp["stage1"]["metrics"]["pa_mpjpe"], rel=1e-4)
    assert own["mpjpe"] == pytest.approx(cmp["stage1"]["metrics"]["mpjpe"], rel=1e-4)
    with pytest.raises(ValueError, match="Stage 2 run"):
        headroom.headroom(runs["stage2"], num_frame=3)

    # depth floor against a float64 recomputation with the MANO tree written out (OpenPose order)
    parents = [0, 0, 1, 2, 3, 0, 5, 6, 7, 0, 9, 10, 11, 0, 13, 14, 15, 0, 17, 18, 19]
    ds = HandWindowDataset(data_root, "val", num_frame=3, img_size=IMG)
    sizes = []
    for seq in ds.sequences:
        j = seq["joints_cam"][np.flatnonzero(seq["valid"])[0]].astype(np.float64)
        sizes.append(np.linalg.norm(j[1:] - j[parents[1:]], axis=-1).sum())
    typical = np.median(sizes)
    floor = np.mean([seq_z * abs(1 - typical / sizes[s]) for s, _, stop in ds.index
                     for seq_z in [ds.sequences[s]["joints_cam"][stop - 1, 0, 2]]])
    assert report["depth_floor_mm"] == pytest.approx(1000 * floor, rel=1e-5)


def test_headroom_window_estimates_on_linear_motion_and_occlusion_choice():
    from handpose.headroom import latest_unoccluded, window_estimates

    t = np.array([0.0, 0.03, 0.07, 0.10, 0.17, 0.20, 0.23, 0.27, 0.30])  # irregular, a drop after 0.10
    a, b = np.array([1.0, -2.0]), np.array([3.0, 0.5])
    tokens = a + t[:, None] * b  # tokens that move linearly in time
    est = window_estimates(tokens, t, end=7, num_frame=5)
    np.testing.assert_allclose(est["last frame (Stage 1)"], tokens[7])
    np.testing.assert_allclose(est["causal line through 5"], tokens[7], atol=1e-12)  # no lag on a line
    np.testing.assert_allclose(est["causal mean of 5"], a + t[3:8].mean() * b)  # lags by the window's mean age
    np.testing.assert_allclose(est["causal mean of 3"], tokens[5:8].mean(0))
    np.testing.assert_allclose(est["centred mean of 5 (looks ahead)"], tokens[5:10].mean(0))
    with pytest.raises(IndexError):
        window_estimates(tokens, t, end=3, num_frame=5)
    with pytest.raises(ValueError, match="timestamp"):
        window_estimates(tokens, t[:-1], end=7, num_frame=5)
    occluded = np.array([0, 0, 1, 1, 1, 0, 1], bool)
    assert latest_unoccluded(occluded, 6, 3) == 5 and latest_unoccluded(occluded, 5, 3) == 5
    assert latest_unoccluded(occluded, 4, 3) is None and latest_unoccluded(occluded, 4, 4) == 1


def test_headroom_skips_windows_that_read_a_frame_without_a_token(runs, data_root, monkeypatch, caplog):
    from handpose import headroom

    real = headroom.compute_frame_tokens

    def one_unreadable(net, dataset, **kwargs):
        tokens = real(net, dataset, **kwargs)
        tokens[0][5] = np.nan  # frame 5 of the first sequence
        return tokens

    full = headroom.headroom(runs["stage1"], num_frame=3)
    monkeypatch.setattr(headroom, "compute_frame_tokens", one_unreadable)
    with caplog.at_level("WARNING"):
        report = headroom.headroom(runs["stage1"], num_frame=3)
    # a window of 3 ending at frame e reads frames e - 2 .. e, its centred mean of 3 frames e - 1 .. e + 1
    ds = HandWindowDataset(data_root, "val", num_frame=3, img_size=IMG)
    ends = [stop - 1 for s, _, stop in ds.index if s == 0]
    reading = sum(end - 2 <= 5 <= end + 1 for end in ends)
    assert full["windows"] == len(ds) and reading >= 2
    assert report["windows"] == full["windows"] - reading
    assert all(np.isfinite(row["pa_mpjpe"]) for row in report["rows"].values())
    assert f"{reading} of {len(ds)} windows skipped" in caplog.text


def _pa_mpjpe_mm(pred: np.ndarray, gt: np.ndarray) -> float:
    """float64 numpy PA-MPJPE (mm) of joints [n, 21, 3], root-relative, aligned by the FreiHAND reference."""
    errors = [np.linalg.norm(align_reference(g - g[0], p - p[0]) - (g - g[0]), axis=-1).mean() for p, g in zip(pred, gt)]
    return 1000 * float(np.mean(errors))


def test_headroom_ground_truth_joints_row_and_keypoint_error_match_a_recomputation(runs, data_root):
    """The oracle row: the last frame with the joint MLP reading the annotated 2D joints, recomputed through the
    batch path (PoseNet.predict_with_heatmaps with a joint hint) instead of the frame tokens; the heatmap head's
    2D error recomputed in numpy."""
    from handpose import headroom

    report = headroom.headroom(runs["stage1"], num_frame=3)
    row = report["rows"][headroom.GT_JOINTS_ROW]
    ev = _samples(data_root, "val", 3, runs["stage1"])
    valid = ev["valid"][:, -1]
    assert row["windows"] == report["windows"] == int(valid.sum()) > 0
    lit, _ = evaluate.load_checkpoint(runs["stage1"])
    last = {k: torch.from_numpy(ev[k][valid][:, -1:]) for k in ("img", "bbox", "focal", "princpt", "timestamp",
                                                                 "joints_2d")}
    inputs = tuple(last[k] for k in ("img", "bbox", "focal", "princpt", "timestamp"))
    with torch.no_grad():
        hint = (last["joints_2d"], torch.ones(len(last["img"]), 1, dtype=torch.bool))
        (pose, shape, _), _ = lit.net.predict_with_heatmaps(*inputs, joint_hint=hint)[0]
        joints = ManoLayer()(pose[:, 0], shape[:, 0]).joints.double().numpy()
        (pose_own, shape_own, _), _ = lit.net.predict_mano_param(*inputs)
        own = ManoLayer()(pose_own[:, 0], shape_own[:, 0]).joints.double().numpy()
        _, keypoints = lit.net.predict_with_keypoints(*inputs)
    gt = ev["joints_cam"][valid][:, -1].astype(np.float64)
    mpjpe, _ = _mpjpe_and_root_mm(joints, gt)
    assert row["mpjpe"] == pytest.approx(mpjpe, rel=1e-4)
    assert row["pa_mpjpe"] == pytest.approx(_pa_mpjpe_mm(joints, gt), rel=1e-4)
    assert report["rows"]["last frame (Stage 1)"]["pa_mpjpe"] == pytest.approx(_pa_mpjpe_mm(own, gt), rel=1e-4)
    assert abs(row["pa_mpjpe"] - _pa_mpjpe_mm(own, gt)) > 1e-3  # the hint reaches the fingers
    err = np.linalg.norm(keypoints[:, 0].double().numpy() - ev["joints_2d"][valid][:, -1], axis=-1)
    assert report["keypoint_error_px"]["all"] == pytest.approx(err.mean(), rel=1e-5)
    assert report["keypoint_error_px"]["tips"] == pytest.approx(err[:, [4, 8, 12, 16, 20]].mean(), rel=1e-5)
    assert report["keypoint_error_px"]["crop_size"] == IMG

"""Benchmark submission files (`handpose.evaluate --format {freihand,ho3d}`) from tiny trained runs on converted
fixtures of both datasets: every evaluation frame in the benchmark's order, joint order and axes, parsed back and
compared with predictions made another way (the streaming tracker; the metric evaluation's own samples)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_convert_freihand import write_fixture as write_freihand
from test_convert_ho3d import write_fixture as write_ho3d
from test_evaluate import TINY, make_run

from common.mano_topology import NATIVE16_TIPS_TO_21
from handpose import evaluate
from handpose.data.convert import main as convert_main
from handpose.data.format import read_sequence, read_splits
from handpose.data.synthetic import generate_dataset
from handpose.tracker import HandTracker


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("sub")
    data = generate_dataset(base / "hands", TINY, workers=1)
    return {"stage1": make_run(base / "runs", data, "stage1", 1), "stage2": make_run(base / "runs", data, "stage2", 3)}


def _read(pred: Path) -> tuple[np.ndarray, np.ndarray]:
    with zipfile.ZipFile(pred.with_suffix(".zip")) as z:
        assert z.namelist() == ["pred.json"] and json.loads(z.read("pred.json")) == json.loads(pred.read_text())
    xyz, verts = json.loads(pred.read_text())
    return np.asarray(xyz), np.asarray(verts)


def test_ho3d_submission_is_every_evaluation_frame_in_order_joint_order_and_opengl_axes(runs, tmp_path):
    write_ho3d(tmp_path / "src")
    root = tmp_path / "ho3d"
    assert convert_main(["ho3d", "--src", str(tmp_path / "src"), "--out", str(root), "--procedural-mano",
                         "--workers", "1", "--no-progress"]) == 0
    pred = tmp_path / "pred.json"
    evaluate.main(["--ckpt", str(runs["stage2"]), "--split", "test", "--data-root", str(root), "--format", "ho3d",
                   "--out", str(pred)])
    xyz, verts = _read(pred)
    order = (root / "ho3d_evaluation.txt").read_text().split()
    assert xyz.shape == (len(order), 21, 3) and verts.shape == (len(order), 778, 3)
    assert (xyz[..., 2] < 0).all() and (verts[..., 2] < 0).all()  # OpenGL: the hand at negative z
    # the same frames through the streaming tracker (the window grows to 3 frames, as in the submission)
    [name] = read_splits(root)["test"]
    seq = read_sequence(root / name)
    tracker = HandTracker.from_checkpoint(runs["stage2"], channel_order="bgr")
    for f, frame_id in enumerate(seq.extra["frame_ids"]):
        assert order[f] == f"{seq.extra['sequence']}/{frame_id}"
        image = cv2.imread(str(seq.frame_path(f)))
        result = tracker.update(image, seq["bbox"][f], seq["focal"][f], seq["princpt"][f], float(seq["timestamp"][f]))
        ours = xyz[f][np.asarray(NATIVE16_TIPS_TO_21)] * np.array([1.0, -1.0, -1.0])  # back to our order and OpenCV axes
        np.testing.assert_allclose(ours, result.joints_cam, atol=2e-4)
        np.testing.assert_allclose(verts[f] * np.array([1.0, -1.0, -1.0]), result.vertices_cam, atol=2e-4)


def test_freihand_submission_follows_the_sample_ids_and_matches_the_evaluated_predictions(runs, tmp_path):
    write_freihand(tmp_path / "src")
    root = tmp_path / "freihand"
    assert convert_main(["freihand", "--src", str(tmp_path / "src"), "--out", str(root), "--procedural-mano",
                         "--block", "10", "--val-samples", "1", "--workers", "1", "--no-progress",
                         "--versions", "gs"]) == 0
    pred = tmp_path / "pred.json"
    evaluate.main(["--ckpt", str(runs["stage1"]), "--split", "test", "--data-root", str(root), "--format",
                   "freihand", "--out", str(pred)])
    xyz, verts = _read(pred)
    report = evaluate.evaluate(runs["stage1"], "test", data_root=root, baseline=False, progress=False,
                               keep_samples=True)
    samples, dataset = report["_samples"], report["_dataset"]
    assert xyz.shape == (2, 21, 3) and len(samples.keys()) == 2
    for (s, f), joints in zip(samples.keys(), samples.joints_pred.double().numpy()):
        sample_id = dataset.sequences[s].extra["sample_ids"][f]
        np.testing.assert_allclose(xyz[sample_id], joints, atol=1e-5)  # OpenCV axes, FreiHAND = our joint order

"""SAM-3D-Body outputs -> the gesture corpus, on a fixture in the estimator's output format: per frame a pickled list
of per-person dicts (two people in some frames, a missing frame file, a frame where no one is found, a clip filmed at
25 fps), plus the clip's wav and TextGrid."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from gesture.data.corpus import CorpusConfig, load_clip, read_split
from gesture.data.sam3d import PER_FRAME, convert, main, track_people
from gesture.data.synthetic import _write_textgrid

W, H = 640, 360


def _person(rng: np.random.Generator, box: list[float], offset: float) -> dict:
    out = {"bbox": np.array(box, np.float32)}
    for key, shape in PER_FRAME.items():
        out[key] = (offset + 0.01 * rng.standard_normal(shape)).astype(np.float32)
    out["focal_length"] = np.float32(900.0 + offset)
    out["pred_cam_t"] = np.array([0.1, 0.2, 4.0 + offset], np.float32)
    return out


def write_clip(root: Path, name: str, n: int, fps: float, seed: int) -> dict:
    """A clip whose main speaker (large, centred) has offset 1 in every value, a passer-by (small, moving) 5."""
    rng = np.random.default_rng(seed)
    folder = root / name
    (folder / "sam3d").mkdir(parents=True)
    main_rows = {}
    for f in range(n):
        if f == 3:
            continue  # no output file for this frame (the estimator was not run / failed)
        people = [] if f == 5 else [_person(rng, [200, 40, 420, 360], 1.0)]
        if f % 2 == 0 and f != 5:  # a second, smaller person crosses the frame
            people.append(_person(rng, [10 + 20 * f, 100, 110 + 20 * f, 300], 5.0))
            people = people[::-1]  # the estimator's order is not the tracks' order
        if people and f != 5:
            main_rows[f] = next(p for p in people if p["bbox"][0] == 200)
        with open(folder / "sam3d" / f"{f:06d}.pkl", "wb") as fh:
            pickle.dump(people, fh)
    seconds = n / fps
    sf.write(str(folder / f"{name}.wav"), (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32),
             16000)
    _write_textgrid(folder / f"{name}.TextGrid", [(0.1, 0.5, "hello"), (0.6, 0.9, "world")], seconds)
    (folder / "video.json").write_text(json.dumps({"width": W, "height": H, "fps": fps, "num_frames": n,
                                                   "speaker": 2}))
    return main_rows


def test_main_speaker_is_kept_and_missing_frames_are_nan(tmp_path):
    rows = write_clip(tmp_path / "src", "2_scott_0_1_1", n=12, fps=30.0, seed=0)
    write_clip(tmp_path / "src", "2_scott_0_2_2", n=10, fps=30.0, seed=1)
    report = convert(tmp_path / "src", tmp_path / "corpus")
    summary = report["clips"]["2_scott_0_1_1"]
    assert summary["people_tracks"] >= 2 and summary["frames_without_main_speaker"] == 2
    cfg = CorpusConfig()
    with np.load(tmp_path / "corpus" / "mhr_30" / "2_scott_0_1_1.npz") as npz:
        body, keypoints = npz["body_pose_params"], npz["pred_keypoints_3d"]
        assert int(npz["width"]) == W and int(npz["vid"]) == 2
    for f in range(12):
        if f in rows:
            np.testing.assert_array_equal(body[f], rows[f]["body_pose_params"])  # the main speaker, every frame
            np.testing.assert_array_equal(keypoints[f], rows[f]["pred_keypoints_3d"])
        else:
            assert np.isnan(body[f]).all()  # frame 3 (no file) and 5 (no one found)
    clip = load_clip(tmp_path / "corpus", "2_scott_0_1_1", cfg)
    assert not clip.valid[3] and not clip.valid[5] and clip.valid.sum() == 10
    expected_shape = np.mean([rows[f]["shape_params"] for f in sorted(rows)], axis=0)
    np.testing.assert_allclose(clip.constants.shape_params, expected_shape, atol=1e-5)  # averaged per clip
    assert clip.constants.cam_t[2] == pytest.approx(5.0, abs=1e-5) and clip.raw_speaker == 2
    assert set(read_split(tmp_path / "corpus", cfg)) == {"2_scott_0_1_1", "2_scott_0_2_2"}
    # a second run keeps the corpus; the CLI converts again with --overwrite
    assert convert(tmp_path / "src", tmp_path / "corpus") == report
    assert "2_scott_0_1_1" in main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "corpus"),
                                     "--overwrite"])["clips"]


def test_other_frame_rates_are_resampled_to_30_fps(tmp_path):
    write_clip(tmp_path / "src", "3_solomon_0_1_1", n=25, fps=25.0, seed=2)
    report = convert(tmp_path / "src", tmp_path / "corpus")
    assert report["clips"]["3_solomon_0_1_1"]["frames_written"] == 30
    clip = load_clip(tmp_path / "corpus", "3_solomon_0_1_1", CorpusConfig())
    assert len(clip.valid) == 30 and len(clip.wave) >= 29 * 16000 // 30


def test_tracks_follow_overlap_and_a_clip_without_its_size_is_an_error(tmp_path):
    a = {"bbox": [0, 0, 10, 10]}
    b = {"bbox": [50, 50, 70, 70]}
    tracks = track_people({0: [a, b], 1: [{"bbox": [1, 0, 11, 10]}], 2: [{"bbox": [51, 50, 71, 70]}]})
    assert sorted(t.frames for t in tracks) == [[0, 1], [0, 2]]
    write_clip(tmp_path / "src", "clip", n=4, fps=30.0, seed=3)
    (tmp_path / "src" / "clip" / "video.json").unlink()
    with pytest.raises(ValueError, match="video size is unknown"):
        convert(tmp_path / "src", tmp_path / "corpus")
    assert not (tmp_path / "corpus").exists()  # staged: nothing half-written

"""DexYCB converter on a fixture in the dataset's exact layout (<subject>/<sequence>/meta.yml, <serial>/color_*.jpg,
labels_*.npz with pose_m as 45 PCA coefficients + translation, calibration/mano_*/mano.yml betas and
calibration/intrinsics/<serial>_640x480.yml), made from known MANO parameters the way the toolkit's manopth layer
poses them: flat_hand_mean false, PCA with all 45 components, left hands WITHOUT the left-shapedirs fix."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

from common.mano import ManoLayer, load_mano_arrays
from handpose.data.convert import dexycb
from handpose.data.convert import main as convert_main
from handpose.data.dataset import HandWindowDataset
from handpose.data.format import LEFT, read_sequence, read_splits

SUBJECTS = (dexycb.SUBJECTS[0], dexycb.SUBJECTS[2])  # s0: subject index 0 -> val, index 2 -> test (held out)
SERIAL = dexycb.SERIALS[3]
N_FRAMES, N_SEQ = 3, 5


def _hand(side: str, seed: int, n: int) -> dict:
    """Known (pose, betas, trans) and the joints manopth would give: the unfixed left model for left hands."""
    g = torch.Generator().manual_seed(seed)
    aa = 0.3 * torch.randn(n, 48, generator=g).double()
    betas = (0.8 * torch.randn(10, generator=g)).double()
    trans = torch.stack([0.05 * torch.randn(n, generator=g), 0.05 * torch.randn(n, generator=g),
                         0.6 + 0.1 * torch.rand(n, generator=g)], 1).double()
    layer = ManoLayer(None, side=side, flat_hand_mean=False, fix_left_shapedirs=False)
    with torch.no_grad():
        joints = layer(aa.float(), betas.float().expand(n, 10), trans.float()).joints.double()
    comps = load_mano_arrays(None, side)["hands_components"].astype(np.float64)
    coeffs = np.linalg.solve(comps.T, aa[:, 3:].numpy().T).T  # coeffs @ comps = finger axis-angle
    pose_m = np.concatenate([aa[:, :3].numpy(), coeffs, trans.numpy()], 1)
    return {"pose_m": pose_m, "betas": betas.numpy(), "joints": joints.numpy(), "aa": aa.numpy()}


def write_fixture(root: Path) -> dict:
    calib = root / "calibration"
    (calib / "intrinsics").mkdir(parents=True)
    (calib / "intrinsics" / f"{SERIAL}_640x480.yml").write_text(yaml.safe_dump(
        {"color": {"fx": 615.0, "fy": 615.5, "ppx": 320.5, "ppy": 240.2}, "depth": {"fx": 380.0}}))
    img = np.full((480, 640, 3), 90, np.uint8)
    truth = {}
    for s, subject in enumerate(SUBJECTS):
        for q in range(N_SEQ):
            side = "left" if (s + q) % 2 else "right"
            sequence = f"20200709_14{q:02d}{s:02d}"
            h = _hand(side, seed=10 * s + q, n=N_FRAMES)
            name = f"mano_20200709_{subject}_{side}_{q}"
            (calib / f"mano_{name}").mkdir()
            (calib / f"mano_{name}" / "mano.yml").write_text(yaml.safe_dump({"betas": h["betas"].tolist()}))
            folder = root / subject / sequence
            (folder / SERIAL).mkdir(parents=True)
            (folder / "meta.yml").write_text(yaml.safe_dump({
                "serials": [SERIAL], "num_frames": N_FRAMES, "mano_sides": [side], "mano_calib": [name],
                "ycb_ids": [2, 5], "ycb_grasp_ind": 0}))
            for f in range(N_FRAMES):
                cv2.imwrite(str(folder / SERIAL / f"color_{f:06d}.jpg"), img)
                no_hand = (s, q, f) == (0, 0, 1)
                np.savez(folder / SERIAL / f"labels_{f:06d}.npz", seg=np.zeros((4, 4), np.uint8),
                         pose_y=np.zeros((2, 3, 4), np.float32),
                         pose_m=(np.zeros((1, 51)) if no_hand else h["pose_m"][f][None]).astype(np.float32),
                         joint_3d=(-np.ones((1, 21, 3)) if no_hand else h["joints"][f][None]).astype(np.float32),
                         joint_2d=np.zeros((1, 21, 2), np.float32))
            truth[f"dexycb_{subject}_{sequence}_{SERIAL}"] = {**h, "side": side}
    return truth


def _convert(src: Path, out: Path, *extra: str) -> int:
    return convert_main(["dexycb", "--src", str(src), "--out", str(out), "--procedural-mano", "--workers", "1",
                         "--no-progress", *extra])


def test_dexycb_conversion_reproduces_the_joints_for_both_hands_and_loads(tmp_path):
    truth = write_fixture(tmp_path / "src")
    out = tmp_path / "out"
    assert _convert(tmp_path / "src", out) == 0
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["frames_checked"] == 2 * N_SEQ * N_FRAMES - 1 and report["joint_error_mm"]["max"] < 12.0
    splits = read_splits(out)
    # s0: the fifth sequence of each subject is held out: subject 1's -> val, subject 3's -> test
    assert len(splits["train"]) == 8 and len(splits["val"]) == 1 and len(splits["test"]) == 1
    assert SUBJECTS[0] in splits["val"][0] and SUBJECTS[1] in splits["test"][0]
    errors = {}
    for name, h in truth.items():
        seq = read_sequence(out / name)
        ok = seq["valid"]
        np.testing.assert_allclose(seq["joints_cam"][ok], h["joints"][ok], atol=1e-5)  # the dataset's own joints
        np.testing.assert_allclose(seq["mano_pose"][ok], h["aa"][ok], atol=1e-4)  # PCA -> axis-angle
        assert (seq["hand_side"] == (LEFT if h["side"] == "left" else 0)).all()
        assert seq.extra["left_betas_refitted"] == (h["side"] == "left")
        layer = ManoLayer(None, side=h["side"], flat_hand_mean=False)  # the fixed model, as the loaders use it
        with torch.no_grad():
            joints = layer(*(torch.as_tensor(seq[k][ok]) for k in ("mano_pose", "mano_shape", "mano_trans"))).joints
        errors[h["side"]] = max(errors.get(h["side"], 0.0), float(np.abs(joints.numpy() - h["joints"][ok]).max()))
    assert errors["right"] < 1e-5 and 0 < errors["left"] < 0.012  # left: what the betas refit leaves
    first = read_sequence(out / next(iter(truth)))
    assert first["valid"].tolist() == [True, False, True]  # the frame without a hand (joint_3d all -1)
    ds = HandWindowDataset(out, "train", num_frame=3, img_size=32)
    assert len(ds) > 0 and ds[0]["img"].shape == (3, 3, 32, 32)
    for i in range(len(ds)):  # through the loader: the dataset's joints, left hands mirrored to right ones
        seq_id, _, stop = ds.index[i]
        h = truth[ds.sequences[seq_id].name]
        mirror = np.array([-1.0, 1.0, 1.0]) if h["side"] == "left" else 1.0
        np.testing.assert_allclose(ds[i]["joints_cam"][-1], h["joints"][stop - 1] * mirror, atol=1e-4)


def test_left_hands_without_the_betas_refit_miss_their_joints(tmp_path, monkeypatch):
    """Keeping manopth's left betas under the fixed left model (what a converter that ignores the fix does): the
    joint check fails on exactly the left-hand sequences."""
    truth = write_fixture(tmp_path / "src")
    monkeypatch.setattr(dexycb, "refit_left_betas", lambda betas, path: betas)
    assert _convert(tmp_path / "src", tmp_path / "out") == 1
    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    failed = {f["sequence"] for f in report["failed"]}
    assert failed == {name for name, h in truth.items() if h["side"] == "left"}
    assert all(f["max_mm"] > 12.0 for f in report["failed"])


def test_setups_follow_the_toolkit():
    assert [dexycb.split_of("s0", s, 0, 4) for s in (0, 1, 2, 9)] == ["val", "val", "test", "test"]
    assert dexycb.split_of("s0", 5, 3, 7) == "train"
    assert [dexycb.split_of("s1", s, 0, 0) for s in (0, 6, 7, 8, 9)] == ["train", "val", "test", "test", "train"]
    assert [dexycb.split_of("s2", 0, c, 0) for c in (0, 5, 6, 7)] == ["train", "train", "val", "test"]
    assert [dexycb.split_of("s3", 0, 0, q) for q in (0, 15, 35, 95, 99)] == ["train", "val", "test", "val", "val"]

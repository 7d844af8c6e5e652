"""HO3D v3 converter on a fixture in the dataset's exact layout (train.txt / evaluation.txt, <set>/<SEQ>/rgb/*.jpg,
meta/*.pkl dicts with OpenGL-axis annotations, handPose None on an unannotated frame, root-only evaluation frames),
made from known OpenCV-frame MANO parameters through the procedural MANO model with flat_hand_mean true."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import torch
from scipy.spatial.transform import Rotation

from common.mano import ManoLayer
from common.mano_topology import NATIVE16_TIPS_TO_21
from handpose.data.convert import main as convert_main
from handpose.data.dataset import HandWindowDataset
from handpose.data.format import read_sequence, read_splits

GL = np.diag([1.0, -1.0, -1.0])
TO_HO3D = np.argsort(NATIVE16_TIPS_TO_21)  # our 21-joint order -> HO3D's (native 16, then the tips)
W, H, F = 160, 120, 200.0


def _hands(n: int, seed: int) -> dict:
    """Known hands in OpenCV camera axes: pose (flat-hand relative), shape, trans, joints, and their J0."""
    g = torch.Generator().manual_seed(seed)
    pose = 0.4 * torch.randn(n, 48, generator=g)
    shape = 0.8 * torch.randn(n, 10, generator=g)
    layer = ManoLayer(None, side="right", flat_hand_mean=True)
    with torch.no_grad():
        rest = layer(pose, shape)
        root = torch.stack([0.03 * torch.randn(n, generator=g), 0.03 * torch.randn(n, generator=g),
                            0.5 + 0.1 * torch.rand(n, generator=g)], 1)
        trans = root - rest.joints[:, 0]
        joints = layer(pose, shape, trans).joints
    return {"pose": pose.double().numpy(), "shape": shape.double().numpy(), "trans": trans.double().numpy(),
            "joints": joints.double().numpy(), "j0": rest.joints[:, 0].double().numpy()}


def _to_opengl(h: dict) -> dict:
    """The same hands as HO3D stores them: OpenGL axes, joints in HO3D's order."""
    glob = (Rotation.from_matrix(GL) * Rotation.from_rotvec(h["pose"][:, :3])).as_rotvec()
    return {"handPose": np.concatenate([glob, h["pose"][:, 3:]], 1), "handBeta": h["shape"],
            "handTrans": (h["j0"] + h["trans"]) @ GL.T - h["j0"], "handJoints3D": (h["joints"] @ GL.T)[:, TO_HO3D]}


def write_fixture(root: Path) -> dict:
    rng = np.random.default_rng(0)
    K = np.array([[F, 0, W / 2], [0, F, H / 2], [0, 0, 1.0]])
    sequences = {("train", "ABF10"): 4, ("train", "MC1"): 3, ("train", "SM2"): 3, ("evaluation", "SB11"): 3}
    truth, lines = {}, {"train": [], "evaluation": []}
    for i, ((set_name, seq), n) in enumerate(sequences.items()):
        h = _hands(n, seed=i)
        gl = _to_opengl(h)
        folder = root / set_name / seq
        (folder / "rgb").mkdir(parents=True)
        (folder / "meta").mkdir()
        ids = [f"{k * 2:04d}" for k in range(n)]  # every other frame: gaps of 2/30 s
        for k, frame in enumerate(ids):
            cv2.imwrite(str(folder / "rgb" / f"{frame}.jpg"), rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
            if set_name == "train":
                meta = {"camMat": K, "objName": "003_cracker_box", "objTrans": np.zeros(3), "objRot": np.zeros(3),
                        **{key: value[k] for key, value in gl.items()}}
                if (seq, k) == ("ABF10", 2):
                    meta.update(handPose=None, handBeta=None, handTrans=None, handJoints3D=None)  # unannotated
            else:
                meta = {"camMat": K, "handJoints3D": (h["joints"][k, 0] @ GL.T), "handBoundingBox":
                        np.array([10.0, 12.0, 90.0, 100.0]), "objName": "003_cracker_box"}
            with open(folder / "meta" / f"{frame}.pkl", "wb") as f:
                pickle.dump(meta, f, protocol=2)
            lines[set_name].append(f"{seq}/{frame}")
        truth[seq] = h
    for set_name, rows in lines.items():
        (root / f"{set_name}.txt").write_text("\n".join(rows) + "\n")
    return truth


def _convert(src: Path, out: Path, *extra: str) -> int:
    return convert_main(["ho3d", "--src", str(src), "--out", str(out), "--procedural-mano", "--workers", "1",
                         "--no-progress", *extra])


def test_ho3d_conversion_reproduces_the_joints_in_opencv_axes_and_loads(tmp_path):
    truth = write_fixture(tmp_path / "src")
    out = tmp_path / "out"
    assert _convert(tmp_path / "src", out) == 0
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["joint_error_mm"]["max"] < 0.05 and report["frames_checked"] == 9  # 10 train frames, 1 unannotated
    assert read_splits(out) == {"train": ["ho3d_train_ABF10"], "val": ["ho3d_train_MC1", "ho3d_train_SM2"],
                                "test": ["ho3d_evaluation_SB11"]}
    seq = read_sequence(out / "ho3d_train_ABF10")
    assert seq.flat_hand_mean and seq.extra["frame_ids"] == ["0000", "0002", "0004", "0006"]
    np.testing.assert_allclose(seq["timestamp"], [0, 2 / 30, 4 / 30, 6 / 30])
    assert seq["valid"].tolist() == [True, True, False, True]
    h = truth["ABF10"]
    ok = seq["valid"]
    np.testing.assert_allclose(seq["joints_cam"][ok], h["joints"][ok], atol=1e-5)  # OpenCV axes, our joint order
    np.testing.assert_allclose(seq["mano_trans"][ok], h["trans"][ok], atol=1e-5)
    np.testing.assert_allclose(Rotation.from_rotvec(seq["mano_pose"][ok, :3]).as_matrix(),
                               Rotation.from_rotvec(h["pose"][ok, :3]).as_matrix(), atol=1e-5)
    assert (seq["joints_cam"][..., 2] > 0).all()
    # evaluation frames: no hand pose -> not valid, the given box, the given root joint
    ev = read_sequence(out / "ho3d_evaluation_SB11")
    assert not ev["valid"].any()
    np.testing.assert_allclose(ev["bbox"], np.tile([10.0, 12.0, 90.0, 100.0], (3, 1)))
    np.testing.assert_allclose(ev["joints_cam"][:, 0], truth["SB11"]["joints"][:, 0], atol=1e-5)
    assert (out / "ho3d_evaluation.txt").read_text().splitlines()[0] == "SB11/0000"
    # the converted set loads (flat-hand poses converted to the loader's convention) with the known joints
    ds = HandWindowDataset(out, "train", num_frame=2, img_size=32)
    sample = ds[len(ds) - 1]
    np.testing.assert_allclose(sample["joints_cam"][-1], h["joints"][3], atol=1e-4)
    assert sample["timestamp"][-1] == np.float32(2 / 30)  # the gap after the unannotated frame's neighbour


def test_ho3d_without_the_axis_change_fails_the_joint_check(tmp_path, monkeypatch):
    """Reading the OpenGL annotations as if they were OpenCV ones: every annotated frame misses its joints."""
    from handpose.data.convert import ho3d

    write_fixture(tmp_path / "src")
    monkeypatch.setattr(ho3d, "OPENGL_TO_OPENCV", np.eye(3))
    out = tmp_path / "out"
    try:
        code = _convert(tmp_path / "src", out, "--workers", "1")
    except Exception as err:  # joints behind the camera are refused by the format itself
        assert "z <= 0" in str(err)
        return
    assert code == 1
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["failed"] and all(f["max_mm"] > 50 for f in report["failed"])

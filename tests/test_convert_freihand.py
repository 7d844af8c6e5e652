"""FreiHAND converter on a fixture in the dataset's exact layout (training_{K,mano,xyz}.json, training/rgb with
image versions at id + k N, an annotated evaluation split), made from known MANO parameters through the
procedural MANO model the way the FreiHAND toolbox poses its hands (flat_hand_mean false, joint 9 placed at
``[uv_root - pp, f] / scale``)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from common.mano import ManoLayer
from handpose.data.convert import main as convert_main
from handpose.data.dataset import HandWindowDataset
from handpose.data.format import SequenceFormatError, read_sequence, read_splits

N_TRAIN, N_EVAL, F = 5, 2, 480.0


def _samples(n: int, seed: int, flat_hand_mean: bool = False, nan_at: int | None = None) -> dict:
    """n FreiHAND samples: K, the 61-d mano vectors and xyz, from known (pose, shape, root position)."""
    g = torch.Generator().manual_seed(seed)
    pose = 0.4 * torch.randn(n, 48, generator=g)
    shape = 0.8 * torch.randn(n, 10, generator=g)
    root = torch.stack([0.04 * torch.randn(n, generator=g), 0.04 * torch.randn(n, generator=g),
                        0.45 + 0.2 * torch.rand(n, generator=g)], 1).double()  # joint 9 (middle MCP), metres
    layer = ManoLayer(None, side="right", flat_hand_mean=flat_hand_mean)
    with torch.no_grad():
        rest = layer(pose, shape).joints.double()
        trans = root - rest[:, 9]
        xyz = layer(pose, shape, trans.float()).joints.double()
    pp = np.array([112.0, 112.0])
    uv_root = root[:, :2].numpy() / root[:, 2:].numpy() * F + pp
    scale = F / root[:, 2].numpy()
    mano = np.concatenate([pose.double().numpy(), shape.double().numpy(), uv_root, scale[:, None]], 1)
    if nan_at is not None:
        mano[nan_at, 3] = np.nan
    K = np.tile(np.array([[F, 0, pp[0]], [0, F, pp[1]], [0, 0, 1.0]]), (n, 1, 1))
    return {"K": K, "mano": mano[:, None, :], "xyz": xyz.numpy(), "trans": trans.numpy()}


def write_fixture(root: Path, flat_hand_mean: bool = False, opengl_axes: bool = False) -> dict:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    out = {}
    for set_name, n, versions, seed in (("training", N_TRAIN, 2, 0), ("evaluation", N_EVAL, 1, 1)):
        s = _samples(n, seed, flat_hand_mean, nan_at=3 if set_name == "training" else None)
        xyz = s["xyz"] * np.array([1.0, -1.0, -1.0]) if opengl_axes else s["xyz"]
        for key, value in (("K", s["K"]), ("mano", s["mano"]), ("xyz", xyz)):
            (root / f"{set_name}_{key}.json").write_text(json.dumps(value.tolist()))  # NaN as json writes it
        rgb = root / set_name / "rgb"
        rgb.mkdir(parents=True)
        for k in range(versions):
            for i in range(n):
                img = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
                cv2.imwrite(str(rgb / f"{i + k * n:08d}.jpg"), img)
        out[set_name] = s
    return out


def _convert(src: Path, out: Path, *extra: str) -> int:
    return convert_main(["freihand", "--src", str(src), "--out", str(out), "--procedural-mano", "--block", "2",
                         "--val-samples", "1", "--workers", "1", "--no-progress", "--versions", "gs,hom", *extra])


def test_freihand_conversion_reproduces_the_joints_and_loads(tmp_path):
    truth = write_fixture(tmp_path / "src")
    out = tmp_path / "out"
    assert _convert(tmp_path / "src", out) == 0
    splits = read_splits(out)
    # training samples 0-3 in two versions (blocks of 2) train, sample 4 val; evaluation (gs only) test
    assert sorted(splits["train"]) == sorted(f"freihand_training_{v}_{s:05d}" for v in ("gs", "hom") for s in (0, 2))
    assert sorted(splits["val"]) == ["freihand_training_gs_00004", "freihand_training_hom_00004"]
    assert splits["test"] == ["freihand_evaluation_gs_00000"]
    report = json.loads((out / "conversion_report.json").read_text())
    assert not report["failed"] and report["joint_error_mm"]["max"] < 0.05, report
    seq = read_sequence(out / "freihand_training_hom_00002")
    assert seq.extra["sample_ids"] == [2, 3] and seq.extra["independent_frames"] and not seq.flat_hand_mean
    np.testing.assert_allclose(seq["joints_cam"][0], truth["training"]["xyz"][2], atol=1e-6)
    np.testing.assert_allclose(seq["mano_trans"][0], truth["training"]["trans"][2], atol=1e-5)
    # sample 3's pose has a NaN: not supervised, and it holds its nearest valid frame's values (the format's rule)
    assert seq["valid"].tolist() == [True, False]
    np.testing.assert_array_equal(seq["mano_pose"][1], seq["mano_pose"][0])
    other = read_sequence(out / "freihand_training_gs_00000")
    np.testing.assert_allclose(other["joints_cam"], truth["training"]["xyz"][0:2], atol=1e-6)
    # the image of version k is sample id + k N
    src_img = cv2.imread(str(tmp_path / "src" / "training" / "rgb" / f"{2 + N_TRAIN:08d}.jpg"))
    assert np.abs(cv2.imread(str(seq.frame_path(0))).astype(int) - src_img).mean() < 3  # same picture
    ds = HandWindowDataset(out, "train", num_frame=1, img_size=64)
    sample = ds[0]
    assert sample["img"].shape == (1, 3, 64, 64) and np.isfinite(sample["joints_2d"]).all()
    with pytest.raises(SequenceFormatError, match="independent frames"):
        HandWindowDataset(out, "train", num_frame=3, img_size=64)
    # a re-run converts nothing again
    assert _convert(tmp_path / "src", out) == 0
    total = len(splits["train"]) + len(splits["val"]) + len(splits["test"])
    assert json.loads((out / "conversion_report.json").read_text())["skipped_existing"] == total
    # --overwrite converts (and checks) every sequence again
    assert _convert(tmp_path / "src", out, "--overwrite") == 0
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["skipped_existing"] == 0 and report["converted"] == total


def test_a_wrong_pose_convention_fails_the_joint_check_with_its_worst_frames(tmp_path, capsys):
    """A dataset whose finger pose is relative to the flat hand (HO3D's convention) read as FreiHAND's."""
    write_fixture(tmp_path / "src", flat_hand_mean=True)
    out = tmp_path / "out"
    assert _convert(tmp_path / "src", out) == 1
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["failed"] and all(f["max_mm"] > 8.0 and f["worst_frames"] for f in report["failed"])
    assert "failed the joint check" in capsys.readouterr().out


def test_joints_in_opengl_axes_are_an_error_naming_sequence_and_field(tmp_path):
    write_fixture(tmp_path / "src", opengl_axes=True)
    with pytest.raises(SequenceFormatError, match=r"freihand_training_gs_00000: field 'joints_cam' has z <= 0"):
        _convert(tmp_path / "src", tmp_path / "out")


def test_data_freihand_config_reads_the_converted_folder_and_needs_the_mano_model(tmp_path):
    """`data=freihand` composes with the stage experiments; a converted set annotated with the official MANO model
    and no data.mano_model_path stops with an error saying so."""
    import os

    from hydra import compose, initialize_config_dir

    root = Path(__file__).resolve().parents[1]
    os.environ.setdefault("PROJECT_ROOT", str(root))
    with initialize_config_dir(str(root / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=stage1", "data=freihand", f"paths.data_dir={tmp_path}"])
    assert cfg.data.root == str(tmp_path / "freihand") and cfg.data.flat_hand_mean is False
    assert cfg.data.mano_model_path is None and cfg.data.generate_if_missing is False
    write_fixture(tmp_path / "src")
    assert _convert(tmp_path / "src", tmp_path / "freihand") == 0
    meta = tmp_path / "freihand" / "freihand_training_gs_00000" / "meta.json"
    meta.write_text(meta.read_text().replace('"procedural"', '"official"'))  # as a real conversion writes it
    with pytest.raises(SequenceFormatError, match="official MANO model: set mano_model_path"):
        HandWindowDataset(tmp_path / "freihand", "train", num_frame=1, img_size=64,
                          mano_model_path=cfg.data.mano_model_path)

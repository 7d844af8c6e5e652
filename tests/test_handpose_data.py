"""Hand pose data: on-disk format, synthetic generator, crop/mirror/rotation geometry, windows, bad input."""

from __future__ import annotations

import filecmp
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from common.data.collate import CheckedCollate
from common.geometry import project
from common.mano import JOINT_NAMES_21, ManoLayer
from handpose.data.datamodule import HandDataModule
from handpose.data.dataset import Augment, HandWindowDataset, denormalise, sample_spec
from handpose.data.format import (
    ANNOTATION_FILE,
    LEFT,
    RIGHT,
    SequenceFormatError,
    read_sequence,
    read_splits,
    write_sequence,
    write_splits,
)
from handpose.data.raster import render_mesh
from handpose.data.synthetic import SyntheticConfig, generate_dataset

TINY = SyntheticConfig(seed=5, num_seqs=3, image_size=128, min_frames=12, max_frames=12, drop_prob=0.3,
                       invalid_prob=0.15, occlusion_prob=1.0)
ROTATE = Augment(scale=0.2, rotation_deg=45.0, rotation_prob=1.0, shift=0.1, color=0.0)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("hands") / "tiny", TINY, workers=1)


@pytest.fixture(scope="module")
def all_sequences(tiny_root):
    splits = read_splits(tiny_root)
    return [read_sequence(tiny_root / name) for names in splits.values() for name in names]


@pytest.fixture()
def broken_root(tiny_root, tmp_path) -> Path:
    """A private copy of the tiny set that a test may damage."""
    return Path(shutil.copytree(tiny_root, tmp_path / "broken"))


def _all_split_dataset(root: Path, **kwargs) -> list[HandWindowDataset]:
    return [HandWindowDataset(root, split, **kwargs) for split in ("train", "val", "test")]


def _project(points: np.ndarray, focal: np.ndarray, princpt: np.ndarray) -> np.ndarray:
    return points[..., :2] / points[..., 2:] * focal[..., None, :] + princpt[..., None, :]


# --- generator ------------------------------------------------------------------------------------------------


def test_tiny_set_has_both_sides_invalid_frames_and_splits(tiny_root, all_sequences):
    splits = read_splits(tiny_root)
    assert {k: len(v) for k, v in splits.items()} == {"train": 1, "val": 1, "test": 1}
    sides = {int(s["hand_side"][0]) for s in all_sequences}
    assert sides == {RIGHT, LEFT}
    assert not all(s["valid"].all() for s in all_sequences)
    for s in all_sequences:
        assert len(s) == 12 and s.image_size == (128, 128) and s.flat_hand_mean


def test_generator_is_deterministic_for_a_seed(tmp_path):
    cfg = replace(TINY, num_seqs=1, image_size=64, min_frames=5, max_frames=5)
    a = generate_dataset(tmp_path / "a", cfg, workers=1)
    b = generate_dataset(tmp_path / "b", cfg, workers=1)
    c = generate_dataset(tmp_path / "c", replace(cfg, seed=cfg.seed + 1), workers=1)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) > 5
    _, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files], shallow=False)
    assert mismatch == [] and errors == []
    with np.load(a / "seq_0000" / ANNOTATION_FILE) as x, np.load(c / "seq_0000" / ANNOTATION_FILE) as y:
        assert not np.allclose(x["mano_pose"], y["mano_pose"])


def test_timestamps_are_irregular_when_frames_are_dropped(all_sequences):
    gaps = np.concatenate([np.diff(s["timestamp"]) * s.fps for s in all_sequences])
    np.testing.assert_allclose(gaps, np.round(gaps), atol=1e-9)  # whole frame periods
    assert gaps.min() == pytest.approx(1.0) and gaps.max() >= 2.0 - 1e-9


def test_annotations_match_the_mano_model_that_made_them(all_sequences):
    for s in all_sequences:
        side = "left" if s["hand_side"][0] == LEFT else "right"
        layer = ManoLayer(side=side, flat_hand_mean=s.flat_hand_mean)
        out = layer(torch.as_tensor(s["mano_pose"]), torch.as_tensor(s["mano_shape"]), torch.as_tensor(s["mano_trans"]))
        np.testing.assert_allclose(out.joints.numpy(), s["joints_cam"], atol=1e-5)
        uv = project(out.vertices.numpy(), s["focal"][:, None], s["princpt"][:, None])
        inside = s["bbox"]
        np.testing.assert_allclose(np.clip(uv.min(1), 0, 128), inside[:, :2], atol=1e-3)


@pytest.mark.parametrize("tilt", [35.0, None])
def test_start_orientation_faces_the_camera_within_the_configured_tilt(tilt):
    """Views cluster around the palm facing the camera (OpenCV: -z), fingers up in the image after un-rolling;
    ``None`` is uniform over SO(3). Checked on the procedural hand's rest geometry with scipy rotations."""
    from handpose.data.synthetic import OPENPOSE_FINGER_BASE, PoseSpace, _start_orientation

    with torch.no_grad():
        rest = ManoLayer(None, side="right", flat_hand_mean=True)(torch.zeros(1, 48), torch.zeros(1, 10)).joints[0]
    rest = rest.numpy().astype(np.float64)
    palm = PoseSpace(rest).palm
    rng = np.random.default_rng(0)
    rots = [_start_orientation(rng, rest, palm, tilt) for _ in range(400)]
    towards = np.array([r.apply(palm) for r in rots])
    angle = np.degrees(np.arccos(np.clip(-towards[:, 2], -1, 1)))  # palm normal vs the direction to the camera
    if tilt is None:
        assert abs(towards[:, 2].mean()) < 0.1  # uniform: no preferred view
        return
    # two tilt components ~ N(0, 35 deg): the angle is Rayleigh-distributed, median 35 * sqrt(2 ln 2) = 41 deg
    assert 36 < np.median(angle) < 47 and (angle < 90).mean() > 0.9
    up = _unit_rows(np.array([r.apply(rest[OPENPOSE_FINGER_BASE["middle"]] - rest[0]) for r in rots]))
    roll = np.degrees(np.arctan2(up[:, 0], -up[:, 1]))
    assert np.histogram(roll, bins=4, range=(-180, 180))[0].min() > 60  # any roll in the image plane


def _unit_rows(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_rendered_hand_covers_its_projected_joints():
    layer = ManoLayer(side="right")
    pose = torch.zeros(1, 48)
    pose[0, 0] = np.pi / 2  # palm towards the camera
    out = layer(pose, torch.zeros(1, 10), torch.tensor([[0.0, 0.0, 0.4]]))
    verts, joints = out.vertices[0].numpy(), out.joints[0].numpy()
    focal = np.array([150.0, 150.0])
    centre = joints.mean(0)
    princpt = 64.0 - focal * centre[:2] / centre[2]  # hand centred in the 128 x 128 image
    background = np.full((128, 128, 3), (200, 40, 40), np.uint8)
    image, alpha = render_mesh(background, verts, layer.faces.numpy(), focal, princpt,
                               np.array([0.5, 0.6, 0.85]), np.array([0.0, 0.0, 1.0]))
    assert 0.05 < (alpha > 0.5).mean() < 0.9
    uv = np.round(project(joints, focal, princpt)).astype(int)
    on_hand = alpha[uv[:, 1].clip(0, 127), uv[:, 0].clip(0, 127)] > 0.5
    assert on_hand.sum() >= len(JOINT_NAMES_21) - 1  # joints lie inside the mesh, so inside its silhouette
    hand_px = image[alpha > 0.99].astype(int)
    assert np.abs(hand_px - background[0, 0]).sum(1).min() > 30  # skin, not the background colour


# --- dataset geometry -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("augment", [None, ROTATE], ids=["plain", "augmented"])
def test_crop_intrinsics_project_camera_joints_onto_2d_joints(tiny_root, augment):
    for ds in _all_split_dataset(tiny_root, num_frame=3, img_size=96, augment=augment):
        for i in range(len(ds)):
            s = ds[i]
            np.testing.assert_allclose(_project(s["joints_cam"], s["focal"], s["princpt"]), s["joints_2d"], atol=2e-3)
            scale = 96 / (s["bbox"][:, 2] - s["bbox"][:, 0])
            np.testing.assert_allclose(s["focal"], s["orig_focal"] * scale[:, None], rtol=1e-5)
            np.testing.assert_allclose(s["princpt"], (s["orig_princpt"] - s["bbox"][:, :2]) * scale[:, None],
                                       rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("augment", [None, ROTATE], ids=["plain", "augmented"])
def test_mano_forward_reproduces_joints_after_mirroring(tiny_root, augment):
    samples = [ds[i] for ds in _all_split_dataset(tiny_root, num_frame=2, img_size=32, augment=augment)
               for i in range(len(ds))]
    batch = {k: torch.as_tensor(np.stack([s[k] for s in samples])) for k in samples[0]}
    assert set(batch["hand_side"].unique().tolist()) == {RIGHT, LEFT}
    layer = ManoLayer(side="right", flat_hand_mean=False)  # the batch convention
    out = layer(batch["mano_pose"], batch["mano_shape"], batch["mano_trans"])
    np.testing.assert_allclose(out.joints.numpy(), batch["joints_cam"].numpy(), atol=1e-4)


def _dot_frames(seq, joint_of_frame) -> list[np.ndarray]:
    """Black frames with one white Gaussian dot on the projected joint ``joint_of_frame(i)``."""
    w, h = seq.image_size
    yy, xx = np.mgrid[0:h, 0:w]
    frames = []
    for i in range(len(seq)):
        u, v = _project(seq["joints_cam"][i], seq["focal"][i], seq["princpt"][i])[joint_of_frame(i)]
        dot = 255.0 * np.exp(-((xx - u) ** 2 + (yy - v) ** 2) / (2 * 1.5**2))
        frames.append(np.repeat(np.round(dot).astype(np.uint8)[..., None], 3, axis=2))
    return frames


@pytest.mark.parametrize("augment", [None, ROTATE], ids=["plain", "augmented"])
def test_warped_image_agrees_with_cropped_targets_for_both_sides(all_sequences, tmp_path, augment):
    """The image path (warpAffine of the frame) and the camera path (R, mirror, crop intrinsics) agree."""
    joint_of_frame = lambda i: 0 if i % 2 == 0 else JOINT_NAMES_21.index("middle_tip")  # noqa: E731
    names = []
    for seq in all_sequences:
        arrays = dict(seq.arrays, valid=np.ones(len(seq), bool))
        write_sequence(tmp_path / seq.name, _dot_frames(seq, joint_of_frame), arrays, fps=seq.fps,
                       flat_hand_mean=seq.flat_hand_mean, mano_model=seq.mano_model, source="test", jpeg_quality=100)
        names.append(seq.name)
    write_splits(tmp_path, {"train": names})
    ds = HandWindowDataset(tmp_path, "train", num_frame=1, img_size=128, augment=augment)
    checked = 0
    for _ in range(2):  # two draws of the jitter
        for i in range(len(ds)):
            s = ds[i]
            frame = ds.index[i].stop - 1
            target = _project(s["joints_cam"], s["focal"], s["princpt"])[0, joint_of_frame(frame)]
            gray = denormalise(s["img"][0]).astype(np.float64).mean(-1)
            if not (8 <= target).all() or not (target <= 120).all() or gray.max() < 100:
                continue  # the dot is cut off by the crop border
            weight = np.where(gray > 0.3 * gray.max(), gray, 0.0)
            yy, xx = np.mgrid[0:128, 0:128]
            found = np.array([(weight * xx).sum(), (weight * yy).sum()]) / weight.sum()
            assert np.abs(found - target).max() < 0.75, (i, found, target)
            checked += 1
    assert checked >= len(ds)


# --- windows and batches --------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_frame", [1, 7])
def test_batches_have_the_documented_keys_and_shapes(tiny_root, num_frame):
    dm = HandDataModule(tiny_root, batch_size=2, num_workers=0, num_frame=num_frame, img_size=64,
                        augment={"rotation_prob": 1.0})
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    spec = sample_spec(num_frame, 64)
    assert set(batch) == set(spec)
    for key, shape in spec.items():
        assert tuple(batch[key].shape) == (2, *shape), key
    integer = {"hand_side", "seq_index", "frame_index"}
    for key in set(spec) - {"valid"} - integer:
        assert batch[key].dtype == torch.float32, key
    assert batch["valid"].dtype == torch.bool and all(batch[k].dtype == torch.int64 for k in integer)
    assert batch["valid"][:, -1].all()
    ts = batch["timestamp"]
    assert (ts[:, 0] == 0).all() and (ts.diff(dim=1) > 0).all()


@pytest.mark.parametrize(("num_frame", "stride"), [(1, 1), (7, 1), (4, 3)])
def test_windows_end_at_valid_frames(tiny_root, all_sequences, num_frame, stride):
    total = 0
    for ds in _all_split_dataset(tiny_root, num_frame=num_frame, stride=stride, img_size=32):
        for i in range(len(ds)):
            seq_id, start, stop = ds.index[i]
            assert stop - start == num_frame and ds.sequences[seq_id]["valid"][stop - 1]
        total += len(ds)
    expected = sum(len(np.flatnonzero(s["valid"][num_frame - 1:])[::stride]) for s in all_sequences)
    assert total == expected


def test_datamodule_generates_the_set_when_missing(tmp_path):
    small = {"seed": 1, "num_seqs": 3, "image_size": 64, "min_frames": 4, "max_frames": 4}
    dm = HandDataModule(tmp_path / "gen", batch_size=2, num_workers=0, img_size=32, generate_if_missing=True,
                        synthetic=small, generate_workers=1)
    assert dm.has_split("test")
    dm.prepare_data()
    assert read_splits(tmp_path / "gen")["test"] == ["seq_0002"]
    dm.setup("test")
    assert next(iter(dm.test_dataloader()))["img"].shape == (2, 1, 3, 32, 32)
    without = HandDataModule(tmp_path / "nothing", batch_size=2)
    with pytest.raises(FileNotFoundError, match="make data-hand"):
        without.has_split("train")


# --- bad input ------------------------------------------------------------------------------------------------


def _edit_annotations(root: Path, name: str, **changes) -> None:
    path = root / name / ANNOTATION_FILE
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    for key, fn in changes.items():
        arrays[key] = fn(arrays[key].copy())
    np.savez(path, **arrays)


def _set_nan(a):
    a[4, 7] = np.nan
    return a


def _set_bbox_outside(a):
    a[2] = [150.0, 10.0, 190.0, 40.0]
    return a


@pytest.mark.parametrize(("field", "change", "message"), [
    ("mano_pose", _set_nan, r"field 'mano_pose' is not finite .* frame 4"),
    ("joints_cam", lambda a: a[:, :20], r"field 'joints_cam' has shape \(12, 20, 3\)"),
    ("bbox", _set_bbox_outside, r"field 'bbox' lies outside the 128x128 image at frame 2"),
    ("timestamp", lambda a: a[::-1].copy(), r"field 'timestamp' is not strictly increasing"),
])
def test_bad_annotation_is_an_error_naming_sequence_and_field(broken_root, field, change, message):
    _edit_annotations(broken_root, "seq_0001", **{field: change})
    with pytest.raises(SequenceFormatError, match=rf"seq_0001: {message}"):
        HandWindowDataset(broken_root, "val")


def test_missing_frame_is_an_error_naming_it(broken_root):
    (broken_root / "seq_0000" / "frames" / "000003.jpg").unlink()
    with pytest.raises(SequenceFormatError, match=r"seq_0000: frame 3: missing image .*000003\.jpg"):
        HandWindowDataset(broken_root, "train")


def test_sequence_shorter_than_the_window_is_an_error_naming_it(tiny_root):
    with pytest.raises(ValueError, match=r"seq_0000.*12 frames, shorter than the window of 13"):
        HandWindowDataset(tiny_root, "train", num_frame=13)


def test_truncated_annotation_file_is_an_error_naming_file_and_sequence(broken_root):
    npz = broken_root / "seq_0000" / "annotations.npz"
    data = npz.read_bytes()
    npz.write_bytes(data[: len(data) // 3])
    with pytest.raises(SequenceFormatError, match=r"seq_0000.*cannot read .*seq_0000/annotations\.npz"):
        HandWindowDataset(broken_root, "train")


def _damage_scan_data(data: bytes) -> bytes:
    """The middle third of the entropy-coded scan overwritten with bytes that are never a marker (no 0xFF):
    every marker stays intact, so only a decoder that checks its data notices."""
    sos, eoi = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")
    start, stop = sos + (eoi - sos) // 3, sos + 2 * (eoi - sos) // 3
    junk = bytes(np.random.default_rng(0).integers(0, 255, stop - start, dtype=np.uint8))
    return data[:start] + junk + data[stop:]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "scan"])
def test_corrupt_frame_is_a_counted_logged_skip(broken_root, caplog, damage):
    ds = HandWindowDataset(broken_root, "train", num_frame=1, img_size=32)
    seq = ds.sequences[0]
    frame = int(np.flatnonzero(seq["valid"])[3])
    path = seq.frame_path(frame)
    data = path.read_bytes()
    damaged = {"truncate": data[: len(data) // 2], "garbage": bytes(range(256)) * 4,
               "scan": _damage_scan_data(data)}[damage]
    if damage == "scan":  # OpenCV decodes it into an image of the right size without an error
        assert cv2.imdecode(np.frombuffer(damaged, np.uint8), cv2.IMREAD_COLOR).shape == (*seq.image_size[::-1], 3)
    path.write_bytes(damaged)
    i = next(k for k in range(len(ds)) if ds.index[k].stop - 1 == frame)
    with caplog.at_level(logging.WARNING, logger="handpose.data.dataset"):
        sample = ds[i]
    assert ds.num_skipped == 1
    assert str(path) in caplog.text
    neighbour = ds[i + 1]  # the search order is i, i + 1, i - 1, ...
    np.testing.assert_array_equal(sample["joints_cam"], neighbour["joints_cam"])
    assert ds.num_skipped == 1


def test_skips_count_windows_once_each(broken_root):
    """One unreadable frame makes every window that contains it unloadable: each counts once, however often it
    is asked for (two passes over the data)."""
    ds = HandWindowDataset(broken_root, "train", num_frame=3, img_size=32)
    seq = ds.sequences[0]

    def containing(f: int) -> list[int]:
        return [k for k in range(len(ds)) if ds.index[k].seq == 0 and ds.index[k].start <= f < ds.index[k].stop]

    frame = max(range(len(seq)), key=lambda f: len(containing(f)))
    seq.frame_path(frame).write_bytes(b"not a jpeg")
    for _ in range(2):
        for i in range(len(ds)):
            ds[i]
    assert len(containing(frame)) > 1 and ds.num_skipped == len(containing(frame))


def test_skips_are_counted_across_dataloader_workers(broken_root):
    ds = HandWindowDataset(broken_root, "train", num_frame=1, img_size=32)
    seq = ds.sequences[0]
    bad = [int(f) for f in np.flatnonzero(seq["valid"])[[1, 4]]]
    for f in bad:
        seq.frame_path(f).write_bytes(b"not a jpeg")
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=CheckedCollate(sample_spec(1, 32)))
    n = sum(len(b["img"]) for b in loader)
    assert n == len(ds) and ds.num_skipped == len(bad)


def test_write_sequence_rejects_bad_arrays_and_keeps_no_partial_folder(all_sequences, tmp_path):
    seq = all_sequences[0]
    frames = [cv2.imread(str(seq.frame_path(i))) for i in range(len(seq))]
    bad = dict(seq.arrays, hand_side=np.full(len(seq), 2, np.int8))
    with pytest.raises(SequenceFormatError, match="field 'hand_side' must be 0 .* frame 0"):
        write_sequence(tmp_path / "x", frames, bad, fps=30.0, flat_hand_mean=True, mano_model="procedural",
                       source="test")
    assert list(tmp_path.iterdir()) == []
    copy = write_sequence(tmp_path / "x", frames, seq.arrays, fps=30.0, flat_hand_mean=True,
                          mano_model="procedural", source="test")
    for key, value in seq.arrays.items():
        np.testing.assert_array_equal(copy[key], value)


def test_annotations_are_the_samples_last_frames_without_reading_images(tiny_root, monkeypatch):
    ds = HandWindowDataset(tiny_root, "train", num_frame=3, img_size=32)
    samples = [ds[i] for i in range(len(ds))]
    import handpose.data.dataset as dataset_module

    monkeypatch.setattr(dataset_module, "read_frame", lambda *a, **k: pytest.fail("annotations() read an image"))
    ann = ds.annotations()
    assert set(ann) == set(sample_spec(3, 32)) - {"img", "timestamp"}
    for i, s in enumerate(samples):
        for key, value in ann.items():
            np.testing.assert_array_equal(value[i], s[key][-1], err_msg=key)
    # the window's own indices: its sequence in the split and consecutive frames ending at the annotated one
    assert all((s["seq_index"] == s["seq_index"][0]).all() and (np.diff(s["frame_index"]) == 1).all() for s in samples)
    drawn = ds.sample_annotations(7)
    assert all(v.shape[0] == 7 for v in drawn.values()) and drawn["valid"].all()


def test_occluded_is_an_optional_field_written_by_the_generator_and_checked(tiny_root, tmp_path):
    seq = read_sequence(tiny_root / read_splits(tiny_root)["train"][0])
    assert seq["occluded"].dtype == np.bool_ and seq["occluded"].any()  # occlusion_prob=1 in TINY
    assert seq["occluded"].tolist() == seq.extra["occluded"]
    arrays = {k: v for k, v in seq.arrays.items() if k != "occluded"}
    frames = [cv2.imread(str(seq.frame_path(i))) for i in range(len(seq))]
    plain = write_sequence(tmp_path / "plain", frames, arrays, fps=seq.fps, flat_hand_mean=seq.flat_hand_mean,
                           mano_model=seq.mano_model, source="test")
    assert not plain["occluded"].any()  # absent: all false
    with pytest.raises(SequenceFormatError, match="occluded"):
        write_sequence(tmp_path / "bad", frames, {**arrays, "occluded": np.zeros(len(seq) + 1, bool)}, fps=seq.fps,
                       flat_hand_mean=seq.flat_hand_mean, mano_model=seq.mano_model, source="test")


@pytest.mark.parametrize("kind", ["png", "scan"])
def test_write_sequence_refuses_frames_that_are_not_sound_jpegs(all_sequences, tmp_path, kind):
    """A PNG's bytes (or a JPEG with damaged scan data) passed as a frame is an error naming the frame, not a
    .jpg that every later read rejects (or decodes into garbage)."""
    seq = all_sequences[0]
    frames = [seq.frame_path(i).read_bytes() for i in range(len(seq))]
    img = cv2.imread(str(seq.frame_path(2)))
    frames[2] = cv2.imencode(".png", img)[1].tobytes() if kind == "png" else _damage_scan_data(frames[2])
    with pytest.raises(SequenceFormatError, match=r"frame 2.*not a readable JPEG"):
        write_sequence(tmp_path / "x", frames, seq.arrays, fps=30.0, flat_hand_mean=True, mano_model="procedural",
                       source="test")
    assert not (tmp_path / "x").exists()

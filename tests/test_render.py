"""Rendering: the parameter view's frames and moving cursor, mp4 with the expected frame count and muxed audio
(imageio-ffmpeg's binary), the GIF fallback without ffmpeg, the CLI on a result npz, and the mesh splat against the
pinhole projection of a sphere."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import soundfile as sf

import gesture.render as render
from common import video
from common.video import ffmpeg_exe, has_audio_stream
from gesture.layout import POSE_DIM, ClipConstants, unpack
from gesture.render import load_result, render_frames, render_video, splat_mesh

FPS = 30.0
SR = 16000
SIZE = (160, 120)
needs_ffmpeg = pytest.mark.skipif(ffmpeg_exe() is None, reason="no ffmpeg binary")


@pytest.fixture(scope="module")
def clip() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = 24
    motion = np.cumsum(rng.normal(size=(t, POSE_DIM)) * 0.05, axis=0)
    gt = np.cumsum(rng.normal(size=(t, POSE_DIM)) * 0.05, axis=0)
    wave = (np.sin(2 * np.pi * 220 * np.arange(int(t / FPS * SR)) / SR) * 0.3).astype(np.float32)
    return {"motion": motion, "gt": gt, "wave": wave, "onsets": np.array([0.2, 0.5])}


def _cursor_columns(frames: np.ndarray) -> np.ndarray:
    red = (frames[..., 0] > 200) & (frames[..., 1] < 60) & (frames[..., 2] < 60)  # CURSOR_RGB
    return np.array([np.flatnonzero(r.sum(axis=0) > 10).mean() for r in red])


def test_render_frames_shape_and_moving_cursor(clip):
    frames = render_frames(clip["motion"], FPS, gt=clip["gt"], wave=clip["wave"], onsets=clip["onsets"], size=SIZE,
                           max_frames=12)
    assert frames.shape == (12, SIZE[1], SIZE[0], 3) and frames.dtype == np.uint8
    cols = _cursor_columns(frames)
    assert np.all(np.diff(cols) > 0)  # one cursor, moving right every frame
    # Only the cursor changes between frames.
    assert np.count_nonzero(np.any(frames[0] != frames[-1], axis=-1)) < 4 * SIZE[1]


def test_render_frames_segment_and_bad_input(clip):
    frames = render_frames(clip["motion"], FPS, size=SIZE, start=20, max_frames=100)
    assert frames.shape[0] == 4  # clipped to the end of the clip
    with pytest.raises(ValueError, match="320"):
        render_frames(clip["motion"][:, :300], FPS, size=SIZE)
    with pytest.raises(ValueError, match="start frame"):
        render_frames(clip["motion"], FPS, size=SIZE, start=24)


@needs_ffmpeg
def test_mp4_has_expected_frames_and_audio(clip, tmp_path):
    import imageio_ffmpeg

    out = render_video(clip["motion"], tmp_path / "a.mp4", FPS, gt=clip["gt"], wave=clip["wave"], size=SIZE)
    assert out.suffix == ".mp4"
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(out))
    assert frames == 24
    assert has_audio_stream(out)
    silent = render_video(clip["motion"], tmp_path / "b.mp4", FPS, size=SIZE, max_frames=10)
    assert imageio_ffmpeg.count_frames_and_secs(str(silent))[0] == 10 and not has_audio_stream(silent)


def test_gif_fallback_without_ffmpeg(clip, tmp_path, monkeypatch):
    monkeypatch.setattr(video, "ffmpeg_exe", lambda: None)  # common.video writes the files of both families
    out = render_video(clip["motion"], tmp_path / "a.mp4", FPS, wave=clip["wave"], size=SIZE, max_frames=8)
    assert out == tmp_path / "a.gif" and not (tmp_path / "a.mp4").exists()
    assert iio.imread(out, index=None).shape[:3] == (8, SIZE[1], SIZE[0])


@needs_ffmpeg
def test_cli_renders_a_result_npz_with_wav(clip, tmp_path):
    import imageio_ffmpeg

    npz, wav = tmp_path / "result.npz", tmp_path / "a.wav"
    np.savez(npz, motion=clip["motion"].astype(np.float32), gt=clip["gt"].astype(np.float32), fps=FPS)
    sf.write(wav, clip["wave"], SR)
    out = render.main(["--npz", str(npz), "--wav", str(wav), "--out", str(tmp_path / "r.mp4"), "--width", "160",
                       "--height", "120", "--seconds", "0.5"])
    assert imageio_ffmpeg.count_frames_and_secs(str(out))[0] == 15 and has_audio_stream(out)


def test_load_result_reads_sam3d_keys_as_written_by_infer(clip, tmp_path):
    npz = tmp_path / "r.npz"
    np.savez(npz, **unpack(clip["motion"]), gt=clip["gt"], wave=clip["wave"], sr=np.asarray(SR), fps=FPS)
    res = load_result(npz)
    np.testing.assert_allclose(res.motion, clip["motion"], rtol=0, atol=0)
    np.testing.assert_array_equal(res.wave, clip["wave"])
    assert res.gt.shape == res.motion.shape and res.sr == SR and res.fps == FPS and res.constants is None


def test_load_result_names_missing_keys(tmp_path):
    npz = tmp_path / "bad.npz"
    np.savez(npz, something=np.zeros(3))
    with pytest.raises(KeyError, match="bad.npz.*motion"):
        load_result(npz)


def _sphere(radius: float, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    th, ph = np.meshgrid(np.linspace(0, np.pi, n), np.linspace(0, 2 * np.pi, 2 * n, endpoint=False), indexing="ij")
    verts = radius * np.stack([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th)], -1).reshape(-1, 3)
    idx = np.arange(n * 2 * n).reshape(n, 2 * n)
    a, b, c, d = idx[:-1], np.roll(idx, -1, 1)[:-1], idx[1:], np.roll(idx, -1, 1)[1:]
    faces = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([b, d, c], -1).reshape(-1, 3)])
    return verts, faces


def test_mesh_splat_matches_pinhole_projection():
    verts, faces = _sphere(0.2)
    focal, depth, shift = 300.0, 2.0, 0.3
    img = splat_mesh(verts + [shift, 0.0, depth], faces, focal, (200, 160))
    body = np.any(img != 255, axis=-1)
    ys, xs = np.nonzero(body)
    # Centre at f * x / z + cx; apparent radius about f * r / z (a sphere seen from 2 m: within a pixel or two).
    assert xs.mean() == pytest.approx(focal * shift / depth + 100, abs=1.5)
    assert ys.mean() == pytest.approx(80, abs=1.5)
    assert (xs.max() - xs.min()) / 2 == pytest.approx(focal * 0.2 / depth, abs=2.5)
    behind = splat_mesh(verts + [0.0, 0.0, -depth], faces, focal, (200, 160))
    assert np.all(behind == 255)  # nothing behind the camera is drawn


class SphereBackend:
    """A stand-in for ``MHRBackend``: a sphere 2 m ahead that moves sideways with the first body parameter."""

    def __init__(self):
        self.verts, self.faces = _sphere(0.3, n=16)

    def vertices(self, motion, constants, model_params=None):
        shift = np.zeros((len(motion), 1, 3))
        shift[:, 0, 0] = motion[:, 0]
        return self.verts[None] + shift + np.array(constants.cam_t)


def test_mesh_backend_hook_is_drawn_left_of_the_parameter_view(clip, tmp_path):
    consts = ClipConstants(cam_t=(0.0, 0.0, 2.0), focal_length=500.0, scale_params=(0.0,) * 28,
                           shape_params=(0.0,) * 45, width=640, height=480, fps=FPS)
    out = render_video(clip["motion"], tmp_path / "m.gif", FPS, size=(320, 120), max_frames=6, mesh=SphereBackend(),
                       constants=consts)
    frames = iio.imread(out, index=None)
    assert frames.shape[:3] == (6, 120, 320)
    mesh_part = np.any(frames[:, :, :160] < 200, axis=-1)  # the sphere, drawn at 120 / 480 of the video scale
    assert mesh_part[:, 60].any(axis=-1).all()
    with pytest.raises(ValueError, match="constants"):
        render_video(clip["motion"], tmp_path / "n.gif", FPS, mesh=SphereBackend())


def test_clip_constants_round_trip_through_result_npz(clip, tmp_path):
    consts = ClipConstants(cam_t=(0.0, 0.5, 4.0), focal_length=1000.0, scale_params=(0.0,) * 28,
                           shape_params=(0.0,) * 45, width=640, height=480, fps=FPS)
    npz = tmp_path / "r.npz"
    np.savez(npz, motion=clip["motion"], **consts.to_arrays())
    assert load_result(npz).constants == consts

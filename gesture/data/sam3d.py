"""SAM-3D-Body estimates of talking-people videos -> the gesture corpus (``gesture.data.corpus``).

``python -m gesture.data.sam3d --src SRC --out ROOT`` (``make data-gesture-sam3d SRC=... OUT=...``). Reads, per
clip (one folder per video)::

    SRC/<clip>/sam3d/<frame:06d>.pkl  what SAM3DBodyEstimator.process_one_image returned for that frame: a list of
                                      per-person dicts (bbox [4], focal_length, pred_cam_t [3], global_rot [3],
                                      body_pose_params [133], hand_pose_params [108], expr_params [72],
                                      shape_params [45], scale_params [28], pred_keypoints_3d [70, 3],
                                      mhr_model_params [204], ...); a missing file or an empty list: no one found
    SRC/<clip>/<clip>.wav             the clip's speech (any rate: the corpus loader resamples)
    SRC/<clip>/<clip>.TextGrid        its word alignment (an interval tier "words")
    SRC/<clip>/video.json             {"width": W, "height": H, "fps": f, "num_frames": N (optional),
                                      "speaker": raw id (optional)}
    SRC/train_test_split.csv          optional, id,type (train | val | test | additional); otherwise clips are
                                      split by position in name order: every 10th val, the one after it test

One person per clip, the main speaker: detections are linked into tracks frame to frame (a box joins the track
whose last box, at most ``--max-gap`` frames back, overlaps it most, IoU >= ``--min-iou``), and the main speaker is
the track with the largest sum of box areas over the clip (the person most and largest on screen). Frames where
that track has no box, or whose outputs are not finite, are written as NaN rows: the corpus loader treats them as
missing frames (dropped from windows, counted). Per-frame ``shape_params`` / ``scale_params`` / ``focal_length`` are
kept per frame; the loader averages them (over the valid frames) into the clip's constants, and ``pred_cam_t`` into
``cam_t``. ``pred_keypoints_3d`` is kept for foot contact. A video at another frame rate is resampled to the
corpus's 30 fps by nearest frame (logged). Every written clip is read back through the corpus loader.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data.pickles import read_pickle
from common.data.staging import staged_folder
from gesture.data.corpus import CorpusConfig, CorpusError, load_clip

log = logging.getLogger(__name__)

PER_FRAME = {"body_pose_params": (133,), "hand_pose_params": (108,), "expr_params": (72,), "global_rot": (3,),
             "pred_cam_t": (3,), "shape_params": (45,), "scale_params": (28,), "focal_length": (),
             "pred_keypoints_3d": (70, 3), "mhr_model_params": (204,)}
REQUIRED = ("body_pose_params", "hand_pose_params", "expr_params", "global_rot", "pred_cam_t", "shape_params",
            "scale_params", "focal_length")
FRAMES_DIR = "sam3d"
VIDEO_FILE = "video.json"


@dataclass
class Track:
    frames: list[int]
    boxes: list[np.ndarray]
    people: list[dict]

    @property
    def area(self) -> float:
        return float(sum(box_area(b) for b in self.boxes))


def box_area(box) -> float:
    """Area of a box (x0, y0, x1, y1); 0 for an empty one."""
    b = np.asarray(box, np.float64).reshape(4)
    return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def track_people(per_frame: dict[int, list[dict]], min_iou: float = 0.3, max_gap: int = 15) -> list[Track]:
    """Link the people of ``{frame: [person dicts with "bbox"]}`` into tracks (greedy, by IoU, frames in order)."""
    tracks: list[Track] = []
    for f in sorted(per_frame):
        taken: set[int] = set()
        for person in sorted(per_frame[f], key=lambda p: -box_area(p["bbox"])):  # larger people claim tracks first
            box = np.asarray(person["bbox"], np.float64).reshape(4)
            best, best_iou = None, min_iou
            for t, track in enumerate(tracks):
                if t in taken or f - track.frames[-1] > max_gap:  # taken: already extended in this frame
                    continue
                overlap = iou(track.boxes[-1], box)
                if overlap >= best_iou:
                    best, best_iou = t, overlap
            if best is None:
                tracks.append(Track([f], [box], [person]))
                best = len(tracks) - 1
            else:
                tracks[best].frames.append(f)
                tracks[best].boxes.append(box)
                tracks[best].people.append(person)
            taken.add(best)
    return tracks


def clip_arrays(folder: Path, num_frames: int, min_iou: float, max_gap: int) -> tuple[dict[str, np.ndarray], dict]:
    """The main speaker's per-frame outputs ``{key: [N, ...]}`` (NaN where missing) and a summary."""
    frames_dir = folder / FRAMES_DIR
    per_frame: dict[int, list[dict]] = {}
    for path in sorted(frames_dir.glob("*.pkl")):
        if not path.stem.isdigit():
            continue
        people = read_pickle(path, expect=list)
        for i, person in enumerate(people):
            if not isinstance(person, dict) or "bbox" not in person:
                raise ValueError(f"{path}: person {i} is not a SAM-3D-Body output dict with a 'bbox'")
        per_frame[int(path.stem)] = people
    if not per_frame:
        raise FileNotFoundError(f"{frames_dir}: no <frame>.pkl files (SAM3DBodyEstimator.process_one_image outputs)")
    n = num_frames or max(per_frame) + 1
    tracks = track_people({f: p for f, p in per_frame.items() if f < n}, min_iou, max_gap)
    if not tracks:
        raise ValueError(f"{folder}: no person detected in any frame")
    main = max(tracks, key=lambda t: t.area)
    arrays = {k: np.full((n, *shape), np.nan, np.float32) for k, shape in PER_FRAME.items()}
    bad_fields: dict[str, int] = {}
    for f, person in zip(main.frames, main.people):
        for key, shape in PER_FRAME.items():
            if key not in person:
                if key in REQUIRED:
                    raise ValueError(f"{folder / FRAMES_DIR / f'{f:06d}.pkl'}: the main speaker has no {key!r}")
                continue
            value = np.asarray(person[key], np.float32)
            if value.size != int(np.prod(shape)):
                bad_fields[key] = bad_fields.get(key, 0) + 1
                continue
            arrays[key][f] = value.reshape(shape)
    for key in [k for k in PER_FRAME if k not in REQUIRED and np.isnan(arrays[k]).all()]:
        del arrays[key]  # not in these outputs (e.g. an older SAM-3D-Body without mhr_model_params)
    summary = {"frames": n, "people_tracks": len(tracks), "main_speaker_frames": len(main.frames),
               "frames_without_detection": n - len({f for f in per_frame if f < n and per_frame[f]}),
               "frames_without_main_speaker": n - len(main.frames), "wrong_size_fields": bad_fields}
    return arrays, summary


def resample(arrays: dict[str, np.ndarray], fps: float, target: float) -> dict[str, np.ndarray]:
    """Nearest-frame resampling of per-frame arrays from ``fps`` to ``target`` (new arrays)."""
    n = next(iter(arrays.values())).shape[0]
    count = int(np.floor(n * target / fps + 1e-9))
    src = np.minimum(np.round(np.arange(count) * fps / target).astype(int), n - 1)
    return {k: v[src].copy() for k, v in arrays.items()}


def convert_clip(folder: Path, out: Path, cfg: CorpusConfig, width: int | None, height: int | None,
                 fps: float | None, min_iou: float, max_gap: int) -> dict:
    """One clip folder -> ``out``'s motion npz, wav and TextGrid; returns its summary."""
    clip = folder.name
    video = json.loads((folder / VIDEO_FILE).read_text()) if (folder / VIDEO_FILE).is_file() else {}
    width, height = video.get("width", width), video.get("height", height)
    fps = float(video.get("fps", fps or cfg.fps))
    if not width or not height:
        raise ValueError(f"{folder}: the video size is unknown: give {VIDEO_FILE} (width, height) or --width/--height")
    arrays, summary = clip_arrays(folder, int(video.get("num_frames") or 0), min_iou, max_gap)
    if abs(fps - cfg.fps) > 1e-3:
        log.info("%s: %.3g fps resampled to %.3g by nearest frame", clip, fps, cfg.fps)
        arrays = resample(arrays, fps, cfg.fps)
    sources = {"wav": folder / f"{clip}.wav", "textgrid": folder / f"{clip}.TextGrid"}
    for what, path in sources.items():
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: missing {path.name} (the clip's {what})")
    paths = cfg.paths(out, clip)
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    extra = {"width": np.array(int(width)), "height": np.array(int(height)), "fps": np.array(cfg.fps)}
    if video.get("speaker") is not None:
        extra["vid"] = np.array(int(video["speaker"]))
    np.savez(paths["npz"], **arrays, **extra)
    shutil.copyfile(sources["wav"], paths["wav"])
    shutil.copyfile(sources["textgrid"], paths["textgrid"])
    try:
        raw = load_clip(out, clip, cfg)  # the corpus loader reads it back
    except CorpusError as err:
        raise ValueError(f"{clip}: the converted clip does not load: {err}") from err
    summary.update(valid_frames=int(raw.valid.sum()), frames_written=len(raw.valid))
    return summary


def default_split(clips: list[str]) -> dict[str, str]:
    """By position in name order: every 10th clip val, the one after it test, the rest train."""
    return {c: ("val" if i % 10 == 8 else "test" if i % 10 == 9 else "train") for i, c in enumerate(sorted(clips))}


def convert(src: Path, out: Path, width: int | None = None, height: int | None = None, fps: float | None = None,
            min_iou: float = 0.3, max_gap: int = 15, overwrite: bool = False) -> dict:
    """Every clip folder of ``src`` -> the corpus at ``out`` (written whole: staged, then renamed)."""
    cfg = CorpusConfig()
    src, out = Path(src), Path(out)
    if (out / cfg.split_file).is_file() and not overwrite:
        log.info("%s exists: kept (--overwrite converts again)", out)
        return json.loads((out / "conversion_report.json").read_text()) if (out / "conversion_report.json").is_file() else {}
    clips = sorted(p.name for p in src.iterdir() if (p / FRAMES_DIR).is_dir())
    if not clips:
        raise FileNotFoundError(f"{src}: no clip folders with a {FRAMES_DIR}/ subfolder")
    split_path = src / cfg.split_file
    if split_path.is_file():
        with split_path.open(newline="") as f:
            splits = {row["id"]: row["type"] for row in csv.DictReader(f)}
        missing = [c for c in clips if c not in splits]
        if missing:
            raise ValueError(f"{split_path}: no row for clips {missing[:5]}")
    else:
        splits = default_split(clips)
    from rich.progress import track

    report = {"clips": {}}
    with staged_folder(out) as tmp:
        for clip in track(clips, description=f"SAM-3D-Body -> {out}"):
            report["clips"][clip] = convert_clip(src / clip, tmp, cfg, width, height, fps, min_iou, max_gap)
        (tmp / cfg.split_file).write_text("id,type\n" + "".join(f"{c},{splits[c]}\n" for c in clips))
        (tmp / "conversion_report.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m gesture.data.sam3d", description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, type=Path, help="one folder per clip (see the module docstring)")
    p.add_argument("--out", required=True, type=Path, help="the corpus root to write")
    p.add_argument("--width", type=int, default=None, help="video width when a clip has no video.json")
    p.add_argument("--height", type=int, default=None, help="video height when a clip has no video.json")
    p.add_argument("--fps", type=float, default=None, help="video frame rate when a clip has no video.json (30)")
    p.add_argument("--min-iou", type=float, default=0.3, help="box overlap that links a detection to a track")
    p.add_argument("--max-gap", type=int, default=15, help="frames a track may miss and still be continued")
    p.add_argument("--overwrite", action="store_true", help="convert again over an existing corpus")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = convert(a.src, a.out, a.width, a.height, a.fps, a.min_iou, a.max_gap, a.overwrite)
    for clip, s in report.get("clips", {}).items():
        print(f"{clip}: {s['valid_frames']}/{s['frames_written']} valid frames, {s['people_tracks']} track(s), "
              f"main speaker in {s['main_speaker_frames']} of {s['frames']} frames")
    return report


if __name__ == "__main__":
    main()

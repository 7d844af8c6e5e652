"""Gesture inference from a trained MambaTalk checkpoint: wav + TextGrid + speaker -> a result npz a renderer can
use on its own (SAM-3D-Body per-frame keys, foot contact and the per-clip render constants), or every clip of the
test split plus a metrics JSON. The checkpoint carries the model, the VQ-VAEs and ``DataInfo``; no cache needed.

    python -m gesture.infer --ckpt C --wav W --textgrid T --speaker S --out X.npz
    python -m gesture.infer --ckpt C --split test --out-dir D

Single clips are seeded with the training mean pose; test clips with their first ``pre_frames`` real frames (as
MambaTalk's test loop). Render constants come from the clip's source npz when the wav sits in a corpus tree
(``<root>/wave16k/<id>.wav`` next to ``<root>/mhr_30/<id>.npz``), else from the speaker's training average, else
from all training clips, else ``gesture.data.info.DEFAULT_CONSTANTS`` (1080 x 1920, focal 1500, cam_t (0, 0, 4)).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.checkpoint import read_checkpoint
from gesture.data.audio import audio_features, fit_to_frames, load_wave
from gesture.data.corpus import CorpusConfig, CorpusError, load_clip
from gesture.data.info import DataInfo
from gesture.data.speakers import SpeakerMap
from gesture.data.textgrid import Vocabulary, frame_words, read_words
from gesture.generate import generate, seed_from_mean
from gesture.layout import POSE_DIM, VQ_PARTS, ClipConstants, unpack
from gesture.lit.mambatalk import CHECKPOINT_KEY
from gesture.mhr_params import HeadBases, compose_model_params
from gesture.models.generator import GestureModel
from gesture.models.mambatalk import MambaTalk
from gesture.models.vqvae import VQVAE

log = logging.getLogger(__name__)


@dataclass
class LoadedGenerator:
    """A checkpoint ready for generation (eval mode)."""

    model: GestureModel
    info: DataInfo
    pose_length: int
    pre_frames: int
    fgd_encoder: str | None = None  # the FGD encoder the model was validated with

    @property
    def speakers(self) -> SpeakerMap:
        return SpeakerMap(self.info.speaker_raw_ids)

    def normalise_audio(self, feats: np.ndarray) -> torch.Tensor:
        """Raw per-frame features ``[N, C]`` -> normalised ``[1, N, C]`` float32 tensor."""
        mean, std = np.asarray(self.info.audio_mean, np.float32), np.asarray(self.info.audio_std, np.float32)
        return torch.from_numpy(((feats - mean) / std).astype(np.float32))[None]

    def denormalise(self, motion: torch.Tensor) -> np.ndarray:
        """Normalised ``[..., 320]`` -> raw float32 numpy."""
        mean, std = self.info.stats()
        return (motion.detach().cpu().float() * std + mean).numpy()


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> LoadedGenerator:
    """Rebuild generator + VQ-VAEs from a ``MambaTalkModule`` checkpoint (strict weights) on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (train with `make train-mambatalk`)")
    ckpt = read_checkpoint(path, pickle_note=logging.INFO)
    extras = ckpt.get(CHECKPOINT_KEY)
    if extras is None or "state_dict" not in ckpt:
        raise ValueError(f"{path}: not a MambaTalkModule checkpoint (no '{CHECKPOINT_KEY}' entry)")
    generator = MambaTalk(**extras["generator_config"])
    vqvaes = {p: VQVAE(**extras["vqvae_configs"][p]) for p in VQ_PARTS}
    model = GestureModel(generator, vqvaes, extras["decode_from"], int(extras.get("edge_pad", 0)),
                         int(extras.get("boundary_blend", 0)))
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the stored configs: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.to(device).eval()
    fgd = (ckpt.get("hyper_parameters") or {}).get("fgd_encoder")
    return LoadedGenerator(model, DataInfo.from_dict(extras["data_info"]), int(extras["pose_length"]),
                           int(extras["pre_frames"]), None if fgd is None else str(fgd))


def result_arrays(motion_raw: np.ndarray, constants: ClipConstants, mhr_bases: HeadBases | None = None,
                  **extra: np.ndarray) -> dict[str, np.ndarray]:
    """Raw motion ``[N, 320]`` + constants -> npz arrays: ``body_pose_params [N, 133]``, ``hand_pose_params
    [N, 108]``, ``expr_params [N, 72]``, ``global_rot [N, 3]``, ``contact [N, 4]``, ``cam_t [3]``,
    ``focal_length``, ``scale_params [28]``, ``shape_params [45]``, ``width``, ``height``, ``fps`` (+ ``extra``),
    and under SAM-3D-Body's own names what it gives per frame: ``pred_cam_t [N, 3]`` (the clip's camera, every
    frame). With ``shape_params`` (MHR's identity) and ``expr_params`` (its face expression) these are MHR's
    inputs but for the 204 model parameters, which SAM-3D-Body composes with its head's scale and hand bases: with
    ``mhr_bases`` (``gesture.mhr_params.HeadBases`` of a SAM-3D-Body checkpoint) ``mhr_model_params [N, 204]`` too,
    what ``gesture.render`` draws the MHR body from."""
    motion_raw = np.asarray(motion_raw, np.float32)
    if motion_raw.ndim != 2 or motion_raw.shape[1] != POSE_DIM:
        raise ValueError(f"result_arrays: motion must be [N, {POSE_DIM}], got {motion_raw.shape}")
    arrays = {**unpack(motion_raw), **constants.to_arrays()}
    arrays["pred_cam_t"] = np.tile(np.asarray(arrays["cam_t"], np.float32).reshape(1, 3), (len(motion_raw), 1))
    if mhr_bases is not None:
        t = {k: torch.from_numpy(np.asarray(arrays[k], np.float64)) for k in
             ("global_rot", "body_pose_params", "hand_pose_params", "scale_params")}
        arrays["mhr_model_params"] = compose_model_params(
            t["global_rot"], t["body_pose_params"], t["hand_pose_params"], t["scale_params"].reshape(1, 28),
            mhr_bases).numpy().astype(np.float32)
    return {**arrays, **extra}


def source_constants(wav: Path, corpus: CorpusConfig | None = None) -> ClipConstants | None:
    """The clip's constants when ``wav`` sits in a corpus tree with its npz and TextGrid, else None."""
    corpus = corpus or CorpusConfig()
    root, clip = wav.resolve().parent.parent, wav.stem
    if wav.resolve().parent.name != corpus.wave_dir or not corpus.paths(root, clip)["npz"].is_file():
        return None
    try:
        return load_clip(root, clip, corpus).constants
    except CorpusError as err:
        log.warning("source npz of %s unusable (%s); using the training average constants", clip, err)
        return None


def clip_inputs(gen: LoadedGenerator, wav: str | Path, textgrid: str | Path) -> tuple[torch.Tensor, torch.Tensor, int]:
    """wav + TextGrid -> normalised audio features ``[1, N, C]``, word ids ``[1, N]``, ``N`` frames.

    ``N = round(samples * fps / sr)``; the wave is padded by less than half a frame to fill the last frame."""
    a = gen.info.audio
    sr, fps = int(a["sr"]), float(a["fps"])
    wave = load_wave(wav, sr)
    n = int(np.floor(len(wave) * fps / sr + 0.5))
    if n < 1:
        raise ValueError(f"{wav}: {len(wave)} samples is shorter than one frame at {fps} fps")
    wave = fit_to_frames(wave, n, sr, fps)
    feats = audio_features(wave, n, sr, fps, a["kind"], int(a["n_mels"]))
    if feats.shape[1] != gen.info.audio_dim:
        raise ValueError(f"{wav}: {feats.shape[1]} audio channels, the checkpoint was trained on "
                         f"{gen.info.audio_dim}")
    vocab = Vocabulary(gen.info.vocab_words)
    words = vocab.encode_frames(frame_words(read_words(textgrid), n, fps)).astype(np.int64)
    return gen.normalise_audio(feats), torch.from_numpy(words)[None], n


def infer_clip(gen: LoadedGenerator, wav: str | Path, textgrid: str | Path, speaker: int | None,
               streaming: bool = False) -> tuple[np.ndarray, ClipConstants]:
    """One clip -> (raw motion ``[N, 320]``, render constants). ``speaker``: raw id; -1 / None = unknown."""
    audio, words, n = clip_inputs(gen, wav, textgrid)
    try:
        index = gen.speakers.index(speaker)
    except KeyError as err:
        raise KeyError(f"{err.args[0]}; use --speaker -1 for an unknown speaker") from None
    device = next(gen.model.parameters()).device
    result = generate(gen.model, audio.to(device), words.to(device), torch.tensor([index], device=device),
                      seed_from_mean(1, gen.pre_frames, device), n, pose_length=gen.pose_length,
                      pre_frames=gen.pre_frames, sr=int(gen.info.audio["sr"]), fps=float(gen.info.audio["fps"]),
                      streaming=streaming)
    constants = source_constants(Path(wav)) or gen.info.clip_constants(speaker)
    return gen.denormalise(result.motion[0]), constants


def infer_split(gen: LoadedGenerator, out_dir: str | Path, split: str = "test", streaming: bool = False,
                datamodule_overrides: dict[str, Any] | None = None, fgd_encoder: str | None = None,
                baselines: bool = True, mhr_bases: HeadBases | None = None) -> dict[str, Any]:
    """Every clip of ``split`` -> ``<out_dir>/<clip>.npz`` (with ``gt [N, 320]``) and ``metrics.json``."""
    from gesture.data.datamodule import GestureDataModule
    from gesture.metrics import BASELINES, EvalClip, GestureMetrics, evaluate_baselines, format_comparison

    if split != "test":
        raise ValueError("only the test split holds whole clips (train / val are windows)")
    kwargs = {**gen.info.datamodule, **(datamodule_overrides or {})}
    if not kwargs:
        raise ValueError("the checkpoint does not say where its data is; pass --data-root and --cache-dir")
    kwargs["generate_if_missing"] = False
    dm = GestureDataModule(batch_size=1, **kwargs)
    dm.prepare_data()
    dm.setup("test")
    if not dm.has_split("test"):
        raise ValueError(f"{kwargs['root']}: no test clips")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sr, fps = int(gen.info.audio["sr"]), float(gen.info.audio["fps"])
    if fgd_encoder is None and gen.fgd_encoder and Path(gen.fgd_encoder).is_file():
        fgd_encoder = gen.fgd_encoder
    make_metrics = lambda: GestureMetrics(encoder_ckpt=fgd_encoder, fps=fps)  # noqa: E731
    metrics, clips = make_metrics(), []
    device = next(gen.model.parameters()).device
    for batch in dm.test_dataloader():
        motion = batch["motion"].to(device)
        n = motion.shape[1]
        result = generate(gen.model, batch["audio"].to(device), batch["words"].to(device),
                          batch["speaker"].to(device), motion[:, :gen.pre_frames], n, pose_length=gen.pose_length,
                          pre_frames=gen.pre_frames, sr=sr, fps=fps, streaming=streaming)
        pred = gen.denormalise(result.motion[0])
        gt = batch["motion_raw"][0].numpy()
        name = batch["clip"][0]
        constants = ClipConstants.from_dict({k: batch[k][0].numpy() for k in
                                             ("cam_t", "focal_length", "scale_params", "shape_params", "width",
                                              "height", "fps")})
        wave = batch["wave"][0].numpy() if "wave" in batch else None
        extra = {"gt": gt.astype(np.float32)} | ({"wave": wave, "sr": np.asarray(sr)} if wave is not None else {})
        np.savez(out_dir / f"{name}.npz", **result_arrays(pred, constants, mhr_bases, **extra))
        metrics.update(pred, gt, wave=wave, sr=sr, fps=fps, boundaries=result.boundaries, names=name)
        clips.append(EvalClip(name=name, motion=gt.astype(np.float64), speaker=int(batch["speaker"][0]),
                              wave=wave, sr=sr, fps=fps))
    columns = {"model": metrics.compute(sync=False)}
    if baselines and len(clips) >= 2:
        columns.update(evaluate_baselines(clips, np.asarray(gen.info.mean), np.asarray(gen.info.std), make_metrics,
                                          kinds=BASELINES))
    report = {"clips": [c.name for c in clips], "streaming": streaming, "metrics": columns}
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    print(format_comparison(columns))
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", required=True, type=Path, help="MambaTalkModule checkpoint (.ckpt)")
    p.add_argument("--wav", type=Path, help="speech audio (resampled to the training rate if needed)")
    p.add_argument("--textgrid", type=Path, help="Praat TextGrid with a 'words' tier")
    p.add_argument("--speaker", type=int, default=-1, help="raw speaker id (BEAT numbering); -1 = unknown")
    p.add_argument("--out", type=Path, help="result npz (single clip)")
    p.add_argument("--split", choices=("test",), help="run every clip of this split instead of one wav")
    p.add_argument("--out-dir", type=Path, help="folder for the split's npz files and metrics.json")
    p.add_argument("--data-root", help="corpus root (default: the one the model was trained on)")
    p.add_argument("--cache-dir", help="cache folder (default: the training one)")
    p.add_argument("--fgd-encoder", help="FGD motion encoder for the split metrics (default: the training one)")
    p.add_argument("--streaming", action="store_true", help="carry Mamba states across windows")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sam3d-checkpoint", type=Path, default=None,
                   help="a SAM-3D-Body model.ckpt: also write mhr_model_params (composed with its head's bases)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    gen = load_generator(a.ckpt, a.device)
    bases = HeadBases.from_checkpoint(a.sam3d_checkpoint) if a.sam3d_checkpoint else None
    if a.split:
        if a.out_dir is None:
            p.error("--split needs --out-dir")
        overrides = {k: v for k, v in (("root", a.data_root), ("cache_dir", a.cache_dir)) if v}
        infer_split(gen, a.out_dir, a.split, a.streaming, overrides, a.fgd_encoder, mhr_bases=bases)
        return
    if not (a.wav and a.textgrid and a.out):
        p.error("single-clip mode needs --wav, --textgrid and --out (or use --split test --out-dir D)")
    motion, constants = infer_clip(gen, a.wav, a.textgrid, a.speaker, a.streaming)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(a.out, **result_arrays(motion, constants, bases))
    print(f"{a.out}: {motion.shape[0]} frames at {constants.fps:g} fps, speaker {a.speaker}")


if __name__ == "__main__":
    main()

"""Gesture generation speed on CPU: real-time factor of the default (CPU-sized) MambaTalk, windowed vs streaming.

Real-time factor = seconds of motion generated per second of compute (> 1: faster than real time). Both modes
run the same model on the same clip, interleaved repeats, median, so the ratio holds on a busy machine. The
weights are random (the trained ones cost the same compute). Run:
``python -m bench.bench_gesture [--seconds 60 --repeats 5 --threads N]``. Prints a markdown table. Not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from bench.timing import interleaved
from gesture.generate import generate, seed_from_mean
from gesture.layout import VQ_PARTS
from gesture.models.generator import GestureModel
from gesture.models.mambatalk import MambaTalk
from gesture.models.vqvae import VQVAE

FPS = 30
AUDIO_DIM = 3  # onset_amp features, the synthetic default


def default_model(num_speakers: int = 5, vocab_size: int = 64) -> GestureModel:
    """The generator of configs/model/mambatalk.yaml and the VQ-VAEs of configs/model/vqvae.yaml, random weights."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    root = Path(__file__).resolve().parents[1]
    os.environ.setdefault("PROJECT_ROOT", str(root))
    with initialize_config_dir(str(root / "configs"), version_base="1.3"):
        gen_cfg = compose("train", overrides=["model=mambatalk", "data=gesture_synthetic", "experiment_name=bench"])
        vq_cfg = compose("train", overrides=["model=vqvae_body", "data=gesture_synthetic", "experiment_name=bench"])
    vq_kw = {k: v for k, v in vq_cfg.model.vqvae.items() if k not in ("_target_", "part")}
    vqvaes = {p: VQVAE(p, **vq_kw) for p in VQ_PARTS}
    generator: MambaTalk = instantiate(gen_cfg.model.generator)(
        num_speakers=num_speakers, vocab_size=vocab_size, audio_dim=AUDIO_DIM,
        code_dim=vq_kw["code_dim"], n_codes=vq_kw["n_codes"])
    return GestureModel(generator, vqvaes, edge_pad=gen_cfg.model.edge_pad).eval()


def bench(seconds: float = 60.0, repeats: int = 5, seed: int = 0) -> tuple[dict[str, list[float]], int]:
    """Seconds of compute per generation of a ``seconds``-long clip in each mode, repeats interleaved."""
    torch.manual_seed(seed)
    model = default_model()
    n = int(seconds * FPS)
    audio, words = torch.randn(1, n, AUDIO_DIM), torch.randint(0, 64, (1, n))
    speaker, seed_frames = torch.tensor([1]), seed_from_mean(1, 4)
    runs = {mode: (lambda s=streaming: generate(model, audio, words, speaker, seed_frames, n, streaming=s))
            for mode, streaming in (("windowed", False), ("streaming", True))}
    return interleaved(runs, repeats), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0, help="clip length (seconds of motion at 30 fps)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    times, n = bench(args.seconds, args.repeats)
    print(f"Generation of a {args.seconds:.0f} s clip ({n} frames, windows of 64 with 4 seed frames), default "
          f"CPU model, batch 1, {args.threads} threads, torch {torch.__version__}, median of {args.repeats} "
          f"interleaved repeats, load average {os.getloadavg()[0]:.1f}\n")
    print("| mode | median (s) | min (s) | real-time factor (motion s / compute s) |")
    print("|---|---:|---:|---:|")
    for mode, ts in times.items():
        med = statistics.median(ts)
        print(f"| {mode} | {med:.2f} | {min(ts):.2f} | {args.seconds / med:.1f}x |")


if __name__ == "__main__":
    main()

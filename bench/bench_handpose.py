"""Hand pose costs on CPU with the default (CPU-sized) model configs, measured side by side in one run.

Training step time and peak tensor memory of Stage 1 vs Stage 2 (FK + loss on the last frame vs on all T frames,
the naive way), HandTracker per-frame latency vs recomputing the window, and data-loader throughput vs
what a training step consumes. Run: ``python -m bench.bench_handpose [--batch 8 --repeats 5 --threads 1]``.
Prints markdown tables. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch.profiler import ProfilerActivity, profile

from bench.timing import interleaved
from handpose.data.datamodule import HandDataModule
from handpose.data.dataset import read_frame
from handpose.data.format import LEFT, read_sequence, read_splits
from handpose.data.synthetic import SyntheticConfig, generate_dataset
from handpose.lit import HandPoseLit
from handpose.models import HandPrediction, ManoParams
from handpose.tracker import HandTracker

ROOT = Path(__file__).resolve().parents[1]
BENCH_DATA = SyntheticConfig(seed=0, num_seqs=7, image_size=256, min_frames=30, max_frames=30)


def compose_model(stage: str, num_frame: int) -> tuple[HandPoseLit, dict]:
    """The repo's default model config of ``stage`` (configs/model/handpose_<stage>.yaml) -> (HandPoseLit, data cfg)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model=handpose_{stage}", "data=hand_synthetic", "experiment_name=bench",
                                          f"data.num_frame={num_frame}", "model.stage1_weight=null",
                                          # the network as configured (its heatmap head feeds the joint MLP);
                                          # the 2D keypoint loss terms are left out, so every row times the
                                          # same MANO loss
                                          "model.loss.weights.heatmap_2d=0", "model.loss.weights.keypoints_2d=0"])
    cfg.data.img_size = cfg.model.net.backbone.img_size  # as the experiments do
    return instantiate(cfg.model), OmegaConf.to_container(cfg.data, resolve=True)


def all_frames_loss(lit: HandPoseLit, pred: HandPrediction, batch: dict) -> dict:
    """The naive Stage 2 loss: FK and every term on all T frames ([b, T] predictions, here the last
    frame's prediction repeated T times so the network cost is unchanged), emulated as b*T one-frame samples."""
    t = batch["img"].shape[1]
    pred_all = HandPrediction(ManoParams(*(x.repeat(1, t, 1) for x in pred.mano)),
                              tuple(h.repeat(1, t, 1) for h in pred.log_heatmaps))
    flat_pred = HandPrediction(ManoParams(*(rearrange(x, "b t d -> (b t) 1 d") for x in pred_all.mano)),
                               tuple(rearrange(h, "b t n -> (b t) 1 n") for h in pred_all.log_heatmaps))
    flat_batch = {k: rearrange(v, "b t ... -> (b t) 1 ...") for k, v in batch.items()}
    return lit.loss(flat_pred, flat_batch, lit.net.translation)


def train_step(lit: HandPoseLit, batch: dict, all_frames: bool = False) -> Callable[[], None]:
    """One optimisation step as HandPoseLit.training_step does it (network, loss, backward, AdamW), no logging."""
    params = [p for p in lit.parameters() if p.requires_grad]
    optimizer = lit.optimizer_factory(params=params)
    lit.train()

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        pred = lit(batch)  # with precomputed frame tokens (model.frame_tokens): no encoder pass
        out = all_frames_loss(lit, pred, batch) if all_frames else lit.loss(pred, batch, lit.net.translation)
        out["loss"].backward()
        optimizer.step()

    return run


def loss_step(lit: HandPoseLit, batch: dict, all_frames: bool = False) -> Callable[[], None]:
    """FK + loss forward and backward alone, on fixed (leaf) predictions of the last frame."""
    with torch.no_grad():
        pred = lit(batch)
    mano = [x.detach().requires_grad_() for x in pred.mano]
    heatmaps = [h.detach().requires_grad_() for h in pred.log_heatmaps]

    def run() -> None:
        for leaf in (*mano, *heatmaps):
            leaf.grad = None
        leaves = HandPrediction(ManoParams(*mano), tuple(heatmaps))
        out = all_frames_loss(lit, leaves, batch) if all_frames else lit.loss(leaves, batch, lit.net.translation)
        out["loss"].backward()

    return run


def peak_tensor_mb(run: Callable[[], None]) -> float:
    """Peak CPU tensor memory (MB) during one call: torch.profiler's memory timeline, all categories (parameters,
    gradients, optimizer state, activations, temporaries) of tensors alive at any moment of the step."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "memory.json"
        with warnings.catch_warnings():  # deprecated in favour of a CUDA-only API; still the CPU route
            warnings.simplefilter("ignore", FutureWarning)
            prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    return max(sum(s) for s in sizes) / 2**20


def first_batch(datamodule: HandDataModule) -> dict:
    datamodule.setup("fit")
    return next(iter(torch.utils.data.DataLoader(datamodule.datasets["train"], batch_size=datamodule.batch_size,
                                                 shuffle=True, collate_fn=datamodule.collate_fn)))


def loader_samples_per_s(datamodule: HandDataModule, batches: int) -> float:
    """Training loader (augmentation on, ``num_workers`` workers) samples/s after the workers have started."""
    datamodule.setup("fit")
    it = iter(datamodule.train_dataloader())
    next(it)  # worker start-up and the first batch
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += next(it)["img"].shape[0]
    rate = n / (time.perf_counter() - t0)
    del it
    return rate


class RecomputeTracker(HandTracker):
    """The naive streaming baseline: keep the last T crops and re-encode the whole window every frame."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.crops: deque = deque(maxlen=self.num_frame)

    @torch.inference_mode()
    def update(self, image, bbox, focal, princpt, timestamp, side="right"):
        bbox, focal, princpt = self._check(image, bbox, focal, princpt, float(timestamp), side)
        self.crops.append(self.prepare(image, bbox, focal, princpt, side))
        self.timestamps.append(float(timestamp))
        window = {k: torch.from_numpy(np.stack([getattr(c, k) for c in self.crops]))[None]
                  for k in ("img", "bbox", "focal", "princpt")}
        tokens = self.net.encode_frames(window["img"], window["bbox"], window["focal"], window["princpt"])
        self.tokens = deque(tokens[0], maxlen=self.num_frame)
        pred = self.net.refine_and_decode(tokens, self.window_timestamps(), window["focal"], window["princpt"])
        return self._result(pred, side, float(timestamp), focal, princpt)


def tracker_latency(trackers: dict[str, HandTracker], seq, frames: list[np.ndarray], steps: int,
                    sync: Callable[[], None] = lambda: None) -> dict:
    """Seconds per update of each tracker on the same frame stream, interleaved per frame; the first
    ``num_frame`` frames (buffer filling) are not timed. ``sync`` waits for the device (CUDA) around each update."""
    times: dict[str, list[float]] = {name: [] for name in trackers}
    warm = max(t.num_frame for t in trackers.values())
    for i in range(warm + steps):
        f = i % len(frames)
        side = "left" if int(seq["hand_side"][f]) == LEFT else "right"
        ts = i / seq.fps
        for name, tracker in trackers.items():
            sync()
            t0 = time.perf_counter()
            tracker.update(frames[f], seq["bbox"][f], seq["focal"][f], seq["princpt"][f], ts, side)
            sync()
            if i >= warm:
                times[name].append(time.perf_counter() - t0)
    return times


def med_ms(ts: list[float]) -> float:
    return 1000 * statistics.median(ts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--num-frame", type=int, default=7)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tracker-steps", type=int, default=100)
    p.add_argument("--loader-batches", type=int, default=6)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the timed process")
    p.add_argument("--data-root", type=Path, default=None, help="default: a small synthetic set in a temp folder")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    b, t = args.batch, args.num_frame

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_root or generate_dataset(Path(tmp) / "hands", BENCH_DATA)
        lit1, data1 = compose_model("stage1", 1)
        lit2, data2 = compose_model("stage2", t)
        lit2.net.load_state_dict(lit1.net.state_dict(), strict=False)  # Stage 2 starts from Stage 1
        lit2_all, _ = compose_model("stage2", t)
        lit2_all.load_state_dict(lit2.state_dict())
        dms = {}
        for name, data in (("stage1", data1), ("stage2", data2)):
            data = {k: v for k, v in data.items() if k != "_target_"}
            data.update(root=root, batch_size=b, num_workers=2, generate_if_missing=False, seed=0,
                        persistent_workers=False)
            dms[name] = HandDataModule(**data)
        batch1, batch2 = first_batch(dms["stage1"]), first_batch(dms["stage2"])

        with torch.no_grad():  # what model.frame_tokens serves instead of the images (the encoder is frozen)
            tokens = lit2.net.encode_frames(batch2["img"], batch2["bbox"], batch2["focal"], batch2["princpt"])
        batch2_tokens = {**{k: v for k, v in batch2.items() if k != "img"}, "tokens": tokens}

        # 1) training step, side by side
        steps = {
            "Stage 1 (T=1)": train_step(lit1, batch1),
            f"Stage 2 (T={t}), FK + loss on the last frame": train_step(lit2, batch2),
            f"Stage 2 (T={t}) on precomputed frame tokens (the default)": train_step(lit2, batch2_tokens),
            f"Stage 2 (T={t}), FK + loss on all {t} frames (naive)": train_step(lit2_all, batch2, True),
        }
        step_times = interleaved(steps, args.repeats)
        peaks = {name: peak_tensor_mb(run) for name, run in steps.items()}
        losses = {"last frame": loss_step(lit2, batch2), f"all {t} frames": loss_step(lit2, batch2, True)}
        loss_times = interleaved(losses, 3 * args.repeats)
        loss_peaks = {name: peak_tensor_mb(run) for name, run in losses.items()}

        # 2) streaming inference
        splits = read_splits(root)
        seq = read_sequence(root / (splits.get("test") or splits["train"])[0])
        frames = [read_frame(seq.frame_path(f), seq.image_size) for f in range(len(seq))]
        bbox_scale = float(data1["bbox_scale"])
        trackers = {
            "Stage 1 tracker (T=1)": HandTracker.from_lit(lit1.eval(), 1, bbox_scale, channel_order="bgr"),
            f"Stage 2 tracker, token ring buffer (T={t})": HandTracker.from_lit(lit2.eval(), t, bbox_scale,
                                                                                  channel_order="bgr"),
            f"Stage 2, recompute the window (T={t})": RecomputeTracker(lit2.net, t, bbox_scale=bbox_scale,
                                                                      mano=lit2.loss.mano, channel_order="bgr"),
        }
        track_times = tracker_latency(trackers, seq, frames, args.tracker_steps)

        # 3) data loading vs consumption
        loader_rates = {name: loader_samples_per_s(dm, args.loader_batches) for name, dm in dms.items()}

    ref_step = med_ms(step_times["Stage 1 (T=1)"])
    print(f"\n### Training step (batch {b}, {args.threads} torch thread(s), median of {args.repeats}, interleaved)\n")
    print("| configuration | step (ms) | samples/s | peak tensor memory (MB) | time vs Stage 1 | memory vs Stage 1 |")
    print("|---|---:|---:|---:|---:|---:|")
    ref_mem = peaks["Stage 1 (T=1)"]
    for name, ts in step_times.items():
        ms = med_ms(ts)
        print(f"| {name} | {ms:.0f} | {1000 * b / ms:.1f} | {peaks[name]:.0f} | {ms / ref_step:.2f}x | "
              f"{peaks[name] / ref_mem:.2f}x |")
    last, _, every = list(step_times)[1:]
    print(f"\nFK + loss on all {t} frames vs on the last frame: whole step {med_ms(step_times[every]) / med_ms(step_times[last]):.2f}x "
          f"time, {peaks[every] / peaks[last]:.2f}x peak memory. The FK + loss part alone (forward + backward on fixed "
          f"predictions, batch {b}):\n")
    print("| Stage 2 FK + loss on | ms | peak tensor memory (MB) | vs last frame |")
    print("|---|---:|---:|---:|")
    ref_loss = med_ms(loss_times["last frame"])
    for name, ts in loss_times.items():
        print(f"| {name} | {med_ms(ts):.1f} | {loss_peaks[name]:.1f} | {med_ms(ts) / ref_loss:.2f}x time, "
              f"{loss_peaks[name] / loss_peaks['last frame']:.2f}x memory |")

    print(f"\n### Streaming inference (one frame at a time, median of {args.tracker_steps} frames after the buffer filled)\n")
    print("| mode | ms / frame | vs Stage 1 tracker |")
    print("|---|---:|---:|")
    ref_track = med_ms(track_times["Stage 1 tracker (T=1)"])
    for name, ts in track_times.items():
        print(f"| {name} | {med_ms(ts):.1f} | {med_ms(ts) / ref_track:.2f}x |")

    print(f"\n### Data loading (training loader, augmentation on, 2 workers, batch {b}) vs a training step\n")
    print("| stage | loader samples/s | train step samples/s | loader / step |")
    print("|---|---:|---:|---:|")
    consumers = {"stage1": step_times["Stage 1 (T=1)"], "stage2": step_times[last]}
    for name, rate in loader_rates.items():
        step_rate = 1000 * b / med_ms(consumers[name])
        print(f"| {name} (T={1 if name == 'stage1' else t}) | {rate:.1f} | {step_rate:.1f} | {rate / step_rate:.2f}x |")
    print(f"\nPeak memory: torch.profiler CPU memory timeline (profile_memory=True), the largest total size of live "
          f"tensors during one step, all categories. Total bench time {time.perf_counter() - t_start:.0f} s.")


if __name__ == "__main__":
    main()

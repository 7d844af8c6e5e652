"""The GPU path, checked on one accelerator in one run: ``make gpu-check`` -> ``<out>/gpu_check.{json,md}``.

1. Stage 1 / Stage 2 paper recipes (DINOv2-L at 224, random weights): bf16-mixed training steps, median step
   time, images/s, peak memory, model FLOP utilisation against the chip's bf16 peak (FLOPs counted by
   ``torch.utils.flop_counter``), the same with ``torch.compile``, and whether the loss is finite and falls.
2. HandTracker per-frame latency at batch 1 (Stage 2 window of 7, one new frame per update) against Stage 1's.
3. Our Mamba block on the device against the float64 CPU reference (same weights), forward and backward; with
   ``mamba_ssm`` importable, its block with copied weights against ours, and both speeds.
4. The MambaTalk paper generator: training-step time (bf16 autocast) and generation real-time factor.
5. The hand datamodule's throughput (8-16 workers, 224 px, 7-frame windows) against the samples/s the Stage 2
   step consumes (target: at least 1.5x).

Without CUDA (or with ``--tiny``) every part runs at toy sizes (one transformer block, 28 px crops, short
clips), in float32, so the script itself is tested on a CPU; the report says ``"tiny": true`` and no number in it
means anything about a GPU. Nothing downloads: the weights are random, the hand data is generated into a
temporary folder. Run: ``python -m bench.gpu_check [--out DIR] [--tiny] [--steps N] [--no-compile]``. Not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment; MFU is reported against these.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}
TINY_HAND = ["model.net.backbone.depth=1", "model.net.backbone.img_size=28", "model.net.decoder.dim=32",
             "model.net.decoder.depth=1", "model.net.decoder.heads=2"]


def bf16_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call after ``warmup`` calls (device synchronised around each call)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


# ------------------------------------------------------------------------------------------------ hand pose
def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def hand_lit(stage: str, tiny: bool):
    from hydra.utils import instantiate

    cfg = compose([f"model=handpose_{stage}_dino_large", "data=hand_synthetic", "experiment_name=gpu_check",
                   "model.stage1_weight=null", *(TINY_HAND if tiny else [])])
    return instantiate(cfg.model)


def hand_data(root: Path, tiny: bool, num_frame: int, img_size: int, batch: int, workers: int):
    from handpose.data.datamodule import HandDataModule
    from handpose.data.synthetic import SyntheticConfig, generate_dataset

    if not (root / "splits.json").exists():
        cfg = SyntheticConfig(seed=0, num_seqs=7 if tiny else 28, image_size=256 if not tiny else 128,
                              min_frames=12 if tiny else 30, max_frames=12 if tiny else 30)
        generate_dataset(root, cfg, workers=min(workers, 8) if workers else 1)
    dm = HandDataModule(root=str(root), batch_size=batch, num_workers=workers, num_frame=num_frame,
                        img_size=img_size, generate_if_missing=False)
    dm.setup("fit")
    return dm


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_step_fn(lit, batch: dict, device: torch.device, bf16: bool) -> Callable[[], torch.Tensor]:
    """One optimisation step as HandPoseLit.training_step does it: ``step() -> loss``."""
    lit.to(device).train()
    params = [p for p in lit.parameters() if p.requires_grad]
    optimizer = lit.optimizer_factory(params=params)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, bf16):
            out = lit._loss(batch)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return out["loss"].detach()

    return step


def step_flops(lit, batch: dict, device: torch.device, bf16: bool) -> float:
    """FLOPs of one forward + backward (``torch.utils.flop_counter``; matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    lit.train()
    with FlopCounterMode(display=False) as counter:
        with autocast(device, bf16):
            out = lit._loss(batch)
        out["loss"].backward()
    lit.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def check_hand_recipe(stage: str, batch: dict, device: torch.device, tiny: bool, steps: int,
                      use_compile: bool) -> dict:
    bf16 = device.type == "cuda"
    lit = hand_lit(stage, tiny)
    batch = to_device(batch, device)
    lit.to(device)
    flops = step_flops(lit, batch, device, bf16)
    step = train_step_fn(lit, batch, device, bf16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses = [float(step()) for _ in range(2)]  # warm-up (cuDNN autotuning, allocator)
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(float(step()))
        sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    b, t = batch["img"].shape[:2]
    peak = bf16_peak(device)
    out = {
        "batch": b, "frames_per_sample": t, "precision": "bf16-mixed" if bf16 else "32-true",
        "step_ms_median": 1000 * med, "images_per_s": b * t / med, "samples_per_s": b / med,
        "flops_per_step": flops, "achieved_tflops": flops / med / 1e12,
        "mfu": flops / med / peak if peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "losses": losses, "loss_finite": all(math.isfinite(v) for v in losses),
        "loss_falls": statistics.mean(losses[-3:]) < statistics.mean(losses[:3]),
    }
    if use_compile:
        out["compile"] = compiled_step(stage, batch, device, tiny, steps)
    return out


def compiled_step(stage: str, batch: dict, device: torch.device, tiny: bool, steps: int) -> dict:
    """The same step with the network under ``torch.compile`` (compile time reported apart)."""
    try:
        bf16 = device.type == "cuda"
        lit = hand_lit(stage, tiny).to(device)
        lit.net = torch.compile(lit.net)
        step = train_step_fn(lit, batch, device, bf16)
        t0 = time.perf_counter()
        step()
        sync(device)
        compile_s = time.perf_counter() - t0
        times = timed(step, device, warmup=2, repeats=steps)
        return {"compile_s": compile_s, "step_ms_median": 1000 * statistics.median(times)}
    except Exception as err:  # noqa: BLE001 - a compiler failure is a finding, not the end of the check
        return {"error": f"{type(err).__name__}: {err}"}


def check_tracker(device: torch.device, tiny: bool, data_root: Path, updates: int) -> dict:
    """Per-frame latency of the streaming HandTracker (Stage 2, window 7) against Stage 1's (window 1)."""
    from bench.bench_handpose import med_ms, tracker_latency
    from handpose.data.dataset import read_frame
    from handpose.data.format import read_sequence, read_splits
    from handpose.tracker import HandTracker

    seq = read_sequence(data_root / read_splits(data_root)["test"][0])
    frames = [read_frame(seq.frame_path(f), seq.image_size) for f in range(len(seq))]
    stage1, stage2 = hand_lit("stage1", tiny).to(device), hand_lit("stage2", tiny).to(device)
    trackers = {"stage1": HandTracker.from_lit(stage1, 1, channel_order="bgr"),
                "stage2": HandTracker.from_lit(stage2, 7, channel_order="bgr")}
    with autocast(device, device.type == "cuda"):
        times = tracker_latency(trackers, seq, frames, updates, sync=lambda: sync(device))
    ms = {name: med_ms(v) for name, v in times.items()}
    return {"stage1_ms": ms["stage1"], "stage2_ms": ms["stage2"], "stage2_over_stage1": ms["stage2"] / ms["stage1"]}


def check_loader(dm, consumed_samples_per_s: float, batches: int) -> dict:
    from bench.bench_handpose import loader_samples_per_s

    rate = loader_samples_per_s(dm, batches)
    return {"workers": dm.num_workers, "samples_per_s": rate, "stage2_step_consumes": consumed_samples_per_s,
            "ratio": rate / consumed_samples_per_s, "target": 1.5}


# --------------------------------------------------------------------------------------------------- gesture
def check_mamba(device: torch.device, tiny: bool) -> dict:
    from gesture.models.mamba import MambaBlock

    torch.manual_seed(0)
    d, length, b = (32, 24, 2) if tiny else (256, 256, 8)
    ours = MambaBlock(d).to(device)
    ref = MambaBlock(d, scan_kernel=False).double()
    ref.load_state_dict({k: v.detach().cpu().double() for k, v in ours.state_dict().items()})
    x = torch.randn(b, length, d, dtype=torch.float64)
    w = torch.randn(b, length, d, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    y_ref = ref(xr)
    g_ref = torch.autograd.grad((y_ref * w).sum(), [xr, *ref.parameters()])
    xd = x.float().to(device).requires_grad_()
    y = ours(xd)
    g = torch.autograd.grad((y * w.float().to(device)).sum(), [xd, *ours.parameters()])

    def rel(a: torch.Tensor, r: torch.Tensor) -> float:
        return float((a.detach().cpu().double() - r).abs().max() / r.abs().max().clamp(min=1e-12))

    out: dict[str, Any] = {"ours_vs_float64": {"forward_rel": rel(y, y_ref),
                                               "backward_rel_max": max(rel(a, r) for a, r in zip(g, g_ref)),
                                               "tolerance_fp32": 1e-4}}
    out["ours_vs_float64"]["ok"] = max(out["ours_vs_float64"]["forward_rel"],
                                       out["ours_vs_float64"]["backward_rel_max"]) <= 1e-4
    xb = torch.randn(b, length, d, device=device, requires_grad=True)

    def fwd_bwd(m: torch.nn.Module) -> Callable[[], None]:
        return lambda: m(xb).sum().backward()

    out["ours_ms"] = 1000 * statistics.median(timed(fwd_bwd(ours), device, 2, 5))
    try:
        from mamba_ssm import Mamba
    except Exception as err:  # noqa: BLE001 - not installed / not built: reported
        out["mamba_ssm"] = {"available": False, "reason": f"{type(err).__name__}: {err}"}
        return out
    theirs = Mamba(d).to(device)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    res = {"available": True}
    for name, dtype, tol in (("fp32", torch.float32, 1e-5), ("bf16", torch.bfloat16, 1e-3)):
        with autocast(device, dtype == torch.bfloat16):
            a, c = theirs(xb), ours(xb)
        res[f"{name}_forward_rel"] = float((a.float() - c.float()).abs().max() / c.float().abs().max())
        res[f"{name}_tolerance"] = tol
    res["mamba_ssm_ms"] = 1000 * statistics.median(timed(fwd_bwd(theirs), device, 2, 5))
    out["mamba_ssm"] = res
    return out


def check_mambatalk(device: torch.device, tiny: bool, steps: int) -> dict:
    from hydra.utils import instantiate

    from gesture.generate import generate, seed_from_mean
    from gesture.layout import POSE_DIM, VQ_PARTS
    from gesture.models.generator import GestureModel
    from gesture.models.vqvae import VQVAE

    gen_cfg = compose(["model=mambatalk_paper", "data=gesture_synthetic", "experiment_name=gpu_check"])
    vq_cfg = compose(["model=vqvae_body", "data=gesture_synthetic", "experiment_name=gpu_check"])
    vq_kw = {k: v for k, v in vq_cfg.model.vqvae.items() if k not in ("_target_", "part")}
    factory = instantiate(gen_cfg.model.generator)
    extra = {"hidden": 32, "audio_f": 16, "motion_f": 16} if tiny else {}
    audio_dim, vocab = 3, 64
    generator = factory(num_speakers=5, vocab_size=vocab, audio_dim=audio_dim, code_dim=vq_kw["code_dim"],
                        n_codes=vq_kw["n_codes"], **extra)
    vqvaes = {p: VQVAE(p, **vq_kw) for p in VQ_PARTS}
    model = GestureModel(generator, vqvaes, edge_pad=gen_cfg.model.edge_pad).to(device)
    length = int(gen_cfg.model.pose_length)
    b = 2 if tiny else 64
    audio = torch.randn(b, length, audio_dim, device=device)
    words = torch.randint(0, vocab, (b, length), device=device)
    speaker = torch.zeros(b, dtype=torch.long, device=device)
    motion = torch.randn(b, length, POSE_DIM, device=device)
    mask = torch.zeros(b, length, POSE_DIM, dtype=torch.bool, device=device)
    mask[:, 4:] = True
    opt = torch.optim.AdamW(generator.parameters(), lr=1e-4)
    bf16 = device.type == "cuda"

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device, bf16):
            out = model(audio, words, speaker, motion, mask)
            loss = sum(v.float().pow(2).mean() for v in out.latents.values())
        loss.backward()
        opt.step()

    step_ms = 1000 * statistics.median(timed(train_step, device, 2, steps))
    seconds = 4.0 if tiny else 60.0
    n = int(seconds * 30)
    clip = dict(audio=torch.randn(1, n, audio_dim, device=device),
                words=torch.randint(0, vocab, (1, n), device=device))
    model.eval()

    def gen() -> None:
        with torch.inference_mode(), autocast(device, bf16):
            generate(model, clip["audio"], clip["words"], torch.tensor([1], device=device),
                     seed_from_mean(1, 4, device=device), n)

    gen_s = statistics.median(timed(gen, device, 1, 3))
    return {"batch": b, "window": length, "train_step_ms": step_ms, "clip_seconds": seconds,
            "generation_s": gen_s, "real_time_factor": seconds / gen_s}


# ---------------------------------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    lines = [f"# GPU check ({report['device']}{', TINY sizes: not GPU numbers' if report['tiny'] else ''})", ""]
    for stage in ("stage1", "stage2"):
        r = report["parts"].get(f"{stage}_recipe", {})
        if "error" in r:
            lines.append(f"- {stage} recipe: ERROR {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "n/a"
        mem = f"{r['peak_memory_gb']:.1f} GB" if r.get("peak_memory_gb") is not None else "n/a"
        comp = r.get("compile", {})
        comp_txt = (f"; compiled {comp['step_ms_median']:.1f} ms (compile {comp['compile_s']:.0f} s)"
                    if "step_ms_median" in comp else (f"; compile: {comp['error']}" if comp else ""))
        lines.append(f"- {stage} recipe ({r['precision']}, batch {r['batch']} x {r['frames_per_sample']} frames): "
                     f"{r['step_ms_median']:.1f} ms/step, {r['images_per_s']:.0f} images/s, MFU {mfu}, peak {mem}, "
                     f"loss finite {r['loss_finite']}, falls {r['loss_falls']}{comp_txt}")
    for key, fmt in (("tracker", "- tracker per frame: Stage 1 {stage1_ms:.2f} ms, Stage 2 {stage2_ms:.2f} ms "
                                 "({stage2_over_stage1:.2f}x)"),
                     ("loader", "- loader ({workers} workers): {samples_per_s:.0f} samples/s vs {stage2_step_consumes:.0f} "
                                "consumed by the Stage 2 step ({ratio:.2f}x, target 1.5x)"),
                     ("mambatalk", "- MambaTalk paper generator: train step {train_step_ms:.1f} ms (batch {batch} x "
                                   "{window}), generation RTF {real_time_factor:.1f}")):
        r = report["parts"].get(key, {})
        lines.append(f"- {key}: ERROR {r['error']}" if "error" in r else fmt.format(**r))
    m = report["parts"].get("mamba", {})
    if "error" in m:
        lines.append(f"- mamba: ERROR {m['error']}")
    else:
        o = m["ours_vs_float64"]
        lines.append(f"- Mamba block vs float64 CPU reference: forward {o['forward_rel']:.1e}, backward "
                     f"{o['backward_rel_max']:.1e} (tolerance {o['tolerance_fp32']:.0e}, ok {o['ok']}); "
                     f"{m['ours_ms']:.2f} ms fwd+bwd")
        s = m["mamba_ssm"]
        if s["available"]:
            lines.append(f"- mamba_ssm with our weights: forward rel. difference fp32 {s['fp32_forward_rel']:.1e} "
                         f"(tolerance 1e-5), bf16 {s['bf16_forward_rel']:.1e} (1e-3); {s['mamba_ssm_ms']:.2f} ms "
                         f"fwd+bwd vs ours {m['ours_ms']:.2f} ms")
        else:
            lines.append(f"- mamba_ssm: not available ({s['reason']})")
    lines.append(f"\ntotal {report['seconds']:.0f} s")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_check")
    p.add_argument("--tiny", action="store_true", help="toy sizes (forced without CUDA)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per recipe")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: min(16, cores))")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type != "cuda"
    workers = args.workers if args.workers is not None else (1 if tiny else min(16, os.cpu_count() or 1))
    t_start = time.perf_counter()
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "tiny": tiny, "torch": torch.__version__, "parts": {}}
    parts = report["parts"]

    def part(name: str, fn: Callable[[], dict]) -> None:
        t0 = time.perf_counter()
        try:
            parts[name] = fn()
        except Exception as err:  # noqa: BLE001 - one broken part must not hide the others
            parts[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
        parts[name]["seconds"] = time.perf_counter() - t0
        print(f"[gpu_check] {name}: {time.perf_counter() - t0:.1f} s", flush=True)

    img = 28 if tiny else 224
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "hands"
        dm1 = hand_data(root, tiny, 1, img, 2 if tiny else 64, 0)
        dm2 = replace_dm(dm1, num_frame=7, batch=2 if tiny else 32, workers=workers)
        batch1 = next(iter(dm1.train_dataloader()))
        batch2 = next(iter(torch.utils.data.DataLoader(dm2.datasets["train"], batch_size=dm2.batch_size,
                                                       collate_fn=dm2.collate_fn)))
        use_compile = not args.no_compile and not tiny
        part("stage1_recipe", lambda: check_hand_recipe("stage1", batch1, device, tiny, args.steps, use_compile))
        part("stage2_recipe", lambda: check_hand_recipe("stage2", batch2, device, tiny, args.steps, use_compile))
        part("tracker", lambda: check_tracker(device, tiny, root, 5 if tiny else 30))
        consumed = parts["stage2_recipe"].get("samples_per_s") or 1.0
        part("loader", lambda: check_loader(dm2, consumed, 3 if tiny else 40))
    part("mamba", lambda: check_mamba(device, tiny))
    part("mambatalk", lambda: check_mambatalk(device, tiny, 3 if tiny else args.steps))
    report["seconds"] = time.perf_counter() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=float))
    text = markdown(report)
    (args.out / "gpu_check.md").write_text(text)
    print(text)
    return report


def replace_dm(dm, num_frame: int, batch: int, workers: int):
    """A datamodule like ``dm`` with other window length, batch size and workers (same data folder)."""
    from handpose.data.datamodule import HandDataModule

    new = HandDataModule(root=str(dm.root), batch_size=batch, num_workers=workers, num_frame=num_frame,
                         img_size=dm.img_size, generate_if_missing=False)
    new.setup("fit")
    return new


if __name__ == "__main__":
    main()

"""Forward+backward time of our MambaBlock (C scan kernel, and the chunked PyTorch scan), mambapy's block and a
same-width transformer layer.

All three are timed side by side in one run (interleaved repeats, median), so ratios hold on a busy machine.
Run: ``python -m bench.bench_mamba [--batch 32 --length 64 --repeats 15 --threads N]``. Not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from bench.timing import interleaved
from gesture.models import scan_kernel
from gesture.models.mamba import MambaBlock


def _fwd_bwd(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        module.zero_grad(set_to_none=True)
        module(x).sum().backward()

    return run


def _candidates(d_model: int, d_state: int, expand: int) -> dict[str, nn.Module]:
    from mambapy.mamba import MambaBlock as MambapyBlock
    from mambapy.mamba import MambaConfig

    ours = MambaBlock(d_model, d_state=d_state, expand=expand)
    ours_torch = MambaBlock(d_model, d_state=d_state, expand=expand, scan_kernel=False)
    ours_torch.load_state_dict(ours.state_dict())
    mambapy = MambapyBlock(MambaConfig(d_model=d_model, n_layers=1, d_state=d_state, expand_factor=expand))
    mambapy.load_state_dict(ours.state_dict())  # same parameter names: same work on the same weights
    transformer = nn.TransformerEncoderLayer(d_model, 4, 4 * d_model, batch_first=True)
    return {"MambaBlock (ours, C scan kernel)": ours, "MambaBlock (ours, PyTorch scan)": ours_torch,
            "mambapy MambaBlock": mambapy,
            "nn.TransformerEncoderLayer": transformer}


def bench(batch: int = 32, length: int = 64, d_model: int = 256, d_state: int = 16, expand: int = 2,
          warmup: int = 3, repeats: int = 15, seed: int = 0, clock: str = "wall") -> dict[str, list[float]]:
    """Seconds per forward+backward of each candidate on ``x [batch, length, d_model]``, repeats interleaved.

    ``clock="cpu"`` times process CPU time instead of wall time: with one thread it ignores time spent waiting
    for the CPU on a shared machine (with more threads it also counts their spinning, so prefer wall).
    """
    timer = {"wall": time.perf_counter, "cpu": time.process_time}[clock]
    torch.manual_seed(seed)
    modules = _candidates(d_model, d_state, expand)
    x = torch.randn(batch, length, d_model, requires_grad=True)
    runs = {name: _fwd_bwd(m, x) for name, m in modules.items()}
    return interleaved(runs, repeats, warmup, timer)


def markdown_table(times: dict[str, list[float]], reference: str = "mambapy MambaBlock") -> str:
    ref = statistics.median(times[reference])
    lines = ["| module | median fwd+bwd (ms) | min (ms) | speed-up vs mambapy |", "|---|---:|---:|---:|"]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {name} | {med * 1e3:.1f} | {min(ts) * 1e3:.1f} | {ref / med:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--expand", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    times = bench(args.batch, args.length, args.d_model, args.d_state, args.expand, args.warmup, args.repeats,
                  clock=args.clock)
    load = os.getloadavg()[0]
    print(f"CPU forward+backward, x [{args.batch}, {args.length}, {args.d_model}], d_state {args.d_state}, "
          f"expand {args.expand}, {args.threads} threads, {args.clock} clock, torch {torch.__version__}, "
          f"median of {args.repeats} interleaved repeats, load average {load:.1f} on {os.cpu_count()} CPUs, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, C scan kernel "
          f"{'built' if scan_kernel.load() is not None else 'unavailable (both rows use the PyTorch scan)'}\n")
    print(markdown_table(times))


if __name__ == "__main__":
    main()

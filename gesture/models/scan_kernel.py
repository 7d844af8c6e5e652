"""The CPU selective scan in C (``_scan_kernel.c``), compiled with the machine's C compiler at first use.

The Mamba block's CPU step is dominated by the selective scan. The chunked PyTorch scan in ``mamba.py`` runs
one ATen op per step and state block; this kernel keeps each (batch row, block of channels) state in registers
for the whole sequence, forward and backward (states recomputed, as mamba_ssm does). It is plain C (no torch
headers, so it builds in about a second), loaded with ``ctypes`` (the call releases the GIL) and spread over
``torch.get_num_threads()`` Python threads.

fp32 on CPU only; anything else, or a machine without a working compiler, uses the PyTorch scan (logged once).
``GESTURE_SCAN_KERNEL=0`` turns the kernel off; ``GESTURE_KERNEL_CACHE`` sets where the built library is kept
(default ``~/.cache/handgesture``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_scan_kernel.c")
_BASE_FLAGS = ["-O3", "-std=c11", "-fopenmp-simd", "-fno-trapping-math", "-fPIC", "-shared"]
_ptr = ctypes.c_void_p
_int = ctypes.c_int


def _cpu_signature() -> str:
    """What the built code depends on besides the source: architecture and, on Linux, the CPU feature flags."""
    sig = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return sig + line
    except OSError:
        pass
    return sig + platform.processor()


def _cache_dir() -> Path:
    return Path(os.environ.get("GESTURE_KERNEL_CACHE", Path.home() / ".cache" / "handgesture"))


def _compile(cc: str, flags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)  # atomic: concurrent processes (DDP ranks, test workers) never see half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, built on first use; ``None`` (logged once) when it cannot be built."""
    if os.environ.get("GESTURE_SCAN_KERNEL", "1") == "0":
        log.info("selective scan: C kernel off (GESTURE_SCAN_KERNEL=0); using the PyTorch scan")
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.warning("selective scan: no C compiler found; using the PyTorch scan (slower on CPU)")
        return None
    source = SOURCE.read_bytes()
    errors = []
    for flags in (_BASE_FLAGS + ["-march=native"], _BASE_FLAGS):
        key = hashlib.sha256(source + " ".join([cc, *flags, _cpu_signature()]).encode()).hexdigest()[:16]
        target = _cache_dir() / f"scan_kernel_{key}.so"
        try:
            if not target.exists():
                _compile(cc, flags, target)
            lib = ctypes.CDLL(str(target))
            break
        except (OSError, subprocess.SubprocessError) as err:
            detail = getattr(err, "stderr", "") or str(err)
            errors.append(f"{' '.join(flags)}: {detail.strip()[-500:]}")
    else:
        log.warning("selective scan: could not build %s; using the PyTorch scan (slower on CPU):\n%s", SOURCE,
                    "\n".join(errors))
        return None
    lib.scan_block_size.restype = _int
    lib.scan_fwd.argtypes = [_ptr] * 8 + [_int] * 6
    lib.scan_fwd.restype = None
    lib.scan_bwd.argtypes = [_ptr] * 14 + [_int] * 6
    lib.scan_bwd.restype = None
    log.info("selective scan: C kernel %s", target)
    return lib


def applies(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernel serves these scan inputs: all fp32 on CPU, and the kernel builds."""
    ok = all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors)
    return ok and load() is not None


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scan")


def _run(fn, n_items: int, args: tuple) -> None:
    """``fn(*args, item0, item1)`` over ``[0, n_items)``, split across up to ``torch.get_num_threads()`` threads."""
    workers = max(1, min(torch.get_num_threads(), n_items))
    if workers == 1:
        fn(*args, 0, n_items)
        return
    bounds = [n_items * i // workers for i in range(workers + 1)]
    futures = [_pool(workers).submit(fn, *args, bounds[i], bounds[i + 1]) for i in range(workers)]
    for f in futures:
        f.result()


def _p(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _blocks(d: int) -> int:
    db = load().scan_block_size()
    return (d + db - 1) // db


def forward(u, dt, At, B, C, h0):
    """``u, dt [b, L, d]; At [n, d]; B, C [b, L, n]; h0 [b, n, d] | None`` (contiguous fp32 CPU)
    -> ``y [b, L, d], h_last [b, n, d]``."""
    b, length, d = u.shape
    n = At.shape[0]
    y, h_last = u.new_empty(b, length, d), u.new_empty(b, n, d)
    _run(load().scan_fwd, b * _blocks(d), (_p(u), _p(dt), _p(At), _p(B), _p(C), _p(h0), _p(y), _p(h_last),
                                           b, length, d, n))
    return y, h_last


def backward(u, dt, At, B, C, h0, gy, gh_last, need_gh0: bool):
    """Gradients of :func:`forward` given ``gy [b, L, d]`` and ``gh_last [b, n, d] | None``
    -> ``gu, gdt [b, L, d]; gAt [n, d]; gB, gC [b, L, n]; gh0 [b, n, d] | None``."""
    b, length, d = u.shape
    n = At.shape[0]
    nblk = _blocks(d)
    gu, gdt = u.new_empty(b, length, d), u.new_empty(b, length, d)
    gB_part, gC_part = u.new_empty(nblk, b, length, n), u.new_empty(nblk, b, length, n)
    gA_part = u.new_empty(b, n, d)
    gh0 = u.new_empty(b, n, d) if need_gh0 else None
    _run(load().scan_bwd, b * nblk, (_p(u), _p(dt), _p(At), _p(B), _p(C), _p(h0), _p(gy), _p(gh_last), _p(gu),
                                      _p(gdt), _p(gB_part), _p(gC_part), _p(gA_part), _p(gh0), b, length, d, n))
    return gu, gdt, gA_part.sum(0), gB_part.sum(0), gC_part.sum(0), gh0

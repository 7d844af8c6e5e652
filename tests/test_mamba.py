"""Mamba block: the fast scan against the sequential reference, the block against mambapy, recurrent and
streaming use against the full sequence, and (on a GPU with mamba_ssm) against mamba_ssm.Mamba."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
import torch.nn.functional as F

from common.shapes import ShapeError
from gesture.models import mamba as mamba_module
from gesture.models import scan_kernel
from gesture.models.mamba import MambaBlock, make_mamba, selective_scan, selective_scan_ref

SCAN_INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _scan_inputs(b=2, d=6, length=11, n=4, dtype=torch.float64, seed=0, delta_scale=1.0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    inputs = {
        "u": randn(b, d, length),
        "delta": randn(b, d, length) * delta_scale - 1.0,
        "A": -torch.exp(randn(d, n)),
        "B": randn(b, n, length),
        "C": randn(b, n, length),
        "D": randn(d),
        "z": randn(b, d, length),
        "delta_bias": randn(d) * 0.5,
        "initial_state": randn(b, d, n),
    }
    return {k: v.to(dtype).requires_grad_() for k, v in inputs.items()}


def _run(fn, inputs, **kw):
    y, last = fn(**inputs, delta_softplus=True, return_last_state=True, **kw)
    # A loss that weights every output element differently, through both outputs.
    g = torch.Generator().manual_seed(1)
    wy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    ws = torch.randn(last.shape, generator=g, dtype=torch.float64).to(last.dtype)
    grads = torch.autograd.grad((y * wy).sum() + (last * ws).sum(), [inputs[k] for k in SCAN_INPUTS])
    return y, last, dict(zip(SCAN_INPUTS, grads))


def _assert_scan_close(fast, ref, atol, rtol):
    torch.testing.assert_close(fast[0], ref[0], atol=atol, rtol=rtol, msg=lambda m: f"y: {m}")
    torch.testing.assert_close(fast[1], ref[1], atol=atol, rtol=rtol, msg=lambda m: f"last_state: {m}")
    for k in SCAN_INPUTS:
        torch.testing.assert_close(fast[2][k], ref[2][k], atol=atol, rtol=rtol,
                                   msg=lambda m, k=k: f"grad {k}: {m}")


needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="no C compiler: the scan kernel cannot be built here")
BACKENDS = [pytest.param(False, id="torch"), pytest.param(True, id="kernel", marks=needs_compiler)]


@pytest.mark.parametrize("kernel", BACKENDS)
@pytest.mark.parametrize(("length", "chunk"), [(13, 4), (16, 4), (1, 8), (1, 1), (7, 1), (9, 32), (20, None)])
def test_fast_scan_matches_sequential_reference_float32(length, chunk, kernel):
    inputs = _scan_inputs(length=length, dtype=torch.float32)
    fast = _run(selective_scan, inputs, chunk=chunk, kernel=kernel)
    ref = _run(selective_scan_ref, inputs)
    assert fast[0].dtype == torch.float32
    _assert_scan_close(fast, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("length", "chunk"), [(13, 4), (1, 3), (10, 10)])
def test_fast_scan_matches_sequential_reference_float64(length, chunk):
    inputs = _scan_inputs(length=length, dtype=torch.float64)
    _assert_scan_close(_run(selective_scan, inputs, chunk=chunk), _run(selective_scan_ref, inputs),
                       atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kernel", BACKENDS)
def test_fast_scan_is_stable_for_very_strong_decay(kernel):
    # delta * A down to about -1e3: exp underflows to 0, which must not turn into inf or nan anywhere.
    inputs = _scan_inputs(length=12, dtype=torch.float32, delta_scale=60.0)
    fast = _run(selective_scan, inputs, chunk=5, kernel=kernel)
    ref = _run(selective_scan_ref, {k: v.detach().double().requires_grad_() for k, v in inputs.items()})
    assert all(torch.isfinite(t).all() for t in (fast[0], fast[1], *fast[2].values()))
    ref32 = (ref[0].float(), ref[1].float(), {k: v.float() for k, v in ref[2].items()})
    _assert_scan_close(fast, ref32, atol=1e-4, rtol=1e-4)


def test_fast_scan_without_optional_inputs_matches_reference():
    required = ("u", "delta", "A", "B", "C")
    inputs = {k: v for k, v in _scan_inputs(dtype=torch.float64).items() if k in required}
    y_fast = selective_scan(**inputs, chunk=3)
    y_ref = selective_scan_ref(**inputs)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-12, rtol=1e-12)


@needs_compiler
@pytest.mark.parametrize(("b", "d", "n", "length"), [(1, 1, 1, 1), (3, 33, 16, 40), (2, 64, 5, 3), (5, 95, 8, 70)])
def test_scan_kernel_matches_the_float64_reference_across_block_edges(b, d, n, length):
    # Channel counts around the kernel's block of 32, one and several threads, no initial state and no
    # gradient into the last state (the None paths of the kernel).
    inputs = {k: v for k, v in _scan_inputs(b=b, d=d, n=n, length=length, dtype=torch.float32, seed=3).items()
              if k != "initial_state"}
    ref_inputs = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    y_ref = selective_scan_ref(**ref_inputs, delta_softplus=True)
    w = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads_ref = torch.autograd.grad((y_ref * w).sum(), list(ref_inputs.values()))
    threads_before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = selective_scan(**inputs, delta_softplus=True, kernel=True)
            grads = torch.autograd.grad((y * w.float()).sum(), list(inputs.values()))
            torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)
            for k, g, g_ref in zip(inputs, grads, grads_ref):
                torch.testing.assert_close(g.double(), g_ref, atol=1e-5, rtol=1e-5,
                                           msg=lambda m, k=k: f"grad {k}: {m}")
    finally:
        torch.set_num_threads(threads_before)


def test_scan_kernel_off_or_unbuildable_falls_back_to_pytorch_with_one_warning(monkeypatch, tmp_path, caplog):
    inputs = _scan_inputs(dtype=torch.float32)
    ref = _run(selective_scan, inputs, kernel=False)
    monkeypatch.setenv("GESTURE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")  # a compiler that always fails
    scan_kernel.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=scan_kernel.__name__):
            assert scan_kernel.load() is None and scan_kernel.load() is None
            fallback = _run(selective_scan, inputs)
        assert sum("could not build" in r.getMessage() for r in caplog.records) == 1
        _assert_scan_close(fallback, ref, atol=0, rtol=0)  # the PyTorch scan itself
        with pytest.raises(RuntimeError, match="C kernel"):
            selective_scan(**inputs, kernel=True)
        monkeypatch.setenv("GESTURE_SCAN_KERNEL", "0")
        scan_kernel.load.cache_clear()
        assert scan_kernel.load() is None
        assert not list(tmp_path.glob("*.so"))
    finally:
        scan_kernel.load.cache_clear()


def test_scan_kernel_is_not_used_for_float64():
    assert not scan_kernel.applies(torch.zeros(2, dtype=torch.float64))


def test_scan_rejects_mismatched_shapes_by_name():
    inputs = _scan_inputs()
    inputs["B"] = inputs["B"][:, :, :-1]
    with pytest.raises(ShapeError, match="B"):
        selective_scan(**inputs)


@pytest.mark.parametrize("kernel", BACKENDS)
def test_scan_does_not_write_into_its_inputs(kernel):
    inputs = _scan_inputs(dtype=torch.float32)
    before = {k: v.detach().clone() for k, v in inputs.items()}
    _run(selective_scan, inputs, chunk=4, kernel=kernel)
    for k, v in inputs.items():
        assert torch.equal(v.detach(), before[k]), k


STATE_DICT_SHAPES = {  # d_model 16, d_state 8, d_conv 4, expand 2 -> d_inner 32, dt_rank 1
    "in_proj.weight": (64, 16),
    "conv1d.weight": (32, 1, 4),
    "conv1d.bias": (32,),
    "x_proj.weight": (17, 32),
    "dt_proj.weight": (32, 1),
    "dt_proj.bias": (32,),
    "A_log": (32, 8),
    "D": (32,),
    "out_proj.weight": (16, 32),
}


def test_state_dict_names_shapes_and_init_match_mamba_ssm():
    block = MambaBlock(16, d_state=8, dt_min=0.001, dt_max=0.1)
    sd = block.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == STATE_DICT_SHAPES
    torch.testing.assert_close(sd["A_log"], torch.log(torch.arange(1.0, 9.0)).expand(32, 8))
    torch.testing.assert_close(sd["D"], torch.ones(32))
    dt = F.softplus(sd["dt_proj.bias"])
    assert dt.min() >= 0.001 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)


def _block_pair(seed=0, **kw):
    from mambapy.mamba import MambaBlock as MambapyBlock
    from mambapy.mamba import MambaConfig

    torch.manual_seed(seed)
    ours = MambaBlock(16, d_state=8, d_conv=4, expand=2, **kw)
    with torch.no_grad():  # move A and D away from their init so that a swapped role would show
        ours.A_log.add_(torch.randn_like(ours.A_log) * 0.3)
        ours.D.add_(torch.randn_like(ours.D) * 0.3)
    theirs = MambapyBlock(MambaConfig(d_model=16, n_layers=1, d_state=8, expand_factor=2, d_conv=4))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize("chunk", [None, 3])
def test_block_matches_mambapy_with_copied_weights(chunk):
    ours, theirs = _block_pair(chunk=chunk)
    x = torch.randn(3, 13, 16, requires_grad=True)
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(y_ours)
    gx_ours, *gp_ours = torch.autograd.grad((y_ours * w).sum(), [x, *ours.parameters()])
    gx_theirs, *gp_theirs = torch.autograd.grad((y_theirs * w).sum(), [x, *theirs.parameters()])
    torch.testing.assert_close(gx_ours, gx_theirs, atol=1e-5, rtol=1e-5)
    for (name, _), g_o, g_t in zip(ours.named_parameters(), gp_ours, gp_theirs):
        torch.testing.assert_close(g_o, g_t, atol=1e-4, rtol=1e-4,
                                   msg=lambda m, name=name: f"grad {name}: {m}")


def test_step_matches_full_sequence_and_mambapy_step():
    ours, theirs = _block_pair()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        y_full, state_full = ours(x, return_state=True)
        state = ours.allocate_state(2)
        cache = (None, torch.zeros(2, 32, 3))  # mambapy's (h, last d_conv - 1 inputs)
        for t in range(x.shape[1]):
            y_t, state = ours.step(x[:, t], state)
            y_t_theirs, cache = theirs.step(x[:, t], cache)
            torch.testing.assert_close(y_t, y_full[:, t], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(y_t, y_t_theirs, atol=1e-5, rtol=1e-5)
    for s_step, s_full, name in zip(state, state_full, ("conv_state", "ssm_state")):
        torch.testing.assert_close(s_step, s_full, atol=1e-5, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_step_does_not_modify_the_given_state():
    block = MambaBlock(16, d_state=8)
    state = tuple(torch.randn_like(s) for s in block.allocate_state(2))
    before = tuple(s.clone() for s in state)
    block.step(torch.randn(2, 16), state)
    assert all(torch.equal(a, b) for a, b in zip(state, before))


@pytest.mark.parametrize("splits", [(5, 8), (1, 2, 10), (2, 1, 1, 9)])
def test_forward_with_carried_state_matches_full_sequence(splits):
    ours, _ = _block_pair(chunk=4)
    x = torch.randn(2, sum(splits), 16, requires_grad=True)
    y_full, state_full = ours(x, return_state=True)
    ys, state = [], None
    for part in x.split(list(splits), dim=1):
        y_part, state = ours(part, state=state, return_state=True)
        ys.append(y_part)
    y_windows = torch.cat(ys, dim=1)
    torch.testing.assert_close(y_windows, y_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state[0], state_full[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state[1], state_full[1], atol=1e-5, rtol=1e-5)
    # Gradients flow through the carried state exactly as through the full sequence.
    w = torch.randn_like(y_full)
    g_full = torch.autograd.grad((y_full * w).sum(), [x, *ours.parameters()])
    g_windows = torch.autograd.grad((y_windows * w).sum(), [x, *ours.parameters()])
    for a, b in zip(g_windows, g_full):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_forward_rejects_a_state_of_the_wrong_batch():
    block = MambaBlock(16, d_state=8)
    with pytest.raises(ShapeError, match="conv_state"):
        block(torch.randn(3, 4, 16), state=block.allocate_state(2))


def test_make_mamba_without_cuda_kernel_is_the_pure_block_and_logs_it_once(caplog, monkeypatch):
    monkeypatch.setattr(mamba_module, "_logged_paths", set())
    with caplog.at_level(logging.INFO, logger="gesture.models.mamba"):
        first = make_mamba(16, d_state=8, prefer_cuda_kernel=False)
        make_mamba(16, d_state=8, prefer_cuda_kernel=False)
    assert isinstance(first, MambaBlock) and first.d_state == 8
    assert sum("pure-PyTorch block" in r.getMessage() for r in caplog.records) == 1


def _mamba_ssm_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import mamba_ssm  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _mamba_ssm_available(), reason="needs CUDA and mamba_ssm")
def test_block_matches_mamba_ssm_with_the_same_state_dict():
    from mamba_ssm import Mamba

    torch.manual_seed(0)
    ref = Mamba(64, d_state=16, d_conv=4, expand=2).cuda()
    ours = MambaBlock(64).cuda()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 37, 64, device="cuda", requires_grad=True)
    y_ref, y_ours = ref(x), ours(x)
    torch.testing.assert_close(y_ours, y_ref, atol=1e-4, rtol=1e-3)
    w = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad((y_ref * w).sum(), [x, *ref.parameters()])
    g_ours = torch.autograd.grad((y_ours * w).sum(), [x, *ours.parameters()])
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    # make_mamba gives mamba_ssm's module with the same keys and MambaBlock's state API on top.
    fast = make_mamba(64).cuda()
    assert isinstance(fast, Mamba)
    fast.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        y_plain = fast(x)
        y_a, state = fast(x[:, :20], return_state=True)
        y_b, _ = fast(x[:, 20:], state=state, return_state=True)
        y_t, _ = fast.step(x[:, 20], state)
    torch.testing.assert_close(torch.cat([y_a, y_b], dim=1), y_plain, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(y_t, y_plain[:, 20], atol=1e-4, rtol=1e-3)

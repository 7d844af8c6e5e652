"""Mamba-1 block for the gesture generator: mamba_ssm's CUDA kernels when they import, else pure PyTorch.

Both paths share parameter names and shapes (``in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj``), so
a checkpoint moves between them unchanged. Without mamba_ssm the selective scan is, for fp32 on CPU, a small C
kernel compiled on the machine at first use (``scan_kernel``), else a chunked PyTorch scan with a hand-written
backward; both carry state, for streaming generation. No norm or residual: the caller adds them.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from common.shapes import expect_shape
from gesture.models import scan_kernel

log = logging.getLogger(__name__)

_LOG2E = 1.4426950408889634
# Elements per chunk workspace buffer ([chunk, b, n, d]) when ``chunk=None``: about 4 MB of fp32 keeps the
# scan's working set in cache on CPU; on GPU a larger chunk only saves kernel launches.
_AUTO_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}

# (conv_state [b, d_inner, d_conv]: the last d_conv conv inputs, ssm_state [b, d_inner, d_state])
MambaState = tuple[torch.Tensor, torch.Tensor]


# ------------------------------------------------------------------------------------------------------------
# Selective scan
#   h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t          (per channel d and state n)
#   y_t = <h_t, C_t> + D * u_t,  then  y_t * silu(z_t)
# ------------------------------------------------------------------------------------------------------------


def _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state) -> tuple[int, int, int, int]:
    """Validate shapes of the selective-scan arguments and return ``(b, d, l, n)``."""
    expect_shape(u, (None, None, None), "u")
    b, d, length = u.shape
    if length < 1:
        raise ValueError(f"selective scan: sequence length must be >= 1, got u {tuple(u.shape)}")
    expect_shape(delta, (b, d, length), "delta")
    expect_shape(A, (d, None), "A")
    n = A.shape[1]
    expect_shape(B, (b, n, length), "B")
    expect_shape(C, (b, n, length), "C")
    if D is not None:
        expect_shape(D, (d,), "D")
    if z is not None:
        expect_shape(z, (b, d, length), "z")
    if delta_bias is not None:
        expect_shape(delta_bias, (d,), "delta_bias")
    if initial_state is not None:
        expect_shape(initial_state, (b, d, n), "initial_state")
    return b, d, length, n


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precision is promoted, as in mamba_ssm)."""
    is_f64 = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if is_f64 else torch.float32


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None, return_last_state=False):
    """Sequential reference scan (one step per time index), for tests; the contract of :func:`selective_scan`.

    u, delta [b, d, l]; A [d, n]; B, C [b, n, l]; D [d] | None; z [b, d, l] | None; delta_bias [d] | None;
    initial_state [b, d, n] | None -> y [b, d, l] (dtype of u), and last_state [b, d, n] if
    ``return_last_state``.
    Computes in float64 when any input is float64, else float32.
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    ct = _compute_dtype(u, delta, A, B, C, D, z, initial_state)
    u_c, delta_c, A_c, B_c, C_c = u.to(ct), delta.to(ct), A.to(ct), B.to(ct), C.to(ct)
    if delta_bias is not None:
        delta_c = delta_c + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta_c = F.softplus(delta_c)
    h = u_c.new_zeros(u.shape[0], u.shape[1], A.shape[1]) if initial_state is None else initial_state.to(ct)
    ys = []
    for t in range(u.shape[2]):
        decay = torch.exp(delta_c[:, :, t, None] * A_c)  # [b, d, n]
        h = decay * h + (delta_c[:, :, t] * u_c[:, :, t])[:, :, None] * B_c[:, None, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C_c[:, :, t]))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u_c * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(u.dtype)
    return (y, h) if return_last_state else y


def _auto_chunk(b: int, d: int, n: int, length: int, device: torch.device) -> int:
    budget = _AUTO_CHUNK_ELEMENTS["cuda" if device.type == "cuda" else "cpu"]
    return max(1, min(length, budget // (b * d * n)))


def _chunk_states(h, dt, du, A2t, Bt, s, e, decay, states):
    """Fill ``decay``/``states`` [e-s, b, n, d]: exp(delta*A) and the states of steps s..e-1 from ``h``."""
    torch.mul(dt[s:e, :, None, :], A2t, out=decay)
    decay.exp2_()  # exp2 with A pre-scaled by log2(e): half the cost of exp on CPU
    torch.mul(du[s:e, :, None, :], Bt[s:e, :, :, None], out=states)  # delta*u*B, overwritten by the states
    for i in range(e - s):
        h = states[i].addcmul_(decay[i], h)
    return h


class _SelectiveScanFn(torch.autograd.Function):
    """Core scan without D, z, softplus, channel-last: u, delta [b, l, d], A [d, n], B, C [b, l, n],
    h0 [b, d, n] | None -> y [b, l, d], last state [b, d, n].

    With ``kernel`` the C kernel runs it (``scan_kernel``). Otherwise it works time-major ``[l, b, n, d]`` in
    chunks of ``chunk`` steps with preallocated workspaces. The forward
    saves only the states at chunk boundaries; the backward recomputes each chunk's states (as mamba_ssm does)
    and runs the reverse recurrence ``G_t = C_t gy_t + exp(delta_{t+1} A) G_{t+1}`` for dL/dh_t.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0, chunk, kernel):
        ctx.kernel = kernel
        if ctx.kernel:  # the C kernel: same recurrence, one pass per (batch row, channel block)
            args = (u.contiguous(), delta.contiguous(), A.t().contiguous(), B.contiguous(), C.contiguous(),
                    None if h0 is None else h0.transpose(1, 2).contiguous())
            y, h_last = scan_kernel.forward(*args)
            ctx.save_for_backward(*args)
            ctx.set_materialize_grads(False)
            return y, h_last.transpose(1, 2).contiguous()
        b, length, d = u.shape
        n = A.shape[1]
        dt = delta.transpose(0, 1).contiguous()  # [l, b, d]
        ut = u.transpose(0, 1).contiguous()
        du = dt * ut
        Bt = B.transpose(0, 1).contiguous()  # [l, b, n]
        Ct = C.transpose(0, 1).contiguous()
        At = A.t().contiguous()  # [n, d]
        A2t = At * _LOG2E
        n_chunks = math.ceil(length / chunk)
        c = min(chunk, length)
        decay, states = u.new_empty(c, b, n, d), u.new_empty(c, b, n, d)
        bounds = u.new_empty(n_chunks + 1, b, n, d)  # bounds[k]: state before chunk k; bounds[-1]: last state
        if h0 is None:
            bounds[0].zero_()
        else:
            bounds[0].copy_(h0.transpose(1, 2))
        y = u.new_empty(length, b, 1, d)
        for k in range(n_chunks):
            s, e = k * chunk, min((k + 1) * chunk, length)
            h = _chunk_states(bounds[k], dt, du, A2t, Bt, s, e, decay[: e - s], states[: e - s])
            bounds[k + 1].copy_(h)
            torch.matmul(Ct[s:e, :, None, :], states[: e - s], out=y[s:e])
        ctx.save_for_backward(dt, ut, du, Bt, Ct, At, A2t, bounds[:-1])
        ctx.chunk = chunk
        ctx.set_materialize_grads(False)
        return y[:, :, 0].transpose(0, 1), bounds[-1].transpose(1, 2).contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gh_last):
        if ctx.kernel:
            u, dt, At, B, C, h0 = ctx.saved_tensors
            gy = torch.zeros_like(u) if gy is None else gy.contiguous()
            gh = None if gh_last is None else gh_last.transpose(1, 2).contiguous()
            gu, gdt, gAt, gB, gC, gh0 = scan_kernel.backward(u, dt, At, B, C, h0, gy, gh, ctx.needs_input_grad[5])
            return gu, gdt, gAt.t(), gB, gC, None if gh0 is None else gh0.transpose(1, 2), None, None
        dt, ut, du, Bt, Ct, At, A2t, bounds = ctx.saved_tensors
        chunk = ctx.chunk
        length, b, d = dt.shape
        n = At.shape[0]
        gyt = dt.new_zeros(length, b, d) if gy is None else gy.transpose(0, 1).contiguous()
        c = min(chunk, length)
        decay, states, grad_h, tmp = (dt.new_empty(c, b, n, d) for _ in range(4))
        # G and decay of the step after the current chunk; past the end, "G" is gh_last with decay 1.
        g_next, decay_next = dt.new_zeros(b, n, d), dt.new_ones(b, n, d)
        if gh_last is not None:
            g_next.copy_(gh_last.transpose(1, 2))
        gu, gdelta = dt.new_empty(length, b, d), dt.new_empty(length, b, d)
        gB, gC = dt.new_empty(length, b, n), dt.new_empty(length, b, n)
        gAt = dt.new_zeros(n, d)
        for k in range(math.ceil(length / chunk) - 1, -1, -1):
            s, e = k * chunk, min((k + 1) * chunk, length)
            cc = e - s
            dec, st, g, tp = decay[:cc], states[:cc], grad_h[:cc], tmp[:cc]
            _chunk_states(bounds[k], dt, du, A2t, Bt, s, e, dec, st)
            torch.sum(torch.mul(st, gyt[s:e, :, None, :], out=tp), dim=-1, out=gC[s:e])
            torch.mul(gyt[s:e, :, None, :], Ct[s:e, :, :, None], out=g)
            g[cc - 1].addcmul_(decay_next, g_next)
            for i in range(cc - 2, -1, -1):
                g[i].addcmul_(dec[i + 1], g[i + 1])
            g_next.copy_(g[0])
            decay_next.copy_(dec[0])
            q = torch.matmul(Bt[s:e, :, None, :], g)[:, :, 0]  # sum_n G B: [cc, b, d]
            torch.mul(q, dt[s:e], out=gu[s:e])
            torch.mul(q, ut[s:e], out=gdelta[s:e])
            torch.sum(torch.mul(g, du[s:e, :, None, :], out=tp), dim=-1, out=gB[s:e])
            # P = G * h_{t-1} * exp(delta A): gradient w.r.t. the log-decay delta_t * A
            p = dec.mul_(g)
            p[1:].mul_(st[:-1])
            p[0].mul_(bounds[k])
            gdelta[s:e].add_(torch.mul(p, At, out=tp).sum(dim=2))
            gAt.add_(torch.mul(p, dt[s:e, :, None, :], out=tp).sum(dim=(0, 1)))
        gh0 = (decay_next * g_next).transpose(1, 2) if ctx.needs_input_grad[5] else None
        return (gu.transpose(0, 1), gdelta.transpose(0, 1), gAt.t(), gB.transpose(0, 1), gC.transpose(0, 1),
                gh0, None, None)


def _selective_scan_bld(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk, kernel=None):
    """Channel-last scan: u, delta, z [b, l, d]; B, C [b, l, n] -> y [b, l, d], last state [b, d, n]."""
    b, length, d = u.shape
    n = A.shape[1]
    if chunk is None:
        chunk = _auto_chunk(b, d, n, length, u.device)
    elif chunk < 1:
        raise ValueError(f"selective_scan: chunk must be >= 1, got {chunk}")
    ct = _compute_dtype(u, delta, A, B, C, D, z, initial_state)
    u_c, delta_c = u.to(ct), delta.to(ct)
    if delta_bias is not None:
        delta_c = delta_c + delta_bias.to(ct)
    if delta_softplus:
        delta_c = F.softplus(delta_c)
    h0 = None if initial_state is None else initial_state.to(ct)
    A_c, B_c, C_c = A.to(ct), B.to(ct), C.to(ct)
    use_kernel = scan_kernel.applies(u_c, delta_c, A_c, B_c, C_c, h0) if kernel is None else kernel
    if use_kernel and not scan_kernel.applies(u_c, delta_c, A_c, B_c, C_c, h0):
        raise RuntimeError("selective_scan(kernel=True): the C kernel takes fp32 CPU tensors and needs a C "
                           "compiler (see gesture.models.scan_kernel)")
    y, last_state = _SelectiveScanFn.apply(u_c, delta_c, A_c, B_c, C_c, h0, chunk, use_kernel)
    if D is not None:
        y = y + u_c * D.to(ct)
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(u.dtype), last_state


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False, chunk: int | None = None,
                   kernel: bool | None = None):
    """Chunked selective scan with a hand-written backward; the contract of mamba_ssm's ``selective_scan_fn``.

    u, delta [b, d, l]; A [d, n] (negative reals); B, C [b, n, l] (input-dependent); D [d] | None;
    z [b, d, l] | None; delta_bias [d] | None; initial_state [b, d, n] | None
    -> y [b, d, l] (dtype of u), and last_state [b, d, n] if ``return_last_state``.

    ``delta`` is used as given unless ``delta_bias`` is added and/or ``delta_softplus`` applies softplus (in
    that order, as in mamba_ssm). ``y = (scan + D * u) * silu(z)``. Computes in float32 (float64 if any input
    is).
    ``chunk`` is the number of time steps per workspace block; ``None`` picks one from the sizes and device.
    ``kernel``: use the compiled C scan (``gesture.models.scan_kernel``; fp32 on CPU); ``None``: whenever it
    applies, ``False``: the chunked PyTorch scan, ``True``: the kernel or an error.
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    y, last_state = _selective_scan_bld(
        u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D,
        None if z is None else z.transpose(1, 2), delta_bias, delta_softplus, initial_state, chunk, kernel,
    )
    y = y.transpose(1, 2)
    return (y, last_state) if return_last_state else y


# ------------------------------------------------------------------------------------------------------------
# Block. The functions below only use the shared parameter names and the attributes d_inner, d_state, d_conv,
# dt_rank, so they serve both MambaBlock and the mamba_ssm.Mamba subclass made by make_mamba.
# ------------------------------------------------------------------------------------------------------------


def _allocate_state(m: nn.Module, batch: int, device=None, dtype=None) -> MambaState:
    device = m.out_proj.weight.device if device is None else device
    dtype = m.out_proj.weight.dtype if dtype is None else dtype
    return (torch.zeros(batch, m.d_inner, m.d_conv, device=device, dtype=dtype),
            torch.zeros(batch, m.d_inner, m.d_state, device=device, dtype=dtype))


def _check_state(m: nn.Module, state: MambaState, b: int) -> None:
    if not isinstance(state, tuple | list) or len(state) != 2:
        raise ValueError("Mamba state must be a pair (conv_state, ssm_state); see allocate_state()")
    expect_shape(state[0], (b, m.d_inner, m.d_conv), "conv_state")
    expect_shape(state[1], (b, m.d_inner, m.d_state), "ssm_state")


def _causal_depthwise_conv(x_pad: torch.Tensor, conv: nn.Conv1d, length: int) -> torch.Tensor:
    """Causal depthwise conv, channel-last: x_pad [b, d_conv - 1 + l, d] -> [b, l, d] (conv1d's result)."""
    weight = conv.weight[:, 0, :].t()  # [d_conv, d]
    out = x_pad[:, :length] * weight[0]
    for k in range(1, weight.shape[0]):
        out = torch.addcmul(out, x_pad[:, k : k + length], weight[k])
    return out if conv.bias is None else out + conv.bias


def _mamba_forward(m: nn.Module, x: torch.Tensor, state: MambaState | None, return_state: bool, chunk):
    b, length, _ = expect_shape(x, (None, None, m.d_model), "x").shape
    if state is not None:
        _check_state(m, state, b)
    x_in, z = m.in_proj(x).chunk(2, dim=-1)  # [b, l, d_inner] each
    # The conv's carried context is the last d_conv - 1 inputs (zeros at the start of a sequence).
    context = (x_in.new_zeros(b, m.d_conv - 1, m.d_inner) if state is None
               else state[0][..., 1:].transpose(1, 2).to(x_in.dtype))
    x_pad = torch.cat([context, x_in], dim=1)  # [b, d_conv - 1 + l, d_inner]
    x_c = F.silu(_causal_depthwise_conv(x_pad, m.conv1d, length))  # [b, l, d_inner]
    dt, B, C = m.x_proj(x_c).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    y, ssm_state = _selective_scan_bld(
        x_c, F.linear(dt, m.dt_proj.weight), -torch.exp(m.A_log.float()), B, C, m.D.float(), z,
        delta_bias=m.dt_proj.bias.float(), delta_softplus=True,
        initial_state=None if state is None else state[1], chunk=chunk, kernel=getattr(m, "scan_kernel", None),
    )
    out = m.out_proj(y)  # [b, l, d_model]
    if not return_state:
        return out
    conv_state = x_pad[:, -m.d_conv :].transpose(1, 2)  # the last d_conv inputs (x_pad has >= d_conv steps)
    state_dtype = out.dtype if state is None else state[1].dtype
    return out, (conv_state.to(state_dtype).contiguous(), ssm_state.to(state_dtype))


def _mamba_step(m: nn.Module, x_t: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaState]:
    b = expect_shape(x_t, (None, m.d_model), "x_t").shape[0]
    _check_state(m, state, b)
    conv_state, ssm_state = state
    x_in, z = m.in_proj(x_t).chunk(2, dim=-1)  # [b, d_inner]
    conv_state_new = torch.cat([conv_state[..., 1:], x_in[..., None].to(conv_state.dtype)], dim=-1)
    x_c = (conv_state_new * m.conv1d.weight[:, 0, :]).sum(-1)
    if m.conv1d.bias is not None:
        x_c = x_c + m.conv1d.bias
    x_c = F.silu(x_c)  # [b, d_inner]
    dt, B, C = m.x_proj(x_c).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    delta = F.softplus(F.linear(dt, m.dt_proj.weight) + m.dt_proj.bias)  # [b, d_inner]
    decay = torch.exp(delta[..., None] * -torch.exp(m.A_log.float()))  # [b, d_inner, d_state]
    ssm_state_new = ssm_state * decay + (delta * x_c)[..., None] * B[:, None, :]
    y = torch.einsum("bdn,bn->bd", ssm_state_new, C.to(ssm_state_new.dtype)) + m.D * x_c
    out = m.out_proj((y * F.silu(z)).to(x_t.dtype))
    return out, (conv_state_new, ssm_state_new.to(ssm_state.dtype))


class MambaBlock(nn.Module):
    """Pure-PyTorch Mamba-1 mixer with mamba_ssm's parameters and init; ``x [b, l, d] -> [b, l, d]``.

    Args mirror ``mamba_ssm.Mamba``: d_inner = expand * d_model, dt_rank "auto" = ceil(d_model / 16);
    dt_proj's bias is initialised so that softplus(bias) is log-uniform in [dt_min, dt_max];
    A = -exp(A_log) starts at -[1..d_state]. ``chunk``: time steps per block of the PyTorch scan (None: chosen
    from the sizes). ``scan_kernel``: the C scan kernel whenever it applies (None), never (False) or always
    (True: an error where it cannot run); see :func:`selective_scan`.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 chunk: int | None = None, scan_kernel: bool | None = None) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.chunk, self.scan_kernel = chunk, scan_kernel

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        dt_init_std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.dt_proj.bias._no_reinit = True
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)  # S4D-real init
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, x: torch.Tensor, state: MambaState | None = None, return_state: bool = False):
        """x [b, l, d_model], optional state -> y [b, l, d_model], and the new state if ``return_state``."""
        return _mamba_forward(self, x, state, return_state, self.chunk)

    def step(self, x_t: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaState]:
        """One recurrent step: x_t [b, d_model], state -> (y_t [b, d_model], new state); state unchanged."""
        return _mamba_step(self, x_t, state)

    def allocate_state(self, batch: int, device=None, dtype=None) -> MambaState:
        """Zero state: (conv_state [batch, d_inner, d_conv], ssm_state [batch, d_inner, d_state])."""
        return _allocate_state(self, batch, device, dtype)


# ------------------------------------------------------------------------------------------------------------
# Factory
# ------------------------------------------------------------------------------------------------------------

_logged_paths: set[str] = set()


def _log_path_once(path: str, message: str, *args) -> None:
    if path not in _logged_paths:
        _logged_paths.add(path)
        log.info(message, *args)


@functools.cache
def _load_cuda_mamba() -> type | None:
    """A subclass of ``mamba_ssm.Mamba`` with MambaBlock's state API, or None if mamba_ssm does not import."""
    try:
        from mamba_ssm import Mamba
    except Exception as err:  # ImportError, or a broken CUDA extension (OSError/RuntimeError)
        _log_path_once("mamba_ssm-missing", "mamba_ssm unavailable (%s): pure-PyTorch Mamba instead", err)
        return None

    class CudaMamba(Mamba):
        """``mamba_ssm.Mamba`` (its fused kernel for plain forwards) plus MambaBlock's state API.

        With a state in or out, forward and step use the pure-PyTorch path on the same parameters, because
        mamba_ssm's Mamba-1 scan cannot start from a given state.
        """

        chunk: int | None = None

        def forward(self, x, state=None, return_state=False, inference_params=None):
            """x [b, l, d_model] (+ state) -> y [b, l, d_model] (, new state)."""
            if state is None and not return_state:
                return super().forward(x, inference_params=inference_params)
            return _mamba_forward(self, x, state, return_state, self.chunk)

        def step(self, x_t, state):
            """x_t [b, d_model], state -> (y_t [b, d_model], new state); ``state`` is not modified."""
            return _mamba_step(self, x_t, state)

        def allocate_state(self, batch, device=None, dtype=None):
            """Zero state: (conv_state [batch, d_inner, d_conv], ssm_state [batch, d_inner, d_state])."""
            return _allocate_state(self, batch, device, dtype)

    return CudaMamba


def make_mamba(d_model: int, prefer_cuda_kernel: bool = True, **kw) -> nn.Module:
    """A Mamba-1 mixer ``[b, l, d_model] -> [b, l, d_model]``: mamba_ssm's when CUDA and mamba_ssm are
    available (and ``prefer_cuda_kernel``), else :class:`MambaBlock`. ``kw`` are MambaBlock's arguments."""
    if prefer_cuda_kernel and torch.cuda.is_available():
        cls = _load_cuda_mamba()
        if cls is not None:
            chunk = kw.pop("chunk", None)
            _log_path_once("mamba_ssm", "Mamba: using mamba_ssm's CUDA kernels")
            module = cls(d_model, **kw)
            module.chunk = chunk
            return module
    _log_path_once("pure", "Mamba: using the pure-PyTorch block (the C scan kernel for fp32 on CPU where it "
                           "builds, else the chunked PyTorch scan)")
    return MambaBlock(d_model, **kw)

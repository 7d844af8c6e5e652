"""Quantizer: nearest-code lookup against a float64 brute force, the NaN/Inf/index guards
(finite outputs, in-range indices, counted and warned), straight-through gradients, EMA and dead-code re-init."""

from __future__ import annotations

import logging

import pytest
import torch

from gesture.models.quantizer import CodebookUsage, Quantizer, codebook_stats


def _quantizer(**kwargs) -> Quantizer:
    torch.manual_seed(0)
    q = Quantizer(n_codes=16, code_dim=8, **kwargs)
    with torch.no_grad():  # spread codes out so nearest neighbours are unambiguous
        q.codebook.copy_(torch.randn(16, 8))
    return q


def _with_nonfinite(z: torch.Tensor) -> torch.Tensor:
    bad = z.clone()
    bad[0, 0, 0] = float("nan")
    bad[0, 1, 3] = float("inf")
    bad[1, 2, 5] = float("-inf")
    bad[1, 3, :] = float("nan")  # a whole frame
    return bad


def test_nearest_code_matches_float64_brute_force():
    q = _quantizer()
    z = torch.randn(3, 10, 8)
    want = torch.cdist(z.double().reshape(-1, 8), q.codebook.double()).argmin(1).reshape(3, 10)
    assert torch.equal(q.map2index(z), want)
    out = q(z)
    assert torch.equal(out.indices, want)
    torch.testing.assert_close(out.z_q, q.codebook[want].detach())  # straight-through: z + (e - z)


def test_forward_on_nan_inf_is_finite_in_range_and_counted(caplog):
    q = _quantizer()
    z = _with_nonfinite(torch.randn(2, 5, 8))
    n_bad = int((~torch.isfinite(z)).sum())
    with caplog.at_level(logging.WARNING, logger="gesture.models.quantizer"):
        out = q(z)
    assert torch.isfinite(out.z_q).all() and torch.isfinite(out.loss)
    assert out.indices.min() >= 0 and out.indices.max() < q.n_codes
    assert int(q.nonfinite_inputs) == n_bad == 11
    assert any("non-finite" in r.getMessage() for r in caplog.records)
    # Replaced values are zeros: the frame that was all NaN maps to the code nearest the origin.
    assert out.indices[1, 3] == q.codebook.norm(dim=1).argmin()


def test_guard_warns_once_but_keeps_counting(caplog):
    q = _quantizer()
    z = _with_nonfinite(torch.randn(2, 5, 8))
    with caplog.at_level(logging.WARNING, logger="gesture.models.quantizer"):
        q(z)
        q.map2index(z)
    assert sum("non-finite" in r.getMessage() for r in caplog.records) == 1
    assert int(q.nonfinite_inputs) == 22


def test_map2index_on_nan_inf_is_in_range_and_counted():
    q = _quantizer()
    z = torch.randn(2, 5, 8)
    bad = _with_nonfinite(z)
    idx = q.map2index(bad)
    assert idx.dtype == torch.long and idx.shape == (2, 5)
    assert idx.min() >= 0 and idx.max() < q.n_codes
    assert int(q.nonfinite_inputs) == 11
    # Untouched frames keep their index; the input is not modified.
    clean = q.map2index(z)
    assert torch.equal(idx[0, 2:], clean[0, 2:])
    assert torch.isnan(bad[1, 3]).all()


def test_get_codebook_entry_clamps_out_of_range_and_negative_indices():
    q = _quantizer()
    indices = torch.tensor([[-1, 0, 300, 5], [16, 15, -7, 3]])
    codes = q.get_codebook_entry(indices)
    assert codes.shape == (2, 4, 8)
    want = q.codebook[torch.tensor([[0, 0, 15, 5], [15, 15, 0, 3]])]
    assert torch.equal(codes, want)
    assert int(q.clamped_indices) == 4
    assert int(q.nonfinite_inputs) == 0


def test_get_codebook_entry_rejects_float_indices():
    with pytest.raises(TypeError, match="integer"):
        _quantizer().get_codebook_entry(torch.zeros(2, 3))


def test_straight_through_gradient_is_identity_to_the_input():
    q = _quantizer()
    z = torch.randn(2, 6, 8, requires_grad=True)
    w = torch.randn(2, 6, 8)
    (q(z).z_q * w).sum().backward()
    torch.testing.assert_close(z.grad, w)


def test_straight_through_gradient_is_zero_at_replaced_values():
    q = _quantizer()
    z = _with_nonfinite(torch.randn(2, 5, 8)).requires_grad_(True)
    (q(z).z_q.sum() + q(z).loss).backward()
    assert torch.isfinite(z.grad).all()
    assert (z.grad[~torch.isfinite(z.detach())] == 0).all()


def test_loss_is_codebook_plus_beta_commitment():
    q = _quantizer(beta=0.25)
    z = torch.randn(2, 5, 8, requires_grad=True)
    out = q(z)
    dist2 = ((z.detach().double() - q.codebook.detach().double()[out.indices]) ** 2).mean()
    torch.testing.assert_close(out.loss.double(), (1 + 0.25) * dist2)
    out.loss.backward()
    assert q.codebook.grad is not None and q.codebook.grad.abs().sum() > 0


def test_codebook_stats_against_direct_formula():
    counts = torch.tensor([3, 0, 1, 0])
    perplexity, usage = codebook_stats(counts)
    p = torch.tensor([0.75, 0.25], dtype=torch.float64)
    torch.testing.assert_close(perplexity.double(), torch.exp(-(p * p.log()).sum()), rtol=1e-6, atol=0)
    assert usage.item() == 0.5
    metric = CodebookUsage(4)
    metric.update(torch.tensor([3, 0, 0, 0]))
    metric.update(torch.tensor([0, 0, 1, 0]))
    torch.testing.assert_close(metric.compute()[0], perplexity)


def test_ema_with_zero_decay_moves_codes_to_the_mean_of_their_inputs():
    q = _quantizer(ema_decay=0.0)
    assert not q.codebook.requires_grad
    z = torch.randn(4, 8, 8)
    out = q.train()(z)
    flat, idx = z.reshape(-1, 8).double(), out.indices.reshape(-1)
    used = idx.unique()
    assert len(used) > 3
    for k in used:
        torch.testing.assert_close(q.codebook[k].double(), flat[idx == k].mean(0), rtol=1e-4, atol=1e-5)


def test_reinit_changes_only_dead_codes():
    q = _quantizer()
    q.window_counts.copy_(torch.tensor([5, 0, 2, 0, 1, 1, 0, 9, 1, 1, 1, 1, 1, 1, 1, 0]))
    before = q.codebook.detach().clone()
    candidates = torch.randn(40, 8) + 100.0  # far from every code: a changed row is unmistakable
    n = q.reinit_dead_codes(candidates)
    dead = torch.tensor([1, 3, 6, 15])
    alive = torch.tensor([i for i in range(16) if i not in dead])
    assert n == 4 and int(q.reinitialised_codes) == 4
    assert torch.equal(q.codebook[alive], before[alive])
    for k in dead:  # each dead code is now one of the candidates, and they are distinct
        assert (q.codebook[k] == candidates).all(dim=1).any()
    assert len({tuple(q.codebook[k].tolist()) for k in dead}) == 4
    assert int(q.window_counts.sum()) == 0


def test_reinit_every_n_training_steps_revives_unused_codes():
    q = _quantizer(reinit_every=3).train()
    z = torch.randn(2, 4, 8) * 0.01 + q.codebook.detach()[0]  # everything maps to code 0
    for _ in range(3):
        assert (q(z).indices == 0).all()
    before = q.codebook.detach().clone()
    out = q(z)  # 4th forward: re-init first, then quantise
    assert int(q.reinitialised_codes) == 15
    assert torch.equal(q.codebook[0], before[0])
    assert out.usage > 1 / 16  # revived codes sit on this batch's inputs, so they are used at once
    q.eval()(z)
    assert int(q.train_steps) == 4  # eval forwards neither count nor re-init


def test_data_init_puts_every_code_on_a_distinct_first_batch_input():
    q = _quantizer(data_init=True).train()
    z = torch.randn(4, 10, 8)
    out = q(z)
    flat = z.reshape(-1, 8)
    for k in range(q.n_codes):
        assert (q.codebook[k] == flat).all(dim=1).any()
    assert len({tuple(c.tolist()) for c in q.codebook}) == q.n_codes
    assert out.indices.unique().numel() == q.n_codes  # every code is some input's nearest
    before = q.codebook.detach().clone()
    q(z)
    assert torch.equal(q.codebook, before)  # only the first batch

"""Shape contracts: the one place where tensors are required to match exactly.

Every loss compares prediction and target through :func:`assert_same_shape`, so a `[b, 7, 48]` vs
`[b, 1, 48]` pair raises instead of broadcasting. Convention: sequence tensors are `[b, t, ...]`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ShapeError(ValueError):
    """A tensor does not have the shape its contract requires."""


def assert_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str = "pred", name_b: str = "target") -> None:
    """Raise :class:`ShapeError` unless ``a.shape == b.shape`` exactly (no broadcasting)."""
    if tuple(a.shape) != tuple(b.shape):
        raise ShapeError(
            f"shape mismatch: {name_a} {tuple(a.shape)} vs {name_b} {tuple(b.shape)} "
            "(losses never broadcast; slice or reshape explicitly)"
        )


def expect_shape(x: torch.Tensor, shape: Sequence[int | None], name: str = "tensor") -> torch.Tensor:
    """Check ``x`` against ``shape`` (``None`` = any size) and return it unchanged.

    ``expect_shape(pose, (b, 1, 48), "pose")`` documents and enforces a contract in one line.
    """
    if x.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
        want = tuple("*" if s is None else s for s in shape)
        raise ShapeError(f"{name}: expected shape {want}, got {tuple(x.shape)}")
    return x

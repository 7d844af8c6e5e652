"""Batch collation that checks every sample against sample 0 (and an optional shape spec) before stacking.

An error names the field, the sample index and both shapes, instead of torch.stack's bare size message.
Only flat dicts of tensors / arrays / numbers / strings; nested structures are kept as lists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Number
from typing import Any

import numpy as np
import torch

from common.shapes import ShapeError

ShapeSpec = Mapping[str, Sequence[int | None]]


def _kind(value: Any) -> str:
    if isinstance(value, (str, bytes)):  # before np.generic: np.str_ is both
        return "object"
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return "array"
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, Number):
        return "number"
    return "object"


def _as_tensor(value: Any, field: str, index: int) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    array = np.asarray(value)
    if array.dtype == object or array.dtype.kind in "USV":
        raise TypeError(f"field {field!r}, sample {index}: numpy dtype {array.dtype} cannot become a tensor")
    # A read-only array (e.g. memory-mapped) is copied: torch.from_numpy would share and warn.
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _sample_shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else ()


def _check_spec(field: str, index: int, shape: tuple[int, ...], want: Sequence[int | None]) -> None:
    if len(shape) != len(want) or any(w is not None and w != s for w, s in zip(want, shape)):
        want_str = (
            "("
            + ", ".join("*" if w is None else str(w) for w in want)
            + ("," if len(want) == 1 else "")
            + ")"
        )
        raise ShapeError(
            f"field {field!r}, sample {index}: expected per-sample shape {want_str}, got {shape}"
        )


def collate_checked(samples: Sequence[Mapping[str, Any]], spec: ShapeSpec | None = None) -> dict[str, Any]:
    """Stack a list of sample dicts into one batch dict after checking keys, kinds, shapes and dtypes.

    Tensors / numpy arrays / numpy scalars -> stacked tensor ``[b, *shape]`` (numpy becomes torch);
    Python ints/floats/bools -> 1-D tensor ``[b]`` (float32 / int64 / bool); anything else (str) -> list.
    ``spec`` maps a field to its per-sample shape (``None`` = any size); a spec'd field must be present.
    """
    if len(samples) == 0:
        raise ValueError("collate_checked got an empty list of samples")
    first = samples[0]
    keys = list(first)
    for index, sample in enumerate(samples):
        if set(sample) != set(keys):
            missing = sorted(set(keys) - set(sample))
            extra = sorted(set(sample) - set(keys))
            raise ValueError(f"sample {index} keys differ from sample 0: missing {missing}, extra {extra}")
    if spec is not None:
        absent = sorted(set(spec) - set(keys))
        if absent:
            raise ValueError(f"fields {absent} are in the spec but not in the samples (have {sorted(keys)})")

    batch: dict[str, Any] = {}
    for field in keys:
        kind = _kind(first[field])
        shape0 = _sample_shape(first[field])
        for index, sample in enumerate(samples):
            value = sample[field]
            if _kind(value) != kind:
                raise TypeError(
                    f"field {field!r}, sample {index}: {type(value).__name__} where sample 0 has "
                    f"{type(first[field]).__name__}"
                )
            if spec is not None and field in spec:
                if kind == "object":
                    raise TypeError(f"field {field!r} has a shape spec but holds {type(value).__name__}")
                _check_spec(field, index, _sample_shape(value), spec[field])
            if _sample_shape(value) != shape0:
                raise ShapeError(
                    f"field {field!r}, sample {index}: shape {_sample_shape(value)} differs from "
                    f"sample 0 shape {shape0}"
                )
        batch[field] = _collate_field(field, [s[field] for s in samples], kind)
    return batch


def _collate_field(field: str, values: list[Any], kind: str) -> Any:
    if kind == "array":
        tensors = [_as_tensor(v, field, i) for i, v in enumerate(values)]
        for index, tensor in enumerate(tensors):
            if tensor.dtype != tensors[0].dtype:
                raise TypeError(
                    f"field {field!r}, sample {index}: dtype {tensor.dtype} differs from sample 0 dtype "
                    f"{tensors[0].dtype}"
                )
        return torch.stack(tensors)
    if kind == "bool":
        return torch.tensor([bool(v) for v in values], dtype=torch.bool)
    if kind == "number":
        is_int = all(isinstance(v, int) for v in values)
        return torch.tensor(values, dtype=torch.int64 if is_int else torch.get_default_dtype())
    return list(values)


class CheckedCollate:
    """Picklable ``collate_fn`` wrapping :func:`collate_checked` with a fixed spec (safe with workers)."""

    def __init__(self, spec: ShapeSpec | None = None) -> None:
        # Plain dict of tuples: pickles cheaply and detaches a Hydra DictConfig / ListConfig spec.
        self.spec = None if spec is None else {str(k): tuple(v) for k, v in spec.items()}

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return collate_checked(samples, self.spec)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec})"

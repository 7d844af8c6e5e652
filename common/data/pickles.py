"""Reading the annotation pickles datasets ship (HO3D's per-frame meta, SAM-3D-Body's per-frame outputs) without
running foreign code: only dicts, lists, numbers, strings and numpy arrays are admitted."""

from __future__ import annotations

import pickle
from pathlib import Path


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles annotation files made of dicts, numbers, strings and numpy arrays (Python 2 era included);
    anything else is refused: unpickling runs code by design."""

    SAFE_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bool", "bytes", "complex",
                     "object", "slice", "bytearray"}

    def find_class(self, module: str, name: str):
        if module in ("builtins", "__builtin__") and name in self.SAFE_BUILTINS:
            return super().find_class(module, name)
        if module.split(".")[0] in ("numpy", "copy_reg", "copyreg", "_codecs"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: not part of an annotation file")


def read_pickle(path: Path, expect: type = dict):
    """A dataset's annotation pickle (an object of type ``expect``); unreadable, truncated or unexpected files name
    themselves."""
    try:
        with open(path, "rb") as f:
            data = _ArrayUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file {path} is missing") from None
    except Exception as err:  # noqa: BLE001 - pickle, EOF and numpy errors of a truncated or foreign file
        raise ValueError(f"annotation file {path}: unreadable ({type(err).__name__}: {err})") from err
    if not isinstance(data, expect):
        raise ValueError(f"annotation file {path}: expected a {expect.__name__}, got {type(data).__name__}")
    return data

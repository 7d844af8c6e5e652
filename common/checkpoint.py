"""Read weights from any checkpoint this project meets and load them into a module, reporting what matched.

Formats: Lightning ``.ckpt``, ``.safetensors``, ``.pt``/``.pth``/``.bin`` state dicts and Accelerate folders.
Only weights: optimiser, loop and hyper-parameter state are ignored (resuming training is Lightning's job).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors
from torch import nn

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
# Files looked for, in this order, inside an Accelerate / Hugging Face checkpoint folder.
FOLDER_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Keys under which a saved dict may wrap the state dict (Lightning uses ``state_dict``).
WRAPPER_KEYS = ("state_dict", "model")
# Path components added by wrappers: DistributedDataParallel (``module``) and torch.compile (``_orig_mod``).
WRAPPER_COMPONENTS = frozenset({"module", "_orig_mod"})
SUPPORTED_FORMATS = (
    "Lightning .ckpt, .safetensors, .pt/.pth/.bin state dict (optionally wrapped under "
    f"{'/'.join(WRAPPER_KEYS)}), or a folder holding one of {', '.join(FOLDER_FILES)}"
)
_LIST_LIMIT = 20


def read_state_dict(path: str | Path, *, allow_pickle: bool = True) -> dict[str, torch.Tensor]:
    """Read the weights stored at ``path`` onto the CPU as a flat ``{name: tensor}`` dict.

    Torch files are read with ``weights_only=True`` first. A file that also pickles Python objects (a
    Lightning checkpoint whose hyper-parameters hold a DictConfig or a partial) is re-read with
    ``weights_only=False`` and a warning when ``allow_pickle`` is set: only do that for files you trust.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _read_folder(path, allow_pickle)
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        try:
            return load_safetensors(path, device="cpu")
        except Exception as err:  # safetensors' own errors do not name the file
            raise ValueError(f"could not read {path} as safetensors: {err}") from err
    if suffix in TORCH_SUFFIXES:
        return _as_state_dict(read_checkpoint(path, allow_pickle), path)
    if path.name.endswith(".index.json"):
        return _read_sharded(path, allow_pickle)
    raise ValueError(f"unknown checkpoint format: {path}; supported: {SUPPORTED_FORMATS}")


def _read_folder(folder: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    for name in FOLDER_FILES:
        if (folder / name).is_file():
            return read_state_dict(folder / name, allow_pickle=allow_pickle)
    found = sorted(p.name for p in folder.iterdir())[:_LIST_LIMIT]
    raise ValueError(
        f"unknown checkpoint format: folder {folder} holds none of {', '.join(FOLDER_FILES)} "
        f"(found: {found}); supported: {SUPPORTED_FORMATS}"
    )


def _read_sharded(index_path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Merge the shards listed in a Hugging Face ``*.index.json`` (``{"weight_map": {key: file}}``)."""
    weight_map = json.loads(index_path.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path}: no 'weight_map' dict in the shard index")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise FileNotFoundError(f"shard {shard_path} listed in {index_path} does not exist")
        state.update(read_state_dict(shard_path, allow_pickle=allow_pickle))
    absent = sorted(set(weight_map) - set(state))
    if absent:
        raise ValueError(
            f"{index_path}: {len(absent)} keys listed but not in any shard: {absent[:_LIST_LIMIT]}"
        )
    return state


def read_checkpoint(path: str | Path, allow_pickle: bool = True, pickle_note: int = logging.WARNING) -> object:
    """``torch.load`` of ``path`` onto the CPU, whatever it holds (a Lightning checkpoint dict, a state dict).

    Read with ``weights_only=True`` first; a file that also pickles Python objects (hyper-parameters holding a
    DictConfig or a partial) is re-read with ``weights_only=False`` when ``allow_pickle`` is set, with a note
    logged at ``pickle_note`` (only load files you trust). A truncated or corrupt file is a ``ValueError`` naming
    it (torch's own errors do not).
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not allow_pickle:
            raise ValueError(
                f"{path} could not be read with weights_only=True and allow_pickle=False: {err}"
            ) from err
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as retry_err:
            raise ValueError(f"could not read {path} as a torch file: {retry_err}") from retry_err
    except Exception as err:  # torch's own errors (a truncated zip archive, EOF) do not name the file
        raise ValueError(f"could not read {path} as a torch file (truncated or corrupt? "
                         f"{type(err).__name__}: {err})") from err
    log.log(
        pickle_note,
        "%s holds pickled Python objects besides tensors (e.g. hyper-parameters); "
        "read with weights_only=False — only load checkpoints you trust",
        path,
    )
    return obj


def _as_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap ``{"state_dict": ...}`` / ``{"model": ...}`` and check that every value is a tensor."""
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{path} holds a {type(obj).__name__}, not a state dict; supported: {SUPPORTED_FORMATS}"
        )
    for key in WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    not_tensors = [(k, type(v).__name__) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"{path} is not a state dict: {len(not_tensors)} entries are not tensors, e.g. "
            f"{not_tensors[:5]}; supported: {SUPPORTED_FORMATS}"
        )
    return dict(obj)


@dataclass
class LoadReport:
    """What :func:`load_weights` did. ``mismatched`` holds ``(key, checkpoint shape, model shape)``."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    expected_missing: list[str] = field(default_factory=list)  # missing, and matching ``expected_missing``
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 5) -> str:
        parts = [f"loaded {len(self.loaded)}"]
        if self.expected_missing:
            parts.append(f"{len(self.expected_missing)} expected-missing")
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            parts.append(f"{len(keys)} {name}" + (f" {_preview(keys, limit)}" if keys else ""))
        shapes = [f"{k}: ckpt {c} vs model {m}" for k, c, m in self.mismatched]
        parts.append(f"{len(shapes)} shape-mismatched" + (f" {_preview(shapes, limit)}" if shapes else ""))
        return "; ".join(parts)


def _preview(items: list[str], limit: int) -> str:
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return "[" + ", ".join(items[:limit]) + more + "]"


def strip_wrappers(key: str) -> str:
    """``net._orig_mod.backbone.w`` / ``module.net.w`` -> ``net.backbone.w`` / ``net.w`` (the leaf is kept)."""
    *path, leaf = key.split(".")
    return ".".join([p for p in path if p not in WRAPPER_COMPONENTS] + [leaf])


def _apply_prefix_map(key: str, prefix_map: Mapping[str, str]) -> str:
    """Replace the longest prefix of ``key`` found in ``prefix_map``; keys matching none are kept."""
    matches = [p for p in prefix_map if key.startswith(p)]
    if not matches:
        return key
    prefix = max(matches, key=len)
    return prefix_map[prefix] + key[len(prefix) :]


def load_weights(
    module: nn.Module,
    path: str | Path,
    prefix_map: Mapping[str, str] | None = None,
    strict: bool = False,
    include: str | None = None,
    expected_missing: Sequence[str] = (),
    min_loaded_fraction: float = 0.5,
    rename: Callable[[str], str | None] | None = None,
    require_clean: bool = False,
) -> LoadReport:
    """Copy the checkpoint's tensors into ``module`` where names and shapes match, and report the rest.

    Checkpoint keys lose DDP/compile wrappers (:func:`strip_wrappers`), then ``prefix_map`` renames their
    leading part (``{"net.": ""}`` loads a LightningModule's ``net`` into the bare network). Module keys are
    matched the same way, so a compiled target works too. ``include`` is a glob on the resulting names
    (``"backbone.*"``): keys outside it are neither loaded nor reported. Shape mismatches are never loaded.
    ``expected_missing``: globs of module keys the checkpoint is not meant to have (a Stage 2 network's temporal
    encoder in a Stage 1 checkpoint): reported apart, and a load that lacks only those is clean (logged at INFO).
    A load in which fewer than ``min_loaded_fraction`` of the module's tensors that should load do (the rest
    shape-mismatched or missing: a checkpoint of another architecture or size, whose few loadable tensors are
    counters and biases) raises ``ValueError`` before touching the module; 0 disables the check.
    ``strict=True`` raises ``RuntimeError`` before touching the module unless everything matches.
    ``require_clean=True`` raises ``ValueError`` before touching the module when anything but ``expected_missing``
    is missing, unexpected or shape-mismatched (after the ``min_loaded_fraction`` check, whose message names a
    checkpoint of another architecture).
    ``rename`` maps each checkpoint key (after the prefix map) to the module's naming: another library's layout of
    the same network; ``None`` drops the key (parts the module does not have, such as a classifier), unreported.
    """
    source = read_state_dict(path)
    prefix_map = dict(prefix_map or {})

    def in_scope(name: str) -> bool:
        return include is None or fnmatch.fnmatchcase(name, include)

    checkpoint: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for raw_key, tensor in source.items():
        name = _apply_prefix_map(strip_wrappers(raw_key), prefix_map)
        if rename is not None:
            name = rename(name)
            if name is None:
                continue
        if not in_scope(name):
            continue
        if name in checkpoint:
            raise ValueError(f"{path}: keys {origin[name]!r} and {raw_key!r} both map to {name!r}")
        checkpoint[name] = tensor
        origin[name] = raw_key

    target = module.state_dict()
    # Normalised name -> the module's own key; an exact key wins over a normalised one if both exist.
    model_keys = {strip_wrappers(k): k for k in target} | {k: k for k in target}

    report = LoadReport()
    to_load: dict[str, torch.Tensor] = {}
    for name, tensor in checkpoint.items():
        model_key = model_keys.get(name)
        if model_key is None:
            report.unexpected.append(name)
        elif tensor.shape != target[model_key].shape:
            report.mismatched.append((name, tuple(tensor.shape), tuple(target[model_key].shape)))
        else:
            to_load[model_key] = tensor
            report.loaded.append(name)
    matched = set(to_load) | {model_keys[name] for name, _, _ in report.mismatched}
    for key in target:
        name = strip_wrappers(key)
        if key in matched or not in_scope(name):
            continue
        expected = any(fnmatch.fnmatchcase(name, pattern) for pattern in expected_missing)
        (report.expected_missing if expected else report.missing).append(name)

    if strict and not report.clean:
        raise RuntimeError(f"strict load of {path} failed:\n{_strict_listing(report)}")
    should_load = len(report.loaded) + len(report.mismatched) + len(report.missing)
    if should_load and len(report.loaded) < min_loaded_fraction * should_load:
        raise ValueError(
            f"{path}: only {len(report.loaded)} of the {should_load} tensors this {type(module).__name__} needs "
            f"load ({len(report.mismatched)} shape-mismatched, {len(report.missing)} missing): the checkpoint is "
            f"of another architecture or size; nothing was loaded.\n{_strict_listing(report)}"
        )
    if require_clean and not report.clean:
        raise ValueError(f"{path} does not fit this {type(module).__name__}; nothing was loaded.\n"
                         f"{_strict_listing(report)}")
    module.load_state_dict(to_load, strict=False)
    level = logging.INFO if report.clean else logging.WARNING
    log.log(level, "weights from %s: %s", path, report.summary())
    return report


def _strict_listing(report: LoadReport) -> str:
    lines = [f"  missing ({len(report.missing)}): {_preview(report.missing, _LIST_LIMIT)}"]
    lines.append(f"  unexpected ({len(report.unexpected)}): {_preview(report.unexpected, _LIST_LIMIT)}")
    shapes = [f"{k}: ckpt {c} vs model {m}" for k, c, m in report.mismatched]
    lines.append(f"  shape-mismatched ({len(shapes)}): {_preview(shapes, _LIST_LIMIT)}")
    return "\n".join(lines)

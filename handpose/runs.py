"""A training run of the hand family, from its checkpoint: the run's ``config.yaml`` (written by ``common.train``
next to ``checkpoints/``), its ``HandPoseLit`` with every tensor of the checkpoint loaded strictly, and its
datamodule set up for evaluation. Used by ``handpose.evaluate``, ``handpose.submission`` and ``HandTracker``."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from common.checkpoint import load_weights
from handpose.lit import HandPoseLit

log = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
# Modules renamed since runs were written: a run's config.yaml names the old paths in its `_target_`s.
RENAMED_TARGETS = {"handpose.model.": "handpose.models."}


def _renamed(tree):
    """A plain config tree with old module paths in its ``_target_`` values replaced (a new tree)."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            if key == "_target_" and isinstance(value, str):
                old = next((o for o in RENAMED_TARGETS if value.startswith(o)), None)
                out[key] = RENAMED_TARGETS[old] + value[len(old):] if old else value
            else:
                out[key] = _renamed(value)
        return out
    if isinstance(tree, list):
        return [_renamed(v) for v in tree]
    return tree


def find_run_config(ckpt: Path, config: Path | None = None) -> Path:
    """The run's config: ``config`` if given, else ``<run>/config.yaml`` for ``<run>/checkpoints/x.ckpt``."""
    candidates = [config] if config is not None else [ckpt.parent.parent / CONFIG_NAME, ckpt.parent / CONFIG_NAME]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"no run config for {ckpt}: looked for {', '.join(map(str, candidates))}. common.train writes "
        f"<run>/{CONFIG_NAME} next to <run>/checkpoints/; pass --config for a checkpoint stored elsewhere"
    )


def load_checkpoint(
    ckpt: str | Path, config: str | Path | None = None
) -> tuple[HandPoseLit, DictConfig]:
    """Rebuild the run's HandPoseLit from its config and load every tensor of ``ckpt`` (strict) -> (lit, cfg).

    The backbone's init file and the Stage 1 weights named in the config are not needed (the checkpoint holds
    all weights) and are not read. Returns the module in eval mode on the CPU.
    """
    from hydra.utils import instantiate

    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(f"--ckpt {ckpt} does not exist")
    cfg_path = find_run_config(ckpt, Path(config) if config else None)
    cfg = OmegaConf.load(cfg_path)
    for key in ("model", "data"):
        if key not in cfg:
            raise KeyError(f"{cfg_path} has no '{key}' section (is it a common.train run config?)")
    with open_dict(cfg):
        cfg.model.net.backbone.weight = None
        cfg.model.stage1_weight = None
        model = OmegaConf.to_container(cfg.model, resolve=False)
        if _renamed(model) != model:
            log.info("%s names modules by their old paths (%s): read with the new ones", cfg_path,
                     ", ".join(f"{o} -> {n}" for o, n in RENAMED_TARGETS.items()))
            cfg.model = _renamed(model)
    os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))  # unresolved configs
    lit = instantiate(cfg.model)
    if not isinstance(lit, HandPoseLit):
        raise TypeError(f"{cfg_path}: model is a {type(lit).__name__}, expected handpose.lit.HandPoseLit")
    load_weights(lit, ckpt, strict=True)  # logs what it loaded
    log.info("model and data settings from %s", cfg_path)
    return lit.eval(), cfg


def build_datamodule(cfg: DictConfig, lit: HandPoseLit, overrides: Mapping | None = None):
    """The run's datamodule for evaluation: no augmentation, crops of the network's size, ``overrides`` applied."""
    from hydra.utils import instantiate

    data_cfg = copy.deepcopy(cfg.data)
    with open_dict(data_cfg):
        data_cfg.augment = None
        data_cfg.img_size = lit.net.img_size
        for key, value in (overrides or {}).items():
            if value is not None:
                data_cfg[key] = value
    return instantiate(data_cfg)

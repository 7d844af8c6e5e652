"""ViT image backbone: a timm VisionTransformer that turns a hand crop into patch tokens.

Built with ``pretrained=False`` always; weights come only from a local file named in the config (never a hub
download). Not responsible for cropping or normalisation (the data side does that).
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from common.checkpoint import LoadReport, read_state_dict
from common.shapes import expect_shape

log = logging.getLogger(__name__)


class ViTBackbone(nn.Module):
    """timm ViT without its classifier; returns the patch tokens (prefix/register tokens dropped).

    Args:
        name: timm model name, e.g. ``vit_tiny_patch16_224`` (CPU default) or ``vit_large_patch14_dinov2``.
        img_size: square crop size in pixels; must be a multiple of the patch size.
        depth: number of transformer blocks (``None`` = the architecture's own depth).
        weight: optional local ``.safetensors`` / ``.pth`` file with ViT weights (timm or original DINOv2
            layout); a position embedding of another grid size is resampled to ``img_size``.
        drop_path_rate: stochastic depth.
    """

    def __init__(
        self,
        name: str = "vit_tiny_patch16_224",
        img_size: int = 128,
        depth: int | None = None,
        weight: str | None = None,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        kwargs = {"img_size": img_size, "num_classes": 0, "drop_path_rate": drop_path_rate}
        if depth is not None:
            kwargs["depth"] = depth
        self.vit = timm.create_model(name, pretrained=False, **kwargs)
        if not isinstance(self.vit, VisionTransformer):
            raise TypeError(f"backbone {name!r} is a {type(self.vit).__name__}, expected a timm VisionTransformer")
        self.img_size = img_size
        self.embed_dim: int = self.vit.embed_dim
        self.grid_size: tuple[int, int] = tuple(self.vit.patch_embed.grid_size)
        self.num_patches: int = self.grid_size[0] * self.grid_size[1]
        if weight is not None:
            self.load_pretrained(weight)

    def load_pretrained(self, path: str | Path) -> LoadReport:
        """Load ViT weights from a local file; a missing file is an error naming ``backbone.weight``."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"model.net.backbone.weight: {path} does not exist (a local .safetensors/.pth file is required; "
                "weights are never downloaded)"
            )
        # timm's own filter converts original DINOv2 keys and resamples the position embedding to our grid.
        state = checkpoint_filter_fn(read_state_dict(path), self.vit)
        target = self.vit.state_dict()
        mismatched = [(k, tuple(v.shape), tuple(target[k].shape)) for k, v in state.items()
                      if k in target and v.shape != target[k].shape]
        loadable = {k: v for k, v in state.items() if k in target and v.shape == target[k].shape}
        self.vit.load_state_dict(loadable, strict=False)
        report = LoadReport(
            loaded=sorted(loadable),
            missing=sorted(set(target) - set(loadable) - {k for k, _, _ in mismatched}),
            unexpected=sorted(set(state) - set(target)),
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

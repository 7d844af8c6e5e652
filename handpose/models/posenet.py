"""PoseNet: ViT backbone + hand decoder (+ temporal encoder in Stage 2) -> MANO parameters of the LAST frame.

Both stages return ``[b, 1, ...]``: Stage 1 sees one frame, Stage 2 refines the last frame's token with the
others. ``encode_frames`` / ``refine_and_decode`` split the forward pass so a streaming tracker can cache
per-frame tokens. No training logic here (loss: handpose.loss, wiring: handpose.lit).
"""

from __future__ import annotations

import enum
import functools
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from common.checkpoint import LoadReport, load_weights
from common.shapes import expect_shape

from .backbone import CNNBackbone, ViTBackbone
from .decoder import POSE_DIM, SHAPE_DIM, HandDecoder, HandPrediction, ManoParams
from .keypoints import make_keypoint_head
from .temporal import TemporalEncoder
from .translation import camera_features

log = logging.getLogger(__name__)

# A LightningModule holds the network as `net`; its checkpoints are loaded into a bare PoseNet through this.
LIGHTNING_PREFIX_MAP = {"net.": ""}


class Stage(str, enum.Enum):
    STAGE1 = "stage1"  # single frame
    STAGE2 = "stage2"  # sequence; temporal encoder refines the last frame


BACKBONES = {"vit": ViTBackbone, "cnn": CNNBackbone}


def build_backbone(spec: Mapping | nn.Module | None) -> nn.Module:
    """``{kind: vit|cnn, **kwargs}`` (kind defaults to vit) or a built backbone -> the backbone module.

    A backbone gives ``img_size``, ``embed_dim``, ``grid_size``, ``num_patches`` and tokens ``[n, N, C]``;
    a CNN also a dense map (``forward_features``) for the heatmap keypoint head.
    """
    if isinstance(spec, nn.Module):
        return spec
    kwargs = dict(spec or {})
    kind = kwargs.pop("kind", "vit")
    if kind not in BACKBONES:
        raise ValueError(f"model.net.backbone.kind: {kind!r} is not one of {sorted(BACKBONES)}")
    return BACKBONES[kind](**kwargs)


def _factory(spec: Mapping | Callable[..., nn.Module] | None, cls: type[nn.Module], key: str
             ) -> tuple[Callable[..., nn.Module], dict]:
    """``spec`` (kwargs of ``cls``, or a Hydra ``_partial_`` of it) -> (a callable that takes the arguments that come
    from the rest of the network, the configured kwargs)."""
    if spec is None or isinstance(spec, Mapping):
        kwargs = dict(spec or {})
        return functools.partial(cls, **kwargs), kwargs
    if isinstance(spec, functools.partial) and isinstance(spec.func, type) and issubclass(spec.func, cls):
        return spec, dict(spec.keywords)
    raise TypeError(f"model.net.{key}: expected the kwargs of {cls.__name__} or a _partial_ of it, got {spec!r}")


class PoseNet(nn.Module):
    """Hand pose network.

    Args:
        stage: ``stage1`` or ``stage2`` (Stage 2 adds the temporal encoder; the rest is identical, so Stage 1
            weights load into it).
        backbone: a built backbone (configs: ``_target_: handpose.models.CNNBackbone`` or ``ViTBackbone``, so that
            ``model/backbone@model.net.backbone=<name>`` swaps it), or ``{kind: cnn|vit, **kwargs}``.
        decoder: a ``_partial_`` of :class:`HandDecoder` (dim, depth, heads, ..., trans_bins), or its kwargs; token
            width and count, crop size, the MANO model and the dense feature width come from the rest of the network.
        temporal: a ``_partial_`` of :class:`TemporalEncoder` (depth, heads, ...), or its kwargs; Stage 2 only (the
            token width comes from the decoder).
        freeze_backbone: no gradients into the backbone, and it stays in eval mode.
        freeze_encoder: also freeze everything else that makes the per-frame tokens (keypoint head, the decoder's
            projections, query and blocks): the frame tokens are computed without gradients, and only the
            temporal encoder and the output heads train (Stage 2 on a CPU: 7 frames cost 7 forward passes).
        freeze_heads: also freeze the output heads (pose, fingers, shape, translation): only the temporal encoder
            trains, so Stage 2 can change a prediction only by refining the token Stage 1's heads read.
        aux_keypoints: add a 2D keypoint head (:func:`make_keypoint_head`: joints of the last frame, for the
            ``keypoints_2d`` auxiliary loss through :meth:`predict_with_keypoints`).
        mano_model_path: the MANO files whose root joint turns crop-space translation into MANO ``trans``
            (``None`` = the procedural hand); must be the data's model.
    """

    def __init__(
        self,
        stage: str = "stage1",
        backbone: Mapping | nn.Module | None = None,
        decoder: Mapping | Callable[..., HandDecoder] | None = None,
        temporal: Mapping | Callable[..., TemporalEncoder] | None = None,
        freeze_backbone: bool = False,
        freeze_encoder: bool = False,
        freeze_heads: bool = False,
        aux_keypoints: bool = False,
        mano_model_path: str | None = None,
    ) -> None:
        super().__init__()
        self.stage = Stage(stage)
        self.backbone = build_backbone(backbone)
        make_decoder, decoder = _factory(decoder, HandDecoder, "decoder")
        make_temporal, _ = _factory(temporal, TemporalEncoder, "temporal")
        if (decoder.get("joint_tokens") or decoder.get("joint_mlp") or decoder.get("joint_depth")) and not (
                aux_keypoints and isinstance(self.backbone, CNNBackbone)):
            raise ValueError("model.net.decoder.joint_tokens / joint_mlp / joint_depth need a CNN backbone and "
                             "aux_keypoints=true (the heatmap head)")
        self.decoder = make_decoder(
            in_dim=self.backbone.embed_dim, num_tokens=self.backbone.num_patches, img_size=self.backbone.img_size,
            mano_model_path=mano_model_path, joint_in_dim=getattr(self.backbone, "dense_dim", 0)
        )
        self.temporal = make_temporal(self.decoder.token_dim) if self.stage is Stage.STAGE2 else None
        self.keypoint_head = (make_keypoint_head(self.backbone, bool(decoder.get("joint_depth")))
                              if aux_keypoints else None)
        self.backbone_frozen = False
        self.encoder_frozen = False
        if freeze_backbone or freeze_encoder:
            self.freeze_backbone()
        if freeze_encoder:
            self.freeze_encoder()
        if freeze_heads:
            for head in self.decoder.output_heads():
                head.requires_grad_(False)

    @property
    def has_heatmaps(self) -> bool:
        """Whether the keypoint head is the heatmap head (``make_keypoint_head`` on a CNN backbone)."""
        return self.keypoint_head is not None and isinstance(self.backbone, CNNBackbone)

    @property
    def token_dim(self) -> int:
        return self.decoder.token_dim

    @property
    def img_size(self) -> int:
        return self.backbone.img_size

    @property
    def trans_bin_centers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Translation bin centres x [Bx], y [By], z [Bz] (in the space of :attr:`translation`)."""
        return self.decoder.bin_centers

    @property
    def translation(self):
        """The :class:`TranslationBins` (centres, space, encode / decode); the loss takes its targets from it."""
        return self.decoder.translation

    def freeze_backbone(self) -> None:
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.backbone_frozen = True

    def token_encoder_modules(self) -> list[nn.Module]:
        """What turns a frame into its hand token besides the backbone: keypoint head, the decoder's token path."""
        d = self.decoder
        modules = [d.token_proj, d.camera_embed, d.blocks, d.merge, *((d.joint_proj,) if d.joint_tokens else ()),
                   *((d.joint_mlp_net,) if d.joint_mlp else ()),
                   *((d.finger_feature_net,) if d.finger_features else ())]
        return [*modules, *((self.keypoint_head,) if self.keypoint_head is not None else ())]

    def freeze_encoder(self) -> None:
        self.freeze_backbone()
        for module in self.token_encoder_modules():
            module.requires_grad_(False)
            module.eval()
        for param in (self.decoder.token_pos, self.decoder.query, *((self.decoder.joint_embed,) if self.decoder.joint_tokens else ())):
            param.requires_grad_(False)
        self.encoder_frozen = True

    def train(self, mode: bool = True) -> PoseNet:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()  # no stochastic depth / dropout in a frozen backbone
        if self.encoder_frozen:
            for module in self.token_encoder_modules():
                module.eval()
        return self

    def load_stage1(self, path: str | Path) -> LoadReport:
        """Load Stage 1 weights (Lightning .ckpt, .safetensors, .pt, Accelerate folder) and log what matched.

        In a Stage 2 network the temporal encoder is expected to be missing (logged at INFO with the rest of a
        clean load). Anything else missing, any unexpected key or shape mismatch is an error before the network is
        touched: a Stage 1 of another configuration (say without ``decoder.finger_features``, or another
        ``joint_depth``) would leave some of the heads Stage 2 keeps frozen at their random initialisation.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"stage1_weight: {path} does not exist (train Stage 1 first, or fix the path)")
        expected = ("temporal.*",) if self.temporal is not None else ()
        try:
            report = load_weights(self, path, prefix_map=LIGHTNING_PREFIX_MAP, expected_missing=expected,
                                  require_clean=True)
        except ValueError as err:
            raise ValueError(f"stage1_weight: {err}\nConfigure Stage 2's network (model.net) as the Stage 1 run "
                             "that made this checkpoint (its config.yaml).") from None
        if not report.loaded:
            raise ValueError(f"stage1_weight: no weights from {path} match this PoseNet ({report.summary()})")
        return report

    def encode_frames(
        self, img: torch.Tensor, bbox: torch.Tensor, focal: torch.Tensor, princpt: torch.Tensor,
        joint_hint: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """img [b, t, 3, H, W], bbox [b, t, 4], focal/princpt [b, t, 2] (crop pixels) -> hand tokens [b, t, d].

        Per frame and independent across frames. ``bbox`` is checked but not needed: for an axis-aligned crop
        the crop intrinsics already encode it (see ``camera_features``). ``joint_hint``: see :meth:`_encode`
        (given 2D joints for the joint MLP instead of the heatmaps', e.g. the ground truth as an oracle).
        """
        return self._encode(img, bbox, focal, princpt, joint_hint)[0]

    def _encode(
        self, img: torch.Tensor, bbox: torch.Tensor, focal: torch.Tensor, princpt: torch.Tensor,
        joint_hint: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """-> hand tokens [b, t, d]; the keypoint head's input for every frame: the backbone's patch tokens
        [b, t, N, C] (ViT) or its dense map [b, t, C, g, g] (CNN); for a CNN with a heatmap head the joint
        log-heatmaps [b, t, 21, g * g] (else None), and with ``joint_depth`` the joints' relative depths [b, t, 21]
        (else None). ``joint_hint`` = (joints [b, t, 21, 2] crop pixels, use [b, t] bool): the joint MLP / tokens
        of those frames read the given joints instead of the heatmaps' (training)."""
        b, t = img.shape[:2]
        size = self.img_size
        expect_shape(img, (b, t, 3, size, size), "img")
        expect_shape(bbox, (b, t, 4), "bbox")
        expect_shape(focal, (b, t, 2), "focal")
        expect_shape(princpt, (b, t, 2), "princpt")
        frames = rearrange(img, "b t c h w -> (b t) c h w")
        log_heatmaps = joint_tokens = depths = None
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen):
            if isinstance(self.backbone, CNNBackbone):
                patches, dense = self.backbone.forward_features(frames)
                features = rearrange(dense, "(b t) c h w -> b t c h w", b=b)
            else:
                patches = self.backbone(frames)
                features = rearrange(patches, "(b t) n c -> b t n c", b=b)
        camera = camera_features(focal, princpt, (size, size))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder_frozen):
            if self.has_heatmaps:
                log_heatmaps, depths = self.keypoint_head.maps(dense)  # [(b t), 21, K], [(b t), 21] or None
                if self.decoder.uses_joints:
                    hint = None if joint_hint is None else (
                        rearrange(joint_hint[0], "b t j c -> (b t) j c"), rearrange(joint_hint[1], "b t -> (b t)"))
                    joint_tokens = self.keypoint_head.joint_features(
                        dense, log_heatmaps, hint, depths if self.decoder.joint_depth else None)
            tokens = self.decoder(patches, rearrange(camera, "b t c -> (b t) c"), joint_tokens)
        tokens = expect_shape(rearrange(tokens, "(b t) d -> b t d", b=b), (b, t, self.token_dim), "frame tokens")
        if log_heatmaps is not None:
            log_heatmaps = rearrange(log_heatmaps, "(b t) j k -> b t j k", b=b)
        if depths is not None:
            depths = rearrange(depths, "(b t) j -> b t j", b=b)
        return tokens, features, log_heatmaps, depths

    def refine_and_decode(
        self, tokens: torch.Tensor, timestamp: torch.Tensor, focal: torch.Tensor, princpt: torch.Tensor
    ) -> HandPrediction:
        """tokens [b, t, d], timestamp [b, t], focal / princpt [b, t, 2] (crop pixels; the last frame's are used)
        -> (pose [b, 1, 48], shape [b, 1, 10], trans [b, 1, 3]), 3 x [b, 1, B]."""
        b, t = tokens.shape[:2]
        expect_shape(tokens, (b, t, self.token_dim), "tokens")
        expect_shape(timestamp, (b, t), "timestamp")
        expect_shape(focal, (b, None, 2), "focal")
        expect_shape(princpt, (b, None, 2), "princpt")
        if self.temporal is not None:
            last = self.temporal(tokens, timestamp)
        elif t == 1:
            last = tokens
        else:
            raise ValueError(f"a stage1 PoseNet takes one frame per sample (t=1), got t={t}; use stage2")
        last = expect_shape(last, (b, 1, self.token_dim), "last-frame token")
        (pose, shape, trans), log_heatmaps = self.decoder.decode_token(
            rearrange(last, "b 1 d -> b d"), focal[:, -1], princpt[:, -1])

        def per_sample(x: torch.Tensor, width: int, name: str) -> torch.Tensor:
            return expect_shape(rearrange(x, "b d -> b 1 d"), (b, 1, width), name)

        mano = ManoParams(
            per_sample(pose, POSE_DIM, "pose"), per_sample(shape, SHAPE_DIM, "shape"), per_sample(trans, 3, "trans")
        )
        heatmaps = tuple(
            per_sample(h, len(c), f"log_heatmap_{axis}")
            for h, c, axis in zip(log_heatmaps, self.trans_bin_centers, "xyz")
        )
        return HandPrediction(mano, heatmaps)

    def predict_mano_param(
        self, img: torch.Tensor, bbox: torch.Tensor, focal: torch.Tensor, princpt: torch.Tensor,
        timestamp: torch.Tensor,
    ) -> HandPrediction:
        """img [b, t, 3, H, W], bbox [b, t, 4], focal/princpt [b, t, 2], timestamp [b, t] -> last frame [b, 1, ...]."""
        return self.refine_and_decode(self.encode_frames(img, bbox, focal, princpt), timestamp, focal, princpt)

    def predict_with_keypoints(
        self, img: torch.Tensor, bbox: torch.Tensor, focal: torch.Tensor, princpt: torch.Tensor,
        timestamp: torch.Tensor,
    ) -> tuple[HandPrediction, torch.Tensor]:
        """As :meth:`predict_mano_param`, plus the keypoint head's 2D joints of the last frame
        [b, 1, 21, 2] (crop pixels); needs ``aux_keypoints=True``."""
        if self.keypoint_head is None:
            raise RuntimeError("predict_with_keypoints needs a PoseNet built with aux_keypoints=True")
        tokens, features, log_heatmaps, _ = self._encode(img, bbox, focal, princpt)
        if log_heatmaps is not None:
            keypoints = self.keypoint_head.coordinates(log_heatmaps[:, -1])
        else:
            keypoints = self.keypoint_head(features[:, -1])
        return self.refine_and_decode(tokens, timestamp, focal, princpt), rearrange(keypoints, "b j c -> b 1 j c")

    def predict_with_heatmaps(
        self, img: torch.Tensor, bbox: torch.Tensor, focal: torch.Tensor, princpt: torch.Tensor,
        timestamp: torch.Tensor, joint_hint: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[HandPrediction, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """As :meth:`predict_with_keypoints`, plus the heatmap head's log-probabilities over its cells
        [b, 1, 21, K] (their centres: ``keypoint_head.cell_centres`` [K, 2]) and, with ``joint_depth``, the joints'
        relative depths [b, 1, 21] (else None); needs a CNN backbone. ``joint_hint``: see :meth:`_encode`."""
        if not self.has_heatmaps:
            raise RuntimeError("predict_with_heatmaps needs aux_keypoints=True and a CNN backbone (heatmap head)")
        tokens, _, log_heatmaps, depths = self._encode(img, bbox, focal, princpt, joint_hint)
        keypoints = self.keypoint_head.coordinates(log_heatmaps[:, -1])
        pred = self.refine_and_decode(tokens, timestamp, focal, princpt)
        return (pred, rearrange(keypoints, "b j c -> b 1 j c"), log_heatmaps[:, -1:],
                None if depths is None else depths[:, -1:])

    forward = predict_mano_param

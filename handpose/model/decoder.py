"""Hand decoder: a learned query cross-attends to ViT patch tokens and becomes one hand token per frame;
``decode_token`` maps a hand token to MANO pose (6D -> axis-angle), shape and binned camera translation.

The translation bins (the one source of truth for their centres) live here; the loss reads them from the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from common.rotations import axis_angle_to_rotation_6d, rotation_6d_to_axis_angle
from common.shapes import expect_shape

NUM_POSE_JOINTS = 16  # MANO: global orientation + 15 finger joints
POSE_DIM = NUM_POSE_JOINTS * 3
SHAPE_DIM = 10
TRANS_AXES = ("x", "y", "z")
CAMERA_FEATURE_DIM = 4


class ManoParams(NamedTuple):
    """MANO parameters; leading dims ``[...]`` are ``[n]`` from the decoder and ``[b, 1]`` from PoseNet."""

    pose: torch.Tensor  # [..., 48] axis-angle, global orientation first
    shape: torch.Tensor  # [..., 10]
    trans: torch.Tensor  # [..., 3] camera space, metres (MANO convention: verts = mano(pose, shape) + trans)


class HandPrediction(NamedTuple):
    """Unpacks as ``(pose, shape, trans), log_heatmaps``; ``log_heatmaps`` = x, y, z log-probabilities over bins."""

    mano: ManoParams
    log_heatmaps: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def make_bin_centers(trans_bins: Mapping[str, Mapping[str, float]]) -> tuple[torch.Tensor, ...]:
    """``{x: {min, max, num}, y: ..., z: ...}`` (metres) -> three float32 tensors of evenly spaced centres."""
    missing = [axis for axis in TRANS_AXES if axis not in trans_bins]
    if missing:
        raise KeyError(f"trans_bins: missing axes {missing}; expected {{x|y|z: {{min, max, num}}}}")
    centers = []
    for axis in TRANS_AXES:
        spec = trans_bins[axis]
        lo, hi, num = float(spec["min"]), float(spec["max"]), int(spec["num"])
        if not (hi > lo and num >= 2):
            raise ValueError(f"trans_bins.{axis}: need max > min and num >= 2, got {dict(spec)}")
        centers.append(torch.linspace(lo, hi, num))
    return tuple(centers)


def camera_features(focal: torch.Tensor, princpt: torch.Tensor, crop_hw: tuple[int, int]) -> torch.Tensor:
    """Crop intrinsics -> [..., 4]: ray through the crop centre and log angular crop size, per axis.

    focal [..., 2], princpt [..., 2] (crop pixels) -> [(W/2 - cx)/fx, (H/2 - cy)/fy, log(W/fx), log(H/fy)].
    For an axis-aligned crop these equal ((bbox centre - orig_princpt) / orig_focal, log(bbox size /
    orig_focal)): the direction of the hand and the metric scale of a crop pixel, which together make absolute
    translation recoverable from a crop.
    """
    h, w = crop_hw
    size = torch.tensor([w, h], dtype=focal.dtype, device=focal.device)
    direction = (size / 2 - princpt) / focal
    return torch.cat([direction, torch.log(size / focal)], dim=-1)


class PatchKeypointHead(nn.Module):
    """Dense 2D supervision for the backbone: per joint, a softmax over the patch tokens, and the expected patch
    centre (soft-argmax) is that joint's position in the crop.

    Regressing MANO from one pooled token teaches a small ViT trained from scratch little about where the fingers
    are; asking every patch whether a joint lies in it does (the reason hand models start from keypoint
    pretraining). Used as an auxiliary loss (``keypoints_2d``); MANO outputs do not depend on it.
    """

    def __init__(self, in_dim: int, grid_size: tuple[int, int], img_size: int, num_joints: int = 21) -> None:
        super().__init__()
        self.num_joints = num_joints
        self.logits = nn.Linear(in_dim, num_joints)
        gh, gw = grid_size
        ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        # centre of each patch in crop pixels (integer values at pixel centres, as the data's joints_2d)
        centres = (torch.stack([xs, ys], dim=-1).reshape(-1, 2).float() + 0.5) * (img_size / torch.tensor([gw, gh]))
        self.register_buffer("patch_centres", centres - 0.5, persistent=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches [n, N, in_dim] -> joints [n, num_joints, 2] (crop pixels, u then v)."""
        n = patches.shape[0]
        expect_shape(patches, (n, self.patch_centres.shape[0], None), "patch tokens")
        weights = F.softmax(self.logits(patches), dim=1)  # [n, N, J], over patches
        return torch.einsum("nkj,kc->njc", weights, self.patch_centres.to(weights.dtype))


class HandDecoder(nn.Module):
    """Query-token transformer decoder over image tokens, plus the MANO / translation heads.

    Args:
        in_dim, num_tokens: backbone token width and count (the decoder learns a position embedding per token).
        trans_bins: ``{x|y|z: {min, max, num}}`` translation bins in metres.
        dim, depth, heads, mlp_ratio, dropout: decoder transformer size.
    """

    def __init__(
        self,
        in_dim: int,
        num_tokens: int,
        trans_bins: Mapping[str, Mapping[str, float]],
        dim: int = 256,
        depth: int = 2,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_tokens = num_tokens
        self.token_proj = nn.Linear(in_dim, dim)
        self.token_pos = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.camera_embed = nn.Sequential(nn.Linear(CAMERA_FEATURE_DIM, dim), nn.GELU(), nn.Linear(dim, dim))
        layer = nn.TransformerDecoderLayer(
            dim, heads, int(dim * mlp_ratio), dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerDecoder(layer, depth, norm=nn.LayerNorm(dim))

        self.pose_head = nn.Linear(dim, NUM_POSE_JOINTS * 6)
        self.shape_head = nn.Linear(dim, SHAPE_DIM)
        for axis, centers in zip(TRANS_AXES, make_bin_centers(trans_bins)):
            self.register_buffer(f"bin_centers_{axis}", centers, persistent=False)  # config is the truth
        self.trans_heads = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, len(c))) for c in self.bin_centers
        )
        # Residual origin: MANO's mean hand (zero pose with flat_hand_mean=False, zero shape) until
        # set_mean_init replaces it with the training data's mean; persistent, so checkpoints carry it.
        self.register_buffer("init_pose_6d", axis_angle_to_rotation_6d(torch.zeros(NUM_POSE_JOINTS, 3)).flatten())
        self.register_buffer("init_shape", torch.zeros(SHAPE_DIM))
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.token_pos, std=0.02)
        nn.init.trunc_normal_(self.query, std=0.02)
        for head in (self.pose_head, self.shape_head):  # start at the mean hand
            nn.init.xavier_uniform_(head.weight, gain=0.01)
            nn.init.zeros_(head.bias)

    @torch.no_grad()
    def set_mean_init(self, pose: torch.Tensor, shape: torch.Tensor) -> None:
        """pose [48], shape [10] (e.g. the training data's mean) -> the residual origin of the heads."""
        expect_shape(pose, (POSE_DIM,), "mean-init pose")
        expect_shape(shape, (SHAPE_DIM,), "mean-init shape")
        self.init_pose_6d.copy_(axis_angle_to_rotation_6d(pose.unflatten(-1, (NUM_POSE_JOINTS, 3))).flatten())
        self.init_shape.copy_(shape)

    @property
    def bin_centers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Translation bin centres (metres) for x, y, z: [Bx], [By], [Bz]."""
        return self.bin_centers_x, self.bin_centers_y, self.bin_centers_z

    def forward(self, tokens: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
        """tokens [n, N, in_dim], camera [n, 4] (see camera_features) -> hand token [n, dim]."""
        n = tokens.shape[0]
        expect_shape(tokens, (n, self.num_tokens, None), "image tokens")
        expect_shape(camera, (n, CAMERA_FEATURE_DIM), "camera features")
        memory = self.token_proj(tokens) + self.token_pos
        query = self.query.expand(n, -1, -1) + self.camera_embed(camera)[:, None]
        return self.blocks(query, memory)[:, 0]

    def decode_token(self, token: torch.Tensor) -> HandPrediction:
        """token [n, dim] -> (pose [n, 48], shape [n, 10], trans [n, 3]), log_heatmaps (x [n, Bx], y [n, By], z [n, Bz])."""
        n = token.shape[0]
        expect_shape(token, (n, self.dim), "hand token")
        pose_6d = (self.init_pose_6d + self.pose_head(token)).unflatten(-1, (NUM_POSE_JOINTS, 6))
        pose = rotation_6d_to_axis_angle(pose_6d).flatten(-2)
        shape = self.init_shape + self.shape_head(token)
        log_heatmaps = tuple(F.log_softmax(head(token), dim=-1) for head in self.trans_heads)
        # trans is the expectation over bin centres, so it always agrees with the heatmaps.
        trans = torch.stack([(lh.exp() * c).sum(-1) for lh, c in zip(log_heatmaps, self.bin_centers)], dim=-1)
        return HandPrediction(ManoParams(pose, shape, trans), log_heatmaps)

"""2D keypoint heads: a softmax over the patch tokens (ViT) or stride-4 heatmaps (CNN, optionally with each joint's
relative depth), and the factory that picks the one that fits the backbone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.shapes import expect_shape

from .backbone import CNNBackbone


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


class HeatmapKeypointHead(nn.Module):
    """Pixel-aligned 2D joints from a dense feature map: per joint, a softmax over the map's cells and the
    expected cell centre (integral regression, Sun et al. 2018). At stride 4 a 128 px crop gives a 32 x 32
    heatmap per joint: a far denser signal for the backbone than an 8 x 8 patch grid.
    """

    def __init__(self, in_dim: int, stride: int, img_size: int, num_joints: int = 21, hidden: int = 64,
                 depth: bool = False) -> None:
        super().__init__()
        if img_size % stride:
            raise ValueError(f"heatmap stride {stride} does not divide the crop size {img_size}")
        self.num_joints = num_joints
        self.img_size = img_size
        self.grid = img_size // stride
        self.logits = nn.Sequential(nn.Conv2d(in_dim, hidden, 3, padding=1), nn.ReLU(inplace=True),
                                    nn.Conv2d(hidden, num_joints, 1))
        # depth: one map per joint beside its heatmap; the joint's depth is the map read under its heatmap
        # (2.5D joints, Iqbal et al. 2018), in the units of :meth:`relative_depths`.
        self.depth_maps = nn.Conv2d(hidden, num_joints, 1) if depth else None
        cells = (torch.arange(self.grid, dtype=torch.float32) + 0.5) * stride - 0.5  # crop pixels, centres
        ys, xs = torch.meshgrid(cells, cells, indexing="ij")
        self.register_buffer("cell_centres", torch.stack([xs, ys], dim=-1).reshape(-1, 2), persistent=False)

    def log_heatmaps(self, dense: torch.Tensor) -> torch.Tensor:
        """dense [n, C, g, g] -> per-joint log-probabilities over the cells [n, J, g * g]."""
        return self.maps(dense)[0]

    def maps(self, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """dense [n, C, g, g] -> (log-heatmaps [n, J, g * g], joint depths [n, J] read under them, or None without
        ``depth``)."""
        n = dense.shape[0]
        expect_shape(dense, (n, None, self.grid, self.grid), "dense features")
        hidden = self.logits[:-1](dense)
        log_heatmaps = F.log_softmax(self.logits[-1](hidden).flatten(2), dim=-1)
        if self.depth_maps is None:
            return log_heatmaps, None
        depths = torch.einsum("njk,njk->nj", log_heatmaps.exp(), self.depth_maps(hidden).flatten(2))
        return log_heatmaps, depths

    @staticmethod
    def relative_depths(joints_cam: torch.Tensor, focal: torch.Tensor, img_size: int) -> torch.Tensor:
        """joints [..., J, 3] camera space, focal [..., 2] (crop pixels) -> each joint's depth behind the wrist in
        crop sides at the wrist's depth, ``(Z - Z_wrist) / Z_wrist * f / S`` [..., J]: the units of
        :meth:`relative_positions`, so (position, depth) is the hand's 3D shape, free of its distance."""
        z = joints_cam[..., 2]
        wrist = z[..., :1].clamp(min=1e-3)
        return (z - wrist) / wrist * focal.mean(dim=-1, keepdim=True) / img_size

    def coordinates(self, log_heatmaps: torch.Tensor) -> torch.Tensor:
        """log-probabilities [n, J, g * g] -> expected joint positions [n, J, 2] (crop pixels, u then v)."""
        prob = log_heatmaps.exp()
        return torch.einsum("njk,kc->njc", prob, self.cell_centres.to(prob.dtype))

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        """dense [n, C, g, g] -> joints [n, num_joints, 2] (crop pixels, u then v)."""
        return self.coordinates(self.log_heatmaps(dense))

    @staticmethod
    def relative_positions(joints_2d: torch.Tensor, img_size: int) -> torch.Tensor:
        """joints [..., J, 2] crop pixels -> the wrist in [-0.5, 0.5] and the others relative to it (crop sides)."""
        position = (joints_2d + 0.5) / img_size - 0.5
        return torch.cat([position[..., :1, :], position[..., 1:, :] - position[..., :1, :]], dim=-2)

    def joint_features(self, dense: torch.Tensor, log_heatmaps: torch.Tensor,
                       hint: tuple[torch.Tensor, torch.Tensor] | None = None,
                       depths: torch.Tensor | None = None) -> torch.Tensor:
        """dense [n, C, g, g], log_heatmaps [n, J, g * g] -> per joint [n, J, C + 2] (with ``depths`` [n, J]:
        [n, J, C + 3]): the dense features pooled under the joint's heatmap, and its expected position: the wrist's
        in the crop (in [-0.5, 0.5]), the others' relative to the wrist (crop sides), then its relative depth.
        ``hint`` = (joints [n, J, 2] crop pixels, use [n] bool): those samples' positions are the given joints
        instead of the heatmaps' (training on noisy ground truth)."""
        prob = log_heatmaps.exp()
        pooled = torch.einsum("njk,nck->njc", prob, dense.flatten(2).to(prob.dtype))
        joints = self.coordinates(log_heatmaps)
        if hint is not None:
            given, use = hint
            expect_shape(given, tuple(joints.shape), "joint hint")
            expect_shape(use, (joints.shape[0],), "joint hint mask")
            joints = torch.where(use[:, None, None], given.to(joints.dtype), joints)
        parts = [pooled, self.relative_positions(joints, self.img_size)]
        if depths is not None:
            expect_shape(depths, tuple(joints.shape[:2]), "joint depths")
            parts.append(depths[..., None].to(prob.dtype))
        return torch.cat(parts, dim=-1)


def make_keypoint_head(backbone: nn.Module, depth: bool = False) -> nn.Module:
    """The auxiliary 2D keypoint head that fits the backbone's features: heatmaps on a CNN's dense map (with
    ``depth``, also each joint's relative depth), a softmax over the patch tokens on a ViT."""
    if isinstance(backbone, CNNBackbone):
        return HeatmapKeypointHead(backbone.dense_dim, backbone.dense_stride, backbone.img_size, depth=depth)
    if depth:
        raise ValueError("model.net.decoder.joint_depth needs a CNN backbone (the heatmap head)")
    return PatchKeypointHead(backbone.embed_dim, backbone.grid_size, backbone.img_size)

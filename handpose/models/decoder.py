"""Hand decoder: a learned query cross-attends to the backbone's tokens and becomes one hand token per frame;
``decode_token`` maps a hand token to MANO pose (6D -> axis-angle), shape and binned translation.

The translation bins are :class:`handpose.models.translation.TranslationBins`; the 2D keypoint heads whose joints
the decoder may read are in ``handpose.models.keypoints``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from common.rotations import axis_angle_to_rotation_6d, rotation_6d_to_axis_angle
from common.shapes import expect_shape

from .translation import CAMERA_FEATURE_DIM, TranslationBins

NUM_POSE_JOINTS = 16  # MANO: global orientation + 15 finger joints
ROOT_DIM = 6  # the global orientation's 6D rotation
POSE_DIM = NUM_POSE_JOINTS * 3
SHAPE_DIM = 10
JOINT_DEPTH_MODES = (False, None, True, "aux", "input")  # decoder.joint_depth (true = "input")


class ManoParams(NamedTuple):
    """MANO parameters; leading dims ``[...]`` are ``[n]`` from the decoder and ``[b, 1]`` from PoseNet."""

    pose: torch.Tensor  # [..., 48] axis-angle, global orientation first
    shape: torch.Tensor  # [..., 10]
    trans: torch.Tensor  # [..., 3] camera space, metres (MANO convention: verts = mano(pose, shape) + trans)


class HandPrediction(NamedTuple):
    """Unpacks as ``(pose, shape, trans), log_heatmaps``; ``log_heatmaps`` = x, y, z log-probabilities over bins."""

    mano: ManoParams
    log_heatmaps: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class HandDecoder(nn.Module):
    """Query-token transformer decoder over image tokens, plus the MANO / translation heads.

    Args:
        in_dim, num_tokens: backbone token width and count (the decoder learns a position embedding per token).
        trans_bins: ``{x|y|z: {min, max, num}}`` translation bins (see :class:`TranslationBins`).
        trans_space: ``camera`` (bins in metres) or ``crop`` (root joint in crop pixels and log depth ratio).
        img_size: crop side in pixels; mano_model_path: MANO files for the root joint (None = procedural).
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
        trans_space: str = "camera",
        img_size: int = 128,
        mano_model_path: str | None = None,
        joint_tokens: bool = False,
        joint_in_dim: int = 0,
        num_joints: int = 21,
        num_queries: int = 1,
        joint_mlp: int = 0,
        finger_token: int = 0,
        finger_features: int = 0,
        joint_depth: bool | str = False,
        head_init_gain: float = 0.01,
        joint_root: bool = False,
        joint_distance: bool = False,
    ) -> None:
        super().__init__()
        # Per joint: its crop position (2) and, with joint_depth "input" (or true), its relative depth
        # (HeatmapKeypointHead); "aux": the heatmap head reads depths for their loss term only, the decoder not.
        if joint_depth not in JOINT_DEPTH_MODES:
            raise ValueError(f"model.net.decoder.joint_depth: {joint_depth!r} is not one of false, 'aux', 'input'")
        self.joint_depth = joint_depth in (True, "input")
        self.joint_coords = 3 if self.joint_depth else 2
        self.head_init_gain = head_init_gain
        self.dim = dim
        self.num_queries = num_queries
        self.num_tokens = num_tokens
        self.token_proj = nn.Linear(in_dim, dim)
        self.token_pos = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.joint_tokens = joint_tokens
        self.joint_mlp = joint_mlp
        if finger_token and not joint_mlp:
            raise ValueError("model.net.decoder.finger_token needs joint_mlp > 0 (the finger token is its output)")
        self.finger_token = finger_token
        # The hand token: the query decoder's output, with finger_token the joint MLP's output beside it, and with
        # joint_root the root MLP's 6D orientation residual last.
        self.token_dim = dim + finger_token + (ROOT_DIM if joint_root else 0)
        self.num_joints = num_joints
        self.joint_in_dim = joint_in_dim
        if joint_tokens:  # one more memory token per joint: heatmap-pooled features and position
            self.joint_proj = nn.Linear(joint_in_dim + self.joint_coords, dim)
            self.joint_embed = nn.Parameter(torch.zeros(1, num_joints, dim))
        if joint_mlp:
            # All joints' features at once through an MLP, added to the hand token. Attention reads weighted
            # averages of the memory, which loses where each finger is; an MLP on the 21 stacked joint positions
            # learns articulation in a few hundred steps (val PA-MPJPE 11.6 mm from GT 2D joints in 500 steps,
            # where the query decoder stayed at the mean pose's 19.5).
            # Positions only: it can also be trained on annotations without images (HandPoseLit's lift batch).
            # finger_token > 0: its output is a token part of its own that alone gives the finger articulation
            # (the image token only the global orientation, shape and translation). Added to the image token
            # instead, the pose head learnt the fingers from neither (train PA-MPJPE 16.2 mm, val 17.0, against
            # 19.2 for the mean fingers), while this MLP alone learns them from 2D joints in a few hundred steps.
            self.joint_mlp_net = nn.Sequential(
                nn.Linear(num_joints * self.joint_coords, joint_mlp), nn.GELU(), nn.Linear(joint_mlp, joint_mlp),
                nn.GELU(), nn.Linear(joint_mlp, finger_token or dim))
        if finger_features and not finger_token:
            raise ValueError("model.net.decoder.finger_features needs finger_token > 0")
        self.finger_features = finger_features
        if finger_features:
            # The joints' heatmap-pooled image features, added to the finger token: what 2D positions cannot say
            # (whether a finger bends towards or away from the camera). Zero-initialised output, so the finger
            # token starts as the position MLP's (which the image-free lift batch trains alone).
            self.finger_feature_net = nn.Sequential(
                nn.Linear(num_joints * joint_in_dim, finger_features), nn.GELU(),
                nn.Linear(finger_features, finger_token))
            nn.init.zeros_(self.finger_feature_net[-1].weight)
            nn.init.zeros_(self.finger_feature_net[-1].bias)
        if joint_root and not finger_token:
            raise ValueError("model.net.decoder.joint_root needs finger_token > 0 (its residual is a part of the hand "
                             "token beside the finger token's)")
        self.joint_root = joint_root
        if joint_root:
            # The global orientation from the 2D joints too, added to the image token's estimate: a hand tilted out
            # of the image plane shows in its 2D joints (foreshortening, perspective). An MLP of its own on the
            # joint positions (detached: the heatmaps learn from their own loss), so the finger MLP keeps its
            # capacity; the image-free lift batch trains it every step. Its 6D residual is the hand token's last
            # part (Stage 2 refines it with the rest). Zero-initialised output: it starts as the image's.
            self.joint_root_net = nn.Sequential(
                nn.Linear(num_joints * self.joint_coords, joint_mlp), nn.GELU(), nn.Linear(joint_mlp, joint_mlp),
                nn.GELU(), nn.Linear(joint_mlp, ROOT_DIM))
            nn.init.zeros_(self.joint_root_net[-1].weight)
            nn.init.zeros_(self.joint_root_net[-1].bias)
        self.query = nn.Parameter(torch.zeros(1, num_queries, dim))
        # Several queries can each read another part of the hand; their outputs are merged into one hand token
        # (one query reads a weighted average of the tokens per head and layer: too narrow for articulation).
        self.merge = nn.Linear(num_queries * dim, dim) if num_queries > 1 else nn.Identity()
        self.camera_embed = nn.Sequential(nn.Linear(CAMERA_FEATURE_DIM, dim), nn.GELU(), nn.Linear(dim, dim))
        layer = nn.TransformerDecoderLayer(
            dim, heads, int(dim * mlp_ratio), dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerDecoder(layer, depth, norm=nn.LayerNorm(dim))

        d = dim + finger_token  # the heads read the image and finger parts; the root residual adds to the root
        # finger_token: pose_head gives the global orientation only, finger_head the 15 finger joints.
        self.pose_head = nn.Linear(d, 6 if finger_token else NUM_POSE_JOINTS * 6)
        self.finger_head = nn.Linear(finger_token, (NUM_POSE_JOINTS - 1) * 6) if finger_token else None
        self.shape_head = nn.Linear(d, SHAPE_DIM)
        self.translation = TranslationBins(trans_bins, trans_space, img_size, mano_model_path)
        self.trans_heads = nn.ModuleList(
            nn.Sequential(nn.Linear(d, dim), nn.GELU(), nn.Linear(dim, len(c))) for c in self.bin_centers
        )
        if joint_distance and not finger_token:
            raise ValueError("model.net.decoder.joint_distance needs finger_token > 0 (it reads the finger token)")
        self.joint_distance = joint_distance
        if joint_distance:
            # The hand's distance (the depth bins' logits) also from the finger token, added to the image token's:
            # the 2D joints show the hand's pose and tilt, hence its extent in the crop for a typical hand size;
            # the lift batch trains it every step. Zero-initialised output: it starts as the image's.
            self.joint_distance_head = nn.Sequential(
                nn.Linear(finger_token, dim), nn.GELU(), nn.Linear(dim, len(self.bin_centers[2])))
            nn.init.zeros_(self.joint_distance_head[-1].weight)
            nn.init.zeros_(self.joint_distance_head[-1].bias)
        # Residual origin: MANO's mean hand (zero pose with flat_hand_mean=False, zero shape) until
        # set_mean_init replaces it with the training data's mean; persistent, so checkpoints carry it.
        self.register_buffer("init_pose_6d", axis_angle_to_rotation_6d(torch.zeros(NUM_POSE_JOINTS, 3)).flatten())
        self.register_buffer("init_shape", torch.zeros(SHAPE_DIM))
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.token_pos, std=0.02)
        nn.init.trunc_normal_(self.query, std=0.02)
        if self.joint_tokens:
            nn.init.trunc_normal_(self.joint_embed, std=0.02)
        heads = (self.pose_head, self.shape_head, *((self.finger_head,) if self.finger_head is not None else ()))
        for head in heads:  # start near the mean hand
            nn.init.xavier_uniform_(head.weight, gain=self.head_init_gain)
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
        """Translation bin centres for x, y, z: [Bx], [By], [Bz] (in the space of ``self.translation``)."""
        return self.translation.centers

    def forward(self, tokens: torch.Tensor, camera: torch.Tensor, joints: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [n, N, in_dim], camera [n, 4] (see camera_features), joints [n, J, joint_in_dim + 2] (with
        ``joint_tokens``; see HeatmapKeypointHead.joint_features) -> hand token [n, dim]."""
        n = tokens.shape[0]
        expect_shape(tokens, (n, self.num_tokens, None), "image tokens")
        expect_shape(camera, (n, CAMERA_FEATURE_DIM), "camera features")
        memory = self.token_proj(tokens) + self.token_pos
        if self.uses_joints:
            if joints is None:
                raise ValueError("HandDecoder(joint_tokens / joint_mlp) needs the joint features")
            expect_shape(joints, (n, self.num_joints, self.joint_in_dim + self.joint_coords), "joint features")
        if self.joint_tokens:
            memory = torch.cat([memory, self.joint_proj(joints) + self.joint_embed], dim=1)
        query = self.query.expand(n, -1, -1) + self.camera_embed(camera)[:, None]
        token = self.merge(self.blocks(query, memory).flatten(1))
        if self.finger_token:
            finger = self.lift_token(joints[..., -self.joint_coords:])
            if self.finger_features:
                finger = finger + self.finger_feature_net(joints[..., :-self.joint_coords].flatten(1))
            if self.joint_root:
                return torch.cat([token, finger, self.root_from_joints(joints[..., -self.joint_coords:])], dim=-1)
            return torch.cat([token, finger], dim=-1)
        if self.joint_mlp:
            token = token + self.lift_token(joints[..., -self.joint_coords:])
        return token

    def root_from_joints(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [n, J, 2] (as :meth:`lift_token`) -> the root MLP's 6D orientation residual [n, 6] (the hand
        token's last part; no gradient into the positions); needs ``joint_root``."""
        if not self.joint_root:
            raise RuntimeError("root_from_joints needs a HandDecoder with joint_root=True")
        n = positions.shape[0]
        expect_shape(positions, (n, self.num_joints, self.joint_coords), "joint positions")
        return self.joint_root_net(positions.detach().flatten(1))

    def lift_token(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [n, J, 2] (the wrist in the crop in [-0.5, 0.5], the others relative to it, as in
        HeatmapKeypointHead.joint_features; with ``joint_depth`` [n, J, 3], the relative depth third) -> the joint
        MLP's part of the hand token: [n, finger_token] (the finger token) or [n, dim] (added to the image token)."""
        n = positions.shape[0]
        expect_shape(positions, (n, self.num_joints, self.joint_coords), "joint positions")
        return self.joint_mlp_net(positions.flatten(1))

    def output_heads(self) -> list[nn.Module]:
        """What turns the hand token into MANO parameters: the pose (or root), finger, shape and translation heads."""
        return [self.pose_head, *((self.finger_head,) if self.finger_head is not None else ()),
                *((self.joint_root_net,) if self.joint_root else ()),
                *((self.joint_distance_head,) if self.joint_distance else ()), self.shape_head, self.trans_heads]

    def decode_fingers(self, finger_token: torch.Tensor) -> torch.Tensor:
        """finger token [n, finger_token] -> the 15 finger joints' axis-angles [n, 45] (MANO order, the pose's
        last 45 values); needs ``finger_token > 0``."""
        if self.finger_head is None:
            raise RuntimeError("decode_fingers needs a HandDecoder with finger_token > 0")
        n = finger_token.shape[0]
        expect_shape(finger_token, (n, self.finger_token), "finger token")
        init = self.init_pose_6d.unflatten(-1, (NUM_POSE_JOINTS, 6))[1:].flatten()
        pose_6d = (init + self.finger_head(finger_token)).unflatten(-1, (NUM_POSE_JOINTS - 1, 6))
        return rotation_6d_to_axis_angle(pose_6d).flatten(-2)

    def decode_joint_root(self, root_part: torch.Tensor) -> torch.Tensor:
        """The root MLP's 6D residual [n, 6] (:meth:`root_from_joints`) -> the global orientation it gives alone,
        axis-angle [n, 3] (what the lift batch supervises; images add the image token's part, :meth:`decode_token`)."""
        n = root_part.shape[0]
        expect_shape(root_part, (n, ROOT_DIM), "root residual")
        return rotation_6d_to_axis_angle(self.init_pose_6d[:ROOT_DIM] + root_part)

    def decode_joint_distance(self, finger_token: torch.Tensor) -> torch.Tensor:
        """finger token [n, finger_token] -> log-probabilities [n, Bz] over the depth bins read from it alone (what
        the lift batch supervises; images add the image token's logits, :meth:`decode_token`); needs
        ``joint_distance``."""
        if not self.joint_distance:
            raise RuntimeError("decode_joint_distance needs a HandDecoder with joint_distance=True")
        n = finger_token.shape[0]
        expect_shape(finger_token, (n, self.finger_token), "finger token")
        return F.log_softmax(self.joint_distance_head(finger_token), dim=-1)

    @property
    def uses_joints(self) -> bool:
        """Whether the decoder reads the heatmap head's joint features (joint_tokens or joint_mlp)."""
        return bool(self.joint_tokens or self.joint_mlp)

    def decode_token(self, token: torch.Tensor, focal: torch.Tensor, princpt: torch.Tensor) -> HandPrediction:
        """token [n, dim], focal / princpt [n, 2] (crop pixels) -> (pose [n, 48], shape [n, 10], trans [n, 3]),
        log_heatmaps (x [n, Bx], y [n, By], z [n, Bz])."""
        n = token.shape[0]
        expect_shape(token, (n, self.token_dim), "hand token")
        expect_shape(focal, (n, 2), "focal")
        expect_shape(princpt, (n, 2), "princpt")
        heads_in = token[:, : self.dim + self.finger_token]  # without the root residual (joint_root)
        finger = token[:, self.dim: self.dim + self.finger_token]
        if self.finger_head is not None:  # the root from the whole token, the fingers from the finger token
            root_6d = self.init_pose_6d[:ROOT_DIM] + self.pose_head(heads_in)
            if self.joint_root:
                root_6d = root_6d + token[:, -ROOT_DIM:]
            pose = torch.cat([rotation_6d_to_axis_angle(root_6d), self.decode_fingers(finger)], dim=-1)
        else:
            pose_6d = (self.init_pose_6d + self.pose_head(heads_in)).unflatten(-1, (NUM_POSE_JOINTS, 6))
            pose = rotation_6d_to_axis_angle(pose_6d).flatten(-2)
        shape = self.init_shape + self.shape_head(heads_in)
        logits = [head(heads_in) for head in self.trans_heads]
        if self.joint_distance:
            logits[2] = logits[2] + self.joint_distance_head(finger)
        log_heatmaps = tuple(F.log_softmax(x, dim=-1) for x in logits)
        # trans comes from the expectation over bin centres, so it always agrees with the heatmaps.
        values = torch.stack([(lh.exp() * c).sum(-1) for lh, c in zip(log_heatmaps, self.bin_centers)], dim=-1)
        trans = self.translation.decode(values, shape, focal, princpt)
        return HandPrediction(ManoParams(pose, shape, trans), log_heatmaps)

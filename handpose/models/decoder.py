"""Hand decoder: a learned query cross-attends to the backbone's tokens and becomes one hand token per frame;
``decode_token`` maps a hand token to MANO pose (6D -> axis-angle), shape and binned translation.

The translation bins (the one source of truth for their centres and meaning) live here in
:class:`TranslationBins`; the loss reads them from the model, and checkpoints carry them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from common.mano import load_mano_arrays
from common.rotations import axis_angle_to_rotation_6d, rotation_6d_to_axis_angle
from common.shapes import expect_shape

from .backbone import CNNBackbone

NUM_POSE_JOINTS = 16  # MANO: global orientation + 15 finger joints
POSE_DIM = NUM_POSE_JOINTS * 3
SHAPE_DIM = 10
TRANS_AXES = ("x", "y", "z")
CAMERA_FEATURE_DIM = 4
TRANS_SPACES = ("camera", "crop")
JOINT_DEPTH_MODES = (False, None, True, "aux", "input")  # decoder.joint_depth (true = "input")
CROP_DEPTH_REF_M = 0.2  # crop space: z is binned as log(z / z_ref), z_ref = depth at which 0.2 m spans the crop


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


class TranslationBins(nn.Module):
    """Per-axis translation bins and the map between bin space and MANO's camera-space ``trans``.

    ``space="camera"``: the bins are MANO ``trans`` itself, x / y / z in metres.
    ``space="crop"``: the bins are where the root joint (the wrist) lies in the crop, ``u / S`` and ``v / S``
    (crop pixels over the crop side ``S``), and its depth as ``log(z / z_ref)`` with ``z_ref = f * 0.2 m / S``
    (``f`` the crop's mean focal length). All three are read off the crop alone; the real intrinsics turn them
    into metres: ``z = z_ref e^c``, ``X = (u - cx) z / fx``, ``Y = (v - cy) z / fy``, and
    ``trans = root - J0(shape)`` with MANO's rest-pose root joint ``J0`` (linear in the shape).
    In camera space the network must learn depth as a product of the crop's scale and what it sees.

    Centres, space and the MANO root regressor are persistent buffers: a checkpoint carries what its
    translation outputs mean, and loading it into bins of another configuration is an error.
    """

    def __init__(self, bins: Mapping[str, Mapping[str, float]], space: str = "camera", img_size: int = 128,
                 mano_model_path: str | None = None) -> None:
        super().__init__()
        if space not in TRANS_SPACES:
            raise ValueError(f"trans_space: {space!r} is not one of {TRANS_SPACES}")
        self.space = space
        self.img_size = int(img_size)
        for axis, centers in zip(TRANS_AXES, make_bin_centers(bins)):
            self.register_buffer(f"centers_{axis}", centers)
        self.register_buffer("space_code", torch.tensor(TRANS_SPACES.index(space)))
        arrays = load_mano_arrays(mano_model_path, side="right")
        root_row = torch.as_tensor(arrays["J_regressor"][0], dtype=torch.float64)  # [778]
        self.register_buffer("rest_root", (root_row @ torch.as_tensor(arrays["v_template"])).float())  # [3]
        dirs = torch.einsum("v,vcs->cs", root_row, torch.as_tensor(arrays["shapedirs"], dtype=torch.float64))
        self.register_buffer("rest_root_dirs", dirs[:, :SHAPE_DIM].float())  # [3, 10]

    @property
    def centers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bin centres of the three axes: [Bx], [By], [Bz]."""
        return self.centers_x, self.centers_y, self.centers_z

    def root_joint(self, shape: torch.Tensor) -> torch.Tensor:
        """shape [..., 10] -> MANO's rest-pose root joint J0 [..., 3] (the global rotation turns about it)."""
        return self.rest_root.to(shape.dtype) + shape @ self.rest_root_dirs.to(shape.dtype).T

    def _z_ref(self, focal: torch.Tensor) -> torch.Tensor:
        return focal.mean(dim=-1) * CROP_DEPTH_REF_M / self.img_size

    def encode(self, trans: torch.Tensor, root: torch.Tensor, focal: torch.Tensor, princpt: torch.Tensor) -> torch.Tensor:
        """trans [..., 3] (MANO), root [..., 3] (camera-space wrist), focal / princpt [..., 2] (crop) -> bin
        space [..., 3]: the classification target."""
        if self.space == "camera":
            return trans
        z = root[..., 2].clamp(min=1e-3)
        uv = root[..., :2] / z[..., None] * focal + princpt
        return torch.cat([uv / self.img_size, torch.log(z / self._z_ref(focal))[..., None]], dim=-1)

    def decode(self, values: torch.Tensor, shape: torch.Tensor, focal: torch.Tensor, princpt: torch.Tensor) -> torch.Tensor:
        """values [..., 3] (bin space), shape [..., 10], focal / princpt [..., 2] (crop) -> MANO trans [..., 3]."""
        if self.space == "camera":
            return values
        z = self._z_ref(focal) * torch.exp(values[..., 2])
        xy = (values[..., :2] * self.img_size - princpt) / focal * z[..., None]
        return torch.cat([xy, z[..., None]], dim=-1) - self.root_joint(shape)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        for name in ("space_code", "centers_x", "centers_y", "centers_z"):
            saved = state_dict.get(prefix + name)
            mine = getattr(self, name)
            if saved is not None and (saved.shape != mine.shape or not torch.allclose(saved.float(), mine.float())):
                saved_space = TRANS_SPACES[int(state_dict[prefix + "space_code"])] if prefix + "space_code" in state_dict else "?"
                raise ValueError(
                    f"translation bins: the weights were trained with {name} = {_describe(saved)} (space "
                    f"{saved_space!r}), this model is configured with {_describe(mine)} (space {self.space!r}); "
                    "set model.net.decoder.trans_bins / trans_space to the checkpoint's values")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _describe(t: torch.Tensor) -> str:
    if t.ndim == 0:
        return str(int(t))
    return f"{len(t)} bins {float(t[0]):.4g}..{float(t[-1]):.4g}"


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
        # The hand token: the query decoder's output, and with finger_token the joint MLP's output beside it.
        self.token_dim = dim + finger_token
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
        self.query = nn.Parameter(torch.zeros(1, num_queries, dim))
        # Several queries can each read another part of the hand; their outputs are merged into one hand token
        # (one query reads a weighted average of the tokens per head and layer: too narrow for articulation).
        self.merge = nn.Linear(num_queries * dim, dim) if num_queries > 1 else nn.Identity()
        self.camera_embed = nn.Sequential(nn.Linear(CAMERA_FEATURE_DIM, dim), nn.GELU(), nn.Linear(dim, dim))
        layer = nn.TransformerDecoderLayer(
            dim, heads, int(dim * mlp_ratio), dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerDecoder(layer, depth, norm=nn.LayerNorm(dim))

        d = self.token_dim
        # finger_token: pose_head gives the global orientation only, finger_head the 15 finger joints.
        self.pose_head = nn.Linear(d, 6 if finger_token else NUM_POSE_JOINTS * 6)
        self.finger_head = nn.Linear(finger_token, (NUM_POSE_JOINTS - 1) * 6) if finger_token else None
        self.shape_head = nn.Linear(d, SHAPE_DIM)
        self.translation = TranslationBins(trans_bins, trans_space, img_size, mano_model_path)
        self.trans_heads = nn.ModuleList(
            nn.Sequential(nn.Linear(d, dim), nn.GELU(), nn.Linear(dim, len(c))) for c in self.bin_centers
        )
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
            return torch.cat([token, finger], dim=-1)
        if self.joint_mlp:
            token = token + self.lift_token(joints[..., -self.joint_coords:])
        return token

    def lift_token(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [n, J, 2] (the wrist in the crop in [-0.5, 0.5], the others relative to it, as in
        HeatmapKeypointHead.joint_features; with ``joint_depth`` [n, J, 3], the relative depth third) -> the joint
        MLP's part of the hand token: [n, finger_token] (the finger token) or [n, dim] (added to the image token)."""
        n = positions.shape[0]
        expect_shape(positions, (n, self.num_joints, self.joint_coords), "joint positions")
        return self.joint_mlp_net(positions.flatten(1))

    def output_heads(self) -> list[nn.Module]:
        """What turns the hand token into MANO parameters: the pose (or root), finger, shape and translation heads."""
        return [self.pose_head, *((self.finger_head,) if self.finger_head is not None else ()), self.shape_head,
                self.trans_heads]

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
        if self.finger_head is not None:  # the root from the whole token, the fingers from the finger token
            root_6d = self.init_pose_6d[:6] + self.pose_head(token)
            pose = torch.cat([rotation_6d_to_axis_angle(root_6d), self.decode_fingers(token[:, self.dim:])], dim=-1)
        else:
            pose_6d = (self.init_pose_6d + self.pose_head(token)).unflatten(-1, (NUM_POSE_JOINTS, 6))
            pose = rotation_6d_to_axis_angle(pose_6d).flatten(-2)
        shape = self.init_shape + self.shape_head(token)
        log_heatmaps = tuple(F.log_softmax(head(token), dim=-1) for head in self.trans_heads)
        # trans comes from the expectation over bin centres, so it always agrees with the heatmaps.
        values = torch.stack([(lh.exp() * c).sum(-1) for lh, c in zip(log_heatmaps, self.bin_centers)], dim=-1)
        trans = self.translation.decode(values, shape, focal, princpt)
        return HandPrediction(ManoParams(pose, shape, trans), log_heatmaps)


def make_keypoint_head(backbone: nn.Module, depth: bool = False) -> nn.Module:
    """The auxiliary 2D keypoint head that fits the backbone's features: heatmaps on a CNN's dense map (with
    ``depth``, also each joint's relative depth), a softmax over the patch tokens on a ViT."""
    if isinstance(backbone, CNNBackbone):
        return HeatmapKeypointHead(backbone.dense_dim, backbone.dense_stride, backbone.img_size, depth=depth)
    if depth:
        raise ValueError("model.net.decoder.joint_depth needs a CNN backbone (the heatmap head)")
    return PatchKeypointHead(backbone.embed_dim, backbone.grid_size, backbone.img_size)

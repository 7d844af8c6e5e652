"""Binned translation: the bin centres (the one source of truth for their meaning: checkpoints carry them, the loss
reads them from the model), the crop / camera spaces they live in, and the camera features a crop needs to make
absolute translation recoverable."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from common.mano import load_mano_arrays
from common.mano_topology import NUM_BETAS

TRANS_AXES = ("x", "y", "z")
CAMERA_FEATURE_DIM = 4
TRANS_SPACES = ("camera", "crop")
CROP_DEPTH_REF_M = 0.2  # crop space: z is binned as log(z / z_ref), z_ref = depth at which 0.2 m spans the crop


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
        self.register_buffer("rest_root_dirs", dirs[:, :NUM_BETAS].float())  # [3, 10]

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

"""The body-mesh hook of the gesture video: a ``MeshBackend`` protocol, the MHR body (when its package and assets
exist) and a small z-buffered point splatter that draws camera-space vertices."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from common.geometry import vertex_normals
from gesture.layout import ClipConstants, unpack


class MeshBackend(Protocol):
    """Anything that turns frames into camera-space vertices (metres, x right, y down, z forward)."""

    faces: np.ndarray  # [F, 3] int

    def vertices(self, motion: np.ndarray, constants: ClipConstants,
                 model_params: np.ndarray | None = None) -> np.ndarray:
        """``motion [T, 320]`` raw -> ``[T, V, 3]``."""
        ...


ToModelParams = Callable[[Mapping[str, torch.Tensor], ClipConstants], torch.Tensor]


class MHRBackend:
    """The MHR body (``mhr`` package + pymomentum + asset folder; none of them exist in CI, so this is a hook).

    ``MHR.from_files(folder, device, lod=1)`` and ``forward(identity [B, 45], model_params [B, 204],
    face_expr [B, 72]) -> (vertices in cm, skeleton state [B, 127, 8])``. ``model_params`` need SAM-3D-Body's head
    buffers (hand PCA, scale components) to be built from our layout: pass ``to_model_params`` (``unpack``-ed frames
    as tensors, constants -> ``[T, 204]``), or give ``model_params`` per call (e.g. ``mhr_model_params`` saved in
    the result npz). Vertices are flipped to the camera system (y, z negated, as SAM-3D-Body) and moved by cam_t.
    """

    def __init__(self, asset_folder: str | Path, device: str = "cpu", lod: int = 1,
                 to_model_params: ToModelParams | None = None) -> None:
        try:
            from mhr.mhr import MHR
        except ImportError as err:
            raise RuntimeError(f"MHR rendering needs the `mhr` package and pymomentum ({err})") from err
        folder = Path(asset_folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"MHR asset folder not found: {folder}")
        self.device = torch.device(device)
        self.model = MHR.from_files(folder, self.device, lod=lod)
        faces = getattr(self.model, "faces", None)
        if faces is None:
            raise RuntimeError("the MHR model exposes no `faces`; cannot render a mesh")
        self.faces = np.asarray(torch.as_tensor(faces).cpu(), dtype=np.int64)
        self.to_model_params = to_model_params

    @torch.inference_mode()
    def vertices(self, motion: np.ndarray, constants: ClipConstants,
                 model_params: np.ndarray | None = None) -> np.ndarray:
        frames = {k: v.to(self.device) for k, v in unpack(torch.as_tensor(motion, dtype=torch.float32)).items()}
        if model_params is not None:
            params = torch.as_tensor(model_params, dtype=torch.float32, device=self.device)
        elif self.to_model_params is not None:
            params = self.to_model_params(frames, constants)
        else:
            raise RuntimeError("MHRBackend needs `to_model_params` or per-call `model_params` [T, 204]")
        t = params.shape[0]
        identity = torch.tensor(constants.shape_params, dtype=torch.float32, device=self.device).expand(t, -1)
        verts_cm, _ = self.model(identity, params, frames["expr_params"])
        verts = (verts_cm / 100).cpu().numpy()
        verts[..., 1:] *= -1
        return verts + np.asarray(constants.cam_t, np.float32)


def splat_mesh(vertices: np.ndarray, faces: np.ndarray, focal: float, size: tuple[int, int],
               principal: tuple[float, float] | None = None, radius: int = 1) -> np.ndarray:
    """A shaded z-buffered point splat of one mesh: ``vertices [V, 3]`` camera space -> ``[H, W, 3]`` uint8.

    Pinhole ``u = f x / z + cx``, ``v = f y / z + cy`` (principal point defaults to the image centre); each visible
    vertex paints a ``(2 radius + 1)^2`` square shaded by its normal. Fast and dependency-free, not a rasteriser.
    """
    width, height = size
    cx, cy = principal if principal is not None else (width / 2, height / 2)
    img = np.full((height, width, 3), 255, np.uint8)
    z = vertices[:, 2]
    front = z > 1e-6
    u = np.round(focal * vertices[:, 0] / np.where(front, z, 1) + cx).astype(np.int64)
    v = np.round(focal * vertices[:, 1] / np.where(front, z, 1) + cy).astype(np.int64)
    shade = np.abs(vertex_normals(vertices, faces)[:, 2])  # facing the camera -> bright
    colour = (np.array([70, 110, 170])[None] + shade[:, None] * np.array([150, 120, 70])[None]).clip(0, 255)
    zbuf = np.full(height * width, np.inf)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            uu, vv = u + dx, v + dy
            ok = front & (uu >= 0) & (uu < width) & (vv >= 0) & (vv < height)
            flat = vv[ok] * width + uu[ok]
            np.minimum.at(zbuf, flat, z[ok])
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            uu, vv = u + dx, v + dy
            ok = front & (uu >= 0) & (uu < width) & (vv >= 0) & (vv < height)
            flat = vv[ok] * width + uu[ok]
            win = z[ok] <= zbuf[flat]
            img.reshape(-1, 3)[flat[win]] = colour[ok][win].astype(np.uint8)
    return img


def mesh_frames(backend: MeshBackend, motion: np.ndarray, constants: ClipConstants, height: int,
                model_params: np.ndarray | None = None, chunk: int = 64) -> Iterator[np.ndarray]:
    """Mesh images ``[height, height * W / H, 3]`` per frame, the camera scaled from the video size to ``height``."""
    scale = height / constants.height
    size = (max(2, int(round(constants.width * scale)) // 2 * 2), height)
    for a in range(0, motion.shape[0], chunk):
        params = None if model_params is None else model_params[a:a + chunk]
        verts = backend.vertices(motion[a:a + chunk], constants, params)
        for v in verts:
            yield splat_mesh(v, backend.faces, constants.focal_length * scale, size)

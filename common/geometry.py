"""Small numpy geometry shared by both families: mesh vertex normals and pinhole projection."""

from __future__ import annotations

import numpy as np


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """``vertices [V, 3], faces [F, 3] -> [V, 3]`` unit normals (area-weighted face normals; the faces' winding
    gives their direction). A vertex that no face touches gets a zero normal."""
    tri = vertices[faces]
    face_normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals = np.zeros_like(vertices)
    for k in range(3):
        np.add.at(normals, faces[:, k], face_normals)
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)


def project(points_cam: np.ndarray, focal: np.ndarray, princpt: np.ndarray) -> np.ndarray:
    """Pinhole projection, OpenCV pixel convention: camera-space points ``[..., 3]`` -> pixels ``[..., 2]``,
    ``u = fx x / z + cx``, ``v = fy y / z + cy`` (``focal`` / ``princpt`` broadcast against ``[..., 2]``)."""
    return points_cam[..., :2] / points_cam[..., 2:3] * focal + princpt

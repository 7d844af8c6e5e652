"""Fast CPU rendering for the synthetic hand set: Lambert-shaded meshes (painter's algorithm with OpenCV),
random textured backgrounds and occluders. Pure numpy + OpenCV, no GPU and no scene graph; not a general
renderer (no textures on the mesh, no shadows, no perspective-correct interpolation).
"""

from __future__ import annotations

import cv2
import numpy as np

from common.geometry import project

# fillConvexPoly works in fixed point: vertex coordinates carry this many fractional bits.
_SHIFT = 4


def render_mesh(
    background: np.ndarray,
    verts_cam: np.ndarray,
    faces: np.ndarray,
    focal: np.ndarray,
    princpt: np.ndarray,
    albedo_bgr: np.ndarray,
    light_dir: np.ndarray,
    ambient: float = 0.4,
    supersample: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a flat-shaded mesh over ``background``: ``[H, W, 3] uint8, verts [V, 3] -> (image [H, W, 3], alpha [H, W])``.

    Faces are culled by orientation (the mesh's winding is detected from its signed volume, so a mirrored
    mesh works too), sorted far to near once and filled in that order. ``light_dir`` is the direction the
    light travels in camera space (``[0, 0, 1]`` = from the camera); ``albedo_bgr`` is in [0, 1].
    ``alpha`` is the anti-aliased coverage in [0, 1] (rendered at ``supersample`` x resolution).
    """
    h, w = background.shape[:2]
    v = verts_cam.astype(np.float64)
    tri = v[faces]  # [F, 3, 3]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    # Outward normals: flip when the mesh is wound clockwise (negative signed volume).
    if np.einsum("fi,fi->", tri[:, 0], normals) < 0:
        normals = -normals
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
    centres = (tri[:, 0] + tri[:, 1] + tri[:, 2]) / 3.0
    facing = np.einsum("fi,fi->f", normals, centres) < 0  # normal points towards the camera at the origin
    light = np.asarray(light_dir, np.float64) / np.linalg.norm(light_dir)
    shade = ambient + (1.0 - ambient) * np.clip(normals @ -light, 0.0, None)
    colours = np.clip(shade[:, None] * np.asarray(albedo_bgr)[None] * 255.0, 0, 255)

    order = np.argsort(-centres[facing, 2], kind="stable")  # far first
    uv = project(tri[facing][order], focal, princpt)  # [F', 3, 2]
    pts = np.round((uv + 0.5) * supersample * (1 << _SHIFT) - 0.5 * (1 << _SHIFT)).astype(np.int32)
    cols = np.concatenate([colours[facing][order], np.full((len(order), 1), 255.0)], axis=1).tolist()
    canvas = np.zeros((h * supersample, w * supersample, 4), np.uint8)
    limit = 1 << 20  # keep coordinates of faces far off-screen inside OpenCV's fixed-point range
    for poly, colour in zip(np.clip(pts, -limit, limit), cols):
        cv2.fillConvexPoly(canvas, poly, colour, cv2.LINE_8, _SHIFT)
    if supersample > 1:
        canvas = cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA)
    # The colour channels were drawn on black, so they are premultiplied by coverage: out = hand + (1 - a) bg.
    alpha = canvas[..., 3]
    behind = cv2.multiply(background, cv2.merge([255 - alpha] * 3), scale=1.0 / 255.0)
    return cv2.add(cv2.cvtColor(canvas, cv2.COLOR_BGRA2BGR), behind), alpha.astype(np.float32) / 255.0


def random_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random textured BGR image ``[H, W, 3] uint8``: smooth colour fields, shapes, stripes and noise."""
    def smooth_noise(cells: int, amplitude: float) -> np.ndarray:
        small = rng.uniform(-amplitude, amplitude, (cells, cells, 3)).astype(np.float32)
        return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)

    img = rng.uniform(30, 220, 3).astype(np.float32) + smooth_noise(int(rng.integers(2, 6)), 70.0)
    img += smooth_noise(int(rng.integers(8, 24)), rng.uniform(5, 35))
    if rng.random() < 0.4:  # stripes at a random angle
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 40) * width / 256
        wave = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi / period)
        img += (wave[..., None] * rng.uniform(-40, 40, 3)).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    scale = max(height, width)
    for _ in range(int(rng.integers(4, 14))):
        colour = rng.integers(0, 256, 3).tolist()
        kind = rng.integers(0, 4)
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.uniform(0.03, 0.3) * scale)
        thickness = -1 if rng.random() < 0.5 else int(rng.integers(1, 5))
        if kind == 0:
            cv2.rectangle(img, (x, y), (x + size, y + int(rng.uniform(0.3, 1.5) * size)), colour, thickness)
        elif kind == 1:
            cv2.circle(img, (x, y), max(size // 2, 1), colour, thickness, cv2.LINE_AA)
        elif kind == 2:
            end = (x + int(rng.normal(0, size)), y + int(rng.normal(0, size)))
            cv2.line(img, (x, y), end, colour, int(rng.integers(1, 6)), cv2.LINE_AA)
        else:
            axes = (max(size // 2, 1), max(int(rng.uniform(0.2, 1.0) * size) // 2, 1))
            cv2.ellipse(img, (x, y), axes, float(rng.uniform(0, 180)), 0, 360, colour, thickness, cv2.LINE_AA)
    if rng.random() < 0.5:
        img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.5, 2.0)))
    noise = rng.normal(0, rng.uniform(1, 6), img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def draw_occluder(image: np.ndarray, rng: np.random.Generator, centre: np.ndarray, radius: float) -> np.ndarray:
    """A random opaque blob (polygon or ellipse, flat or striped) near ``centre`` ``(x, y)``; returns a new image."""
    out = image.copy()
    mask = np.zeros(image.shape[:2], np.uint8)
    if rng.random() < 0.5:
        angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(4, 9))))
        radii = radius * rng.uniform(0.6, 1.2, len(angles))
        pts = centre + np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None]
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 255, cv2.LINE_AA)
    else:
        axes = (max(int(radius * rng.uniform(0.6, 1.2)), 2), max(int(radius * rng.uniform(0.3, 0.8)), 2))
        c = (int(round(centre[0])), int(round(centre[1])))
        cv2.ellipse(mask, c, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA)
    colour = rng.uniform(0, 255, 3)
    fill = np.empty_like(image, dtype=np.float32)
    fill[:] = colour
    if rng.random() < 0.5:
        yy = np.arange(image.shape[0], dtype=np.float32)[:, None, None]
        fill += 40.0 * np.sin(yy * 2 * np.pi / rng.uniform(4, 16))
    a = mask[..., None].astype(np.float32) / 255.0
    out[:] = np.clip(a * fill + (1 - a) * image, 0, 255).astype(np.uint8)
    return out

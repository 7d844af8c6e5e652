"""common.geometry against independent references: scipy's convex hull of points on a sphere (outward normals are
the points' own directions) and a hand-computed flat patch."""

from __future__ import annotations

import numpy as np
from scipy.spatial import ConvexHull

from common.geometry import vertex_normals


def test_vertex_normals_of_a_sphere_point_outwards_and_follow_the_winding():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(200, 3))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    faces = ConvexHull(points).simplices.copy()
    tri = points[faces]
    outward = np.einsum("fi,fi->f", np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), tri.mean(axis=1)) > 0
    faces[~outward] = faces[~outward][:, ::-1]  # wind every face counter-clockwise seen from outside
    normals = vertex_normals(points, faces)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, rtol=1e-12)
    assert np.einsum("vi,vi->v", normals, points).min() > 0.95
    np.testing.assert_allclose(vertex_normals(points, faces[:, ::-1]), -normals)  # the winding gives the side


def test_vertex_normals_of_a_flat_patch_and_an_unused_vertex():
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [5, 5, 5]], float)
    faces = np.array([[0, 1, 2], [1, 3, 2]])
    normals = vertex_normals(vertices, faces)
    np.testing.assert_allclose(normals[:4], np.tile([0.0, 0.0, 1.0], (4, 1)))
    np.testing.assert_array_equal(normals[4], 0.0)


def test_project_matches_opencv_project_points():
    import cv2

    from common.geometry import project

    rng = np.random.default_rng(1)
    points = rng.normal(0, 0.1, (30, 3)) + [0.0, 0.0, 0.6]
    focal, princpt = np.array([500.0, 480.0]), np.array([320.0, 240.0])
    K = np.array([[focal[0], 0, princpt[0]], [0, focal[1], princpt[1]], [0, 0, 1]])
    ref, _ = cv2.projectPoints(points, np.zeros(3), np.zeros(3), K, None)
    np.testing.assert_allclose(project(points, focal, princpt), ref[:, 0], rtol=1e-9)

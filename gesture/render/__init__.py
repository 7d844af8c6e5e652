"""Gesture results as video: a parameter view (waveform with onsets, per-part speed, heatmaps of the 320-d frames,
a moving time cursor, ``view``) with the audio muxed in, the MHR body mesh beside it when its assets are configured
(``mesh``), the result npz reader (``video``) and the CLI ``python -m gesture.render`` (``cli``). Not for metrics or
training.
"""

from gesture.render.cli import main
from gesture.render.mesh import MeshBackend, MHRBackend, mesh_frames, splat_mesh
from gesture.render.video import Result, load_result, render_video
from gesture.render.view import ParameterView, parameter_view, render_frames

__all__ = ["MHRBackend", "MeshBackend", "ParameterView", "Result", "load_result", "main", "mesh_frames",
           "parameter_view", "render_frames", "render_video", "splat_mesh"]

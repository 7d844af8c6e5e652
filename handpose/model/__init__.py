"""Hand pose network modules (no training logic): backbone, decoder, temporal encoder, PoseNet."""

from .backbone import ViTBackbone
from .decoder import (
    POSE_DIM,
    SHAPE_DIM,
    HandDecoder,
    HandPrediction,
    ManoParams,
    PatchKeypointHead,
    camera_features,
    make_bin_centers,
)
from .posenet import PoseNet, Stage
from .temporal import TemporalEncoder

__all__ = [
    "POSE_DIM",
    "SHAPE_DIM",
    "HandDecoder",
    "HandPrediction",
    "ManoParams",
    "PatchKeypointHead",
    "PoseNet",
    "Stage",
    "TemporalEncoder",
    "ViTBackbone",
    "camera_features",
    "make_bin_centers",
]

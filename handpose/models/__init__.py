"""Hand pose network modules (no training logic): backbones, decoder, temporal encoder, PoseNet."""

from .backbone import CNNBackbone, ViTBackbone
from .decoder import (
    POSE_DIM,
    SHAPE_DIM,
    HandDecoder,
    HandPrediction,
    HeatmapKeypointHead,
    ManoParams,
    PatchKeypointHead,
    TranslationBins,
    camera_features,
    make_bin_centers,
)
from .posenet import PoseNet, Stage
from .temporal import TemporalEncoder

__all__ = [
    "CNNBackbone",
    "HeatmapKeypointHead",
    "TranslationBins",
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

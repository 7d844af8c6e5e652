"""Hand pose network modules (no training logic): backbones, keypoint heads, translation bins, decoder, temporal
encoder, PoseNet."""

from .backbone import CNNBackbone, ViTBackbone
from .decoder import POSE_DIM, SHAPE_DIM, HandDecoder, HandPrediction, ManoParams
from .keypoints import HeatmapKeypointHead, PatchKeypointHead
from .posenet import PoseNet, Stage
from .temporal import TemporalEncoder
from .translation import TranslationBins, camera_features, make_bin_centers

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

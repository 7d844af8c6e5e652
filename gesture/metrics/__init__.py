"""Co-speech gesture metrics on the 320-d MHR layout: FGD (Fréchet distance of motion-encoder features,
``frechet``), beat consistency (EMAGE's definition, ``beats``), L1 diversity and the motion diagnostics (per-part
velocity ratios, global rotation spread, jumps at window boundaries, ``motion``). ``GestureMetrics``
(``collection``) accumulates clips and gathers them over DDP ranks; ``evaluate_baselines`` (``baselines``) scores
the reference motions a model must beat. numpy float64; no training code.
"""

from gesture.metrics.baselines import (
    BASELINES,
    EvalClip,
    baseline_motion,
    evaluate_baselines,
    format_comparison,
)
from gesture.metrics.beats import (
    BC_PARAM_GROUPS,
    EPS,
    alignment_score,
    audio_onsets,
    beat_consistency,
    group_speed,
    motion_beats,
)
from gesture.metrics.collection import ArrayLike, ClipStats, GestureMetrics, JointsFn
from gesture.metrics.frechet import feature_statistics, frechet_distance, frechet_distance_features
from gesture.metrics.motion import (
    MOTION_DIMS,
    VELOCITY_PARTS,
    boundary_jumps,
    frame_change,
    l1_diversity,
    l1_diversity_sum,
)

__all__ = ["ArrayLike", "BASELINES", "BC_PARAM_GROUPS", "ClipStats", "EPS", "EvalClip", "GestureMetrics", "JointsFn", "MOTION_DIMS", "VELOCITY_PARTS", "alignment_score", "audio_onsets", "baseline_motion", "beat_consistency", "boundary_jumps", "evaluate_baselines", "feature_statistics", "format_comparison", "frame_change", "frechet_distance", "frechet_distance_features", "group_speed", "l1_diversity", "l1_diversity_sum", "motion_beats"]

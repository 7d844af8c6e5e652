"""Hand pose training callbacks: the learning-curve figure (validation PA-MPJPE and root-relative MPJPE against
the step, with the mean pose's values as lines), written to the run folder and logged to wandb.

Not a metric implementation: the curve reads what HandPoseLit logged; the mean-pose line uses
handpose.metrics on the annotations (no images are read).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import lightning as L
import numpy as np

from common.loggers import log_image
from handpose.data.dataset import annotation_batch
from handpose.metrics import mean_pose_baseline

log = logging.getLogger(__name__)

CURVE_METRICS = {"pa_mpjpe": "PA-MPJPE (mm)", "mpjpe": "MPJPE, root-relative (mm)"}
FIGURE_NAME = "learning_curve.png"


def render_curve(history: list[dict[str, float]], baseline: dict[str, float], title: str) -> np.ndarray:
    """history [{step, pa_mpjpe, mpjpe}], baseline {pa_mpjpe, mpjpe} -> RGB uint8 [H, W, 3] figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(10, 3.6), dpi=100)
    steps = [h["step"] for h in history]
    for ax, (key, label) in zip(axes, CURVE_METRICS.items()):
        ax.plot(steps, [h[key] for h in history], "o-", color="tab:blue", label="model (validation)")
        if key in baseline:
            ax.axhline(baseline[key], color="tab:red", linestyle="--", label=f"mean pose {baseline[key]:.1f}")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


class LearningCurve(L.Callback):
    """After every validation: append (step, val/pa_mpjpe, val/mpjpe), redraw ``<out_dir>/learning_curve.png``
    and log it to wandb (rank 0). The history travels in the checkpoint, so a resumed run keeps its curve.

    Args:
        out_dir: the run folder.
        baseline_split: split on which the mean-pose line is computed (the validation split).
    """

    def __init__(self, out_dir: str, baseline_split: str = "val") -> None:
        self.out_dir = Path(out_dir)
        self.baseline_split = baseline_split
        self.history: list[dict[str, float]] = []
        self.baseline: dict[str, float] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        if not trainer.is_global_zero or dm is None or not dm.has_split(self.baseline_split):
            return
        try:
            train, ev = (annotation_batch(dm.build_dataset(split)) for split in ("train", self.baseline_split))
            self.baseline = mean_pose_baseline([train], [ev], copy.deepcopy(pl_module.loss.mano).cpu())
        except Exception as err:  # noqa: BLE001 - a missing line is not worth stopping a run
            log.warning("learning curve: no mean-pose line (%s)", err)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        if not all(f"val/{k}" in metrics for k in CURVE_METRICS):
            return
        self.history = [h for h in self.history if h["step"] != trainer.global_step]
        self.history.append({"step": int(trainer.global_step),
                             **{k: float(metrics[f"val/{k}"]) for k in CURVE_METRICS}})
        image = render_curve(self.history, self.baseline, f"{self.out_dir.parent.name}/{self.out_dir.name}")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        import imageio.v3 as iio

        iio.imwrite(self.out_dir / FIGURE_NAME, image)
        log_image(pl_module, "val/learning_curve", image, caption="validation vs the mean pose")

    def state_dict(self) -> dict:
        return {"history": list(self.history), "baseline": dict(self.baseline)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))
        self.baseline = dict(state_dict.get("baseline", {})) or self.baseline

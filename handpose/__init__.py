"""3D hand pose and shape (MANO) from RGB crops. Public API: ``HandTracker`` (``HandTracker.from_checkpoint``),
``load_checkpoint`` (a run's HandPoseLit); imported on first use, so ``import handpose`` stays cheap."""

__all__ = ["HandTracker", "load_checkpoint"]


def __getattr__(name: str):
    if name == "HandTracker":
        from handpose.tracker import HandTracker

        return HandTracker
    if name == "load_checkpoint":
        from handpose.runs import load_checkpoint

        return load_checkpoint
    raise AttributeError(f"module 'handpose' has no attribute {name!r}")

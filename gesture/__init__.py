"""Co-speech gesture generation (MambaTalk) on MHR parameters. Public API: ``load_generator`` (a trained
generator from its checkpoint) and ``infer_clip`` (wav + TextGrid -> motion); imported on first use, so
``import gesture`` stays cheap."""

__all__ = ["infer_clip", "load_generator"]


def __getattr__(name: str):
    if name in __all__:
        from gesture import infer

        return getattr(infer, name)
    raise AttributeError(f"module 'gesture' has no attribute {name!r}")

"""Gesture results as video (parameter view, MHR body when its assets are given, audio muxed in).

``python -m gesture.render --npz result.npz [--wav a.wav] --out out.mp4 [--mhr-assets DIR]``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from gesture.render.mesh import MHRBackend
from gesture.render.video import load_result, render_video

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m gesture.render", description=__doc__.splitlines()[0])
    parser.add_argument("--npz", required=True, help="result npz (motion [T, 320] raw, optional gt, fps, wave)")
    parser.add_argument("--wav", default=None, help="audio to show and mux (overrides the npz's wave)")
    parser.add_argument("--out", required=True, help="output .mp4 (a .gif is written when there is no ffmpeg)")
    parser.add_argument("--width", type=int, default=960)
    parser.add_argument("--height", type=int, default=540)
    parser.add_argument("--start", type=float, default=0.0, help="start time in seconds")
    parser.add_argument("--seconds", type=float, default=None, help="render at most this many seconds")
    parser.add_argument("--no-gt", action="store_true", help="do not show the npz's gt")
    parser.add_argument("--mhr-assets", default=None, help="MHR asset folder (needs mhr + pymomentum)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    res = load_result(args.npz, args.wav)
    mesh = None
    if args.mhr_assets:
        try:
            mesh = MHRBackend(args.mhr_assets, args.device)
            if res.constants is None or res.model_params is None:
                raise RuntimeError("the npz lacks the clip constants or mhr_model_params [T, 204]")
        except Exception as err:  # noqa: BLE001 - fall back to the parameter view
            log.warning("MHR body unavailable (%s); rendering the parameter view only", err)
            mesh = None
    start = int(round(args.start * res.fps))
    max_frames = None if args.seconds is None else max(1, int(round(args.seconds * res.fps)))
    out = render_video(res.motion, args.out, res.fps, None if args.no_gt else res.gt, res.wave, res.sr,
                       size=(args.width, args.height), start=start, max_frames=max_frames,
                       title=Path(args.npz).stem, mesh=mesh, constants=res.constants, model_params=res.model_params)
    print(f"wrote {out}")
    return out

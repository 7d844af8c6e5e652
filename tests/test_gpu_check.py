"""`make gpu-check` (bench/gpu_check.py) runs end to end without CUDA at toy sizes and writes its report.

Not a timing test: it checks that every part ran, that the numbers a GPU run would report are there, and that the
CPU run is marked as toy-sized. The Mamba part compares our block with the float64 reference (same weights).
"""

from __future__ import annotations

import json

import torch

from bench import gpu_check


def test_gpu_check_runs_on_cpu_and_marks_its_report_tiny(tmp_path):
    report = gpu_check.main(["--out", str(tmp_path), "--tiny", "--steps", "3", "--no-compile"])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["tiny"] is True and report["tiny"] is True
    assert "TINY sizes" in (tmp_path / "gpu_check.md").read_text()
    parts = saved["parts"]
    errors = {k: v["error"] for k, v in parts.items() if "error" in v}
    assert not errors, errors
    for stage in ("stage1_recipe", "stage2_recipe"):
        r = parts[stage]
        assert r["loss_finite"] and r["step_ms_median"] > 0 and r["flops_per_step"] > 0
        assert r["frames_per_sample"] == (1 if stage == "stage1_recipe" else 7)
    assert parts["tracker"]["stage2_ms"] > 0 and parts["loader"]["ratio"] > 0
    assert parts["mamba"]["ours_vs_float64"]["ok"], parts["mamba"]
    assert parts["mambatalk"]["real_time_factor"] > 0
    if not torch.cuda.is_available():
        assert saved["device"] == "cpu" and parts["stage1_recipe"]["mfu"] is None


def test_bench_hand_builds_the_default_models_and_steps_them():
    """`make bench-hand` times the default configs as they are: its models must build (a config the bench overrode
    into an invalid network once made the whole benchmark fail) and a Stage 2 step must run on its data."""
    from bench import bench_handpose

    lit1, _ = bench_handpose.compose_model("stage1", 1)
    lit2, data2 = bench_handpose.compose_model("stage2", 3)
    assert lit1.net.keypoint_head is not None and lit2.net.temporal is not None
    from test_handpose_loss import make_hand_batch

    batch = make_hand_batch(2, 3, lit2.net.img_size)
    bench_handpose.train_step(lit2, batch)()
    bench_handpose.train_step(lit2, batch, all_frames=True)()

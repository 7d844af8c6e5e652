"""Every experiment config composes (a broken config must fail here, not an hour into `make`), the paper recipes
say what the README promises, Stage 1 -> Stage 2 runs through the real entrypoint, and a failing wandb never stops
a run (an end-of-training logging call that raises would crash a run after its model was saved)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))


def _compose(tmp_path: Path, *overrides: str):
    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_root={tmp_path / 'out'}", *overrides])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(tmp_path, experiment):
    cfg = _compose(tmp_path, f"experiment={experiment}")
    resolved = OmegaConf.to_container(cfg, resolve=True)  # no dangling interpolation or missing value
    assert resolved["experiment_name"] == experiment
    assert resolved["paths"]["output_dir"] == str(tmp_path / "out" / experiment / experiment)
    for group in ("data", "model", "trainer"):
        assert "_target_" in resolved[group], f"{experiment}: {group} has no _target_"


def test_paper_recipes_are_the_papers(tmp_path):
    for stage, num_frame in (("stage1", 1), ("stage2", 7)):
        cfg = _compose(tmp_path, f"experiment={stage}-dino_large")
        assert cfg.model.net.backbone.name == "vit_large_patch14_dinov2" and cfg.model.net.backbone.img_size == 224
        assert cfg.data.img_size == 224 and cfg.data.num_frame == num_frame
        assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.gradient_clip_val > 0
        assert cfg.trainer.accelerator == "gpu"
        assert cfg.model.optimizer._target_ == "torch.optim.AdamW" and cfg.model.backbone_lr_scale < 1
        assert cfg.model.scheduler._target_ == "handpose.lit.warmup_cosine" and cfg.model.scheduler.warmup_steps > 0
    stage2 = _compose(tmp_path, "experiment=stage2-dino_large")
    assert stage2.model.stage1_weight == str(tmp_path / "out/stage1-dino_large/stage1-dino_large/checkpoints/last.ckpt")
    ddp = _compose(tmp_path, "experiment=stage2-dino_large", "trainer=ddp")
    assert ddp.trainer.strategy.process_group_backend == "nccl" and ddp.trainer.sync_batchnorm
    paper = _compose(tmp_path, "experiment=mambatalk_paper")
    assert paper.model.generator.hidden == 768 and paper.model.generator.decoder_layers == 8
    # MambaTalk's method as published: code targets, regressed contact, no blending, no speed terms.
    assert paper.model.latent_target == "quantised" and paper.model.decode_from is None
    assert paper.model.generator.contact == "regress" and paper.model.boundary_blend == 0
    assert paper.model.loss.contact == 0 and not any(paper.model.loss.speed.values())


def test_cpu_hand_models_instantiate_with_the_stage1_checkpoint_path_under_output_root(tmp_path):
    for stage in ("stage1", "stage2"):
        cfg = _compose(tmp_path, f"experiment={stage}")
        lit = instantiate(cfg.model)
        assert lit.net.stage == stage
    assert cfg.model.stage1_weight == str(tmp_path / "out" / "stage1" / "stage1" / "checkpoints" / "last.ckpt")


def test_hand_sub_networks_come_from_targets_and_the_backbone_swaps_by_override(tmp_path):
    """`model/backbone@model.net.backbone=<name>` swaps the backbone (its own `_target_`); the decoder and the
    temporal encoder are `_partial_`s whose sizes come from the backbone; a config of another type is an error."""
    from handpose.models import CNNBackbone, HandDecoder, PoseNet, TemporalEncoder

    cfg = _compose(tmp_path, "experiment=stage2", "model/backbone@model.net.backbone=resnet10t")
    assert cfg.model.net.backbone._target_ == "handpose.models.CNNBackbone" and cfg.model.net.decoder._partial_
    net = instantiate(cfg.model.net)
    assert isinstance(net.backbone, CNNBackbone) and net.backbone.name == "resnet10t"
    assert isinstance(net.decoder, HandDecoder) and net.decoder.token_proj.in_features == net.backbone.embed_dim
    assert net.decoder.num_tokens == net.backbone.num_patches
    assert isinstance(net.temporal, TemporalEncoder)
    default = instantiate(_compose(tmp_path, "experiment=stage1").model.net)
    assert default.backbone.name == "tf_efficientnet_lite0" and default.temporal is None
    with pytest.raises(TypeError, match="model.net.decoder"):
        PoseNet("stage1", backbone=net.backbone, decoder=TemporalEncoder)


TINY_HAND = ["model.net.backbone.img_size=32", "model.net.backbone.dense_dim=8", "model.net.decoder.depth=1",
             "model.net.decoder.joint_mlp=16", "model.lift_batch=4",
             "data.synthetic.num_seqs=7", "data.synthetic.train_seqs=3", "data.synthetic.train_min_frames=8",
             "data.synthetic.train_max_frames=8", "data.synthetic.min_frames=10", "data.synthetic.max_frames=10",
             "data.synthetic.image_size=64", "data.batch_size=4", "data.num_workers=0", "trainer.max_epochs=1",
             "logger=csv", "model.mean_init_batches=1", "model.num_vis=2"]
STAGE_OVERRIDES = {"stage1": ["callbacks.ema.update_starting_at_step=2"], "stage2": []}  # Stage 2 has no EMA


def test_stage1_then_stage2_through_the_entrypoint(tmp_path):
    """The chain `make train-stage2` runs: Stage 1 trains, Stage 2 finds its checkpoint by the configured path."""
    env = {**os.environ, "HOME": str(tmp_path / "home"), "CI": "1", "PYTHONUNBUFFERED": "1"}
    common = [f"paths.output_root={tmp_path / 'out'}", f"paths.data_dir={tmp_path / 'data'}", *TINY_HAND]
    logs = {}
    for stage in ("stage1", "stage2"):
        proc = subprocess.run([sys.executable, "-m", "common.train", f"experiment={stage}", *common,
                               *STAGE_OVERRIDES[stage]], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        logs[stage] = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{stage} failed:\n{logs[stage][-4000:]}"
        metrics = json.loads((tmp_path / "out" / stage / stage / "metrics.json").read_text())
        assert {"val/mpjpe", "val/pa_mpjpe", "test/mpjpe"} <= set(metrics)
    stage1_ckpt = tmp_path / "out" / "stage1" / "stage1" / "checkpoints" / "last.ckpt"
    load_lines = [line for line in logs["stage2"].splitlines() if f"weights from {stage1_ckpt}" in line]
    assert load_lines and all("expected-missing" in line and "WARNING" not in line for line in load_lines)
    # Stage 2 froze the backbone: its backbone weights are Stage 1's, bit for bit
    ckpt1 = torch.load(stage1_ckpt, map_location="cpu", weights_only=False)
    s1 = ckpt1["state_dict"]
    s2 = torch.load(tmp_path / "out/stage2/stage2/checkpoints/last.ckpt", map_location="cpu",
                    weights_only=False)["state_dict"]
    # Stage 1's checkpoint holds the EMA weights (what Stage 2 loads), the raw ones under current_model_state
    raw = ckpt1["current_model_state"]
    assert any(not torch.equal(s1[k], raw[k]) for k in s1 if k.startswith("net.decoder."))
    # Frozen in Stage 2: the whole per-frame token encoder and Stage 1's output heads (net.freeze_heads)
    frozen = [k for k in s1 if k.startswith(("net.backbone.", "net.keypoint_head.", "net.decoder.blocks.",
                                              "net.decoder.joint_mlp_net.", "net.decoder.pose_head.",
                                              "net.decoder.finger_head.", "net.decoder.trans_heads."))]
    assert any(k.startswith("net.decoder.finger_head.") for k in frozen)
    for k in frozen:
        torch.testing.assert_close(s2[k], s1[k], rtol=0, atol=0)
    assert s2["net.temporal.average_gate"].abs().sum() > 0  # zero-initialised: the temporal encoder trained

    # `python -m common.eval` on the run's checkpoints gives the numbers training reported for them
    trained = json.loads((tmp_path / "out" / "stage2" / "stage2" / "metrics.json").read_text())
    for split, ckpt, key in (("val", "last", "val/pa_mpjpe"), ("test", "best", "test/mpjpe")):
        proc = subprocess.run([sys.executable, "-m", "common.eval", "experiment=stage2", *common,
                               f"split={split}", f"ckpt_path={ckpt}"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        report = json.loads(next((tmp_path / "out" / "stage2" / "stage2" / "eval").glob(f"{split}-*.json")).read_text())
        assert report["metrics"][key] == pytest.approx(trained[key], rel=1e-5), (split, report, trained)


def test_failing_wandb_warns_and_the_run_still_finishes(tmp_path, monkeypatch):
    """wandb raising on every log call and on finish(): warnings, checkpoints and metrics.json as usual."""
    import wandb

    from common import train

    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_SILENT", "true")

    def network_down(*args, **kwargs):
        raise ConnectionError("network is down")

    real_finish = wandb.finish
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", network_down)
    monkeypatch.setattr(wandb, "finish", network_down)
    cfg = _compose(tmp_path, "experiment=toy", "run_name=wb_down", "trainer.max_epochs=2")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            metrics = train.run(cfg)
    finally:
        monkeypatch.undo()
        real_finish()
    messages = [str(w.message) for w in caught]
    assert any("wandb log_metrics failed" in m and "training continues" in m for m in messages), messages
    assert any("wandb.finish() failed" in m for m in messages), messages
    run_dir = tmp_path / "out" / "toy" / "wb_down"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1
    assert json.loads((run_dir / "metrics.json").read_text())["val/loss"] == pytest.approx(metrics["val/loss"])
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb still ran (offline), it just failed to log"


def test_the_whole_resolved_config_and_git_state_reach_the_loggers(tmp_path, monkeypatch, capsys):
    """save_hyperparameters leaves out net / loss / optimiser: what wandb and the CSV logger record as the run's
    config is the composed one, with the git commit and dirty flag; it is printed as a tree at start."""
    import wandb
    import yaml

    from common import train

    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    seen: list[dict] = []
    real_update = wandb.sdk.wandb_config.Config.update

    def spy(self, d, *args, **kwargs):
        seen.append(dict(d))
        return real_update(self, d, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_config.Config, "update", spy)
    cfg = _compose(tmp_path, "experiment=toy", "run_name=cfg", "trainer.max_epochs=1", "test_after_fit=false")
    train.run(cfg)
    monkeypatch.undo()
    run_dir = tmp_path / "out" / "toy" / "cfg"
    composed = yaml.safe_load((run_dir / "config.yaml").read_text())
    logged = {k: v for d in seen for k, v in d.items()}
    assert logged["model"]["optimizer"] == composed["model"]["optimizer"]
    assert logged["trainer"]["max_epochs"] == 1 and logged["seed"] == composed["seed"]
    assert set(logged["git"]) == {"commit", "dirty"}
    assert logged["git"]["commit"] is None or len(logged["git"]["commit"]) == 40
    hparams = yaml.safe_load((run_dir / "csv" / "hparams.yaml").read_text())
    assert hparams["model"]["optimizer"] == composed["model"]["optimizer"] and "git" in hparams
    out = capsys.readouterr().out
    assert "config of toy/cfg" in out and "optimizer" in out


def _csv_rows(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _train_runner(experiment: str, overrides: list[str], env: dict) -> tuple:
    """(cmd(run) -> argv, train(run) -> stdout) of `common.train experiment=<experiment>` with ``overrides``."""

    def cmd(run: str) -> list[str]:
        return [sys.executable, "-m", "common.train", f"experiment={experiment}", f"run_name={run}", *overrides]

    def train(run: str) -> str:
        proc = subprocess.run(cmd(run), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{run} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
        return proc.stdout

    return cmd, train


def test_stage1_interrupted_by_ctrl_c_mid_epoch_resumes_to_the_uninterrupted_run(tmp_path):
    """A user's sequence: `experiment=stage1` with its default callbacks (EMA, learning curve, RNG state) and
    loggers (wandb offline + CSV), Ctrl-C in epoch 2 after a validation, the same command again. It must end with
    the uninterrupted run's weights and metrics.csv rows. Loader workers on (augmentation draws in them)."""
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), WANDB_SILENT="true", CI="1", PYTHONUNBUFFERED="1")
    tiny = [o for o in TINY_HAND if not o.startswith(("logger=", "data.num_workers=", "trainer.max_epochs=",
                                                       "data.synthetic."))]
    common = [f"paths.output_root={tmp_path / 'out'}", f"paths.data_dir={tmp_path / 'data'}", *tiny,
              "data.num_workers=1", "trainer.max_epochs=2", "test_after_fit=false", "data.synthetic.num_seqs=14",
              "data.synthetic.train_seqs=null", "data.synthetic.min_frames=20", "data.synthetic.max_frames=20",
              "data.synthetic.image_size=64",
              *STAGE_OVERRIDES["stage1"]]

    cmd, train = _train_runner("stage1", common, env)

    train("full")
    run_dir = tmp_path / "out" / "stage1" / "cut"
    last = run_dir / "checkpoints" / "last.ckpt"
    # SIGINT back to its default in the child (a backgrounded `make test` starts children with SIGINT ignored)
    proc = subprocess.Popen(cmd("cut"), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(1.0)  # into epoch 2: past its first training rows
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, f"the run was meant to be interrupted but finished:\n{out[-3000:]}"
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 0
    interrupted_rows = _csv_rows(run_dir / "csv" / "metrics.csv")
    assert any(r["val/pa_mpjpe"] for r in interrupted_rows), "no validation before the interrupt"

    resumed = train("cut")
    assert "Resuming stage1/cut from" in resumed
    full = torch.load(tmp_path / "out/stage1/full/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    cut = torch.load(last, map_location="cpu", weights_only=False)
    for key in ("state_dict", "current_model_state"):  # the EMA weights and the raw ones
        assert full[key].keys() == cut[key].keys()
        differ = [k for k in full[key] if not torch.equal(full[key][k], cut[key][k])]
        assert not differ, f"{key}: {len(differ)} tensors differ after the resume, e.g. {differ[:3]}"
    full_rows = _csv_rows(tmp_path / "out" / "stage1" / "full" / "csv" / "metrics.csv")
    assert _csv_rows(run_dir / "csv" / "metrics.csv") == full_rows
    assert len(full_rows) > len([r for r in interrupted_rows if r["epoch"] in ("", "0")])


def test_mambatalk_interrupted_by_ctrl_c_mid_epoch_resumes_to_the_uninterrupted_run(tmp_path):
    """The same user sequence for `experiment=mambatalk` (default callbacks and loggers; no FGD encoder, so the
    best checkpoint follows val/loss): Ctrl-C in epoch 3 after the epoch-2 validation, the same command again ->
    the uninterrupted run's weights and metrics.csv rows. The frozen VQ-VAEs are small random ones."""
    import signal
    import time

    from gesture.lit.vqvae import CONFIG_KEY, STATE_PREFIX
    from gesture.models.vqvae import VQVAE

    out_root = tmp_path / "out"
    for part in ("face", "body", "hand"):
        torch.manual_seed({"face": 0, "body": 1, "hand": 2}[part])
        vq = VQVAE(part, hidden=16, code_dim=8, n_codes=16, depth=1)
        path = out_root / f"vqvae_{part}" / f"vqvae_{part}" / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        torch.save({CONFIG_KEY: dict(vq.config), "state_dict": {STATE_PREFIX + k: v for k, v in vq.state_dict().items()}},
                   path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), WANDB_SILENT="true", CI="1", PYTHONUNBUFFERED="1")
    common = [f"paths.output_root={out_root}", f"paths.data_dir={tmp_path / 'data'}",
              "data.synthetic.num_speakers=2", "data.synthetic.clips_per_speaker=3", "data.synthetic.seconds=6",
              "data.synthetic.unknown_clips=0", "data.batch_size=4", "data.stride=2",
              "model.generator.hidden=16", "model.generator.audio_f=8", "model.generator.motion_f=8",
              "model.generator.word_dim=8", "model.generator.heads=2", "trainer.max_time=null",
              "trainer.max_epochs=4", "test_after_fit=false"]

    cmd, train = _train_runner("mambatalk", common, env)

    train("full")
    run_dir = out_root / "mambatalk" / "cut"
    proc = subprocess.Popen(cmd("cut"), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    deadline = time.time() + 240
    while time.time() < deadline:  # the first validation (end of epoch 2), then into epoch 3
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith("epoch 2 validation:"):
            break
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    log = "".join(seen) + rest
    assert proc.returncode != 0, f"the run was meant to be interrupted but finished:\n{log[-3000:]}"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 1, log[-3000:]
    assert any(r.get("val/loss") for r in _csv_rows(run_dir / "csv" / "metrics.csv")), "no validation logged"

    resumed = train("cut")
    assert "Resuming mambatalk/cut from" in resumed
    full = torch.load(out_root / "mambatalk" / "full" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)["state_dict"]
    cut = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    assert full.keys() == cut.keys()
    differ = [k for k in full if not torch.equal(full[k], cut[k])]
    assert not differ, f"{len(differ)} of {len(full)} tensors differ after the resume, e.g. {differ[:3]}"
    assert _csv_rows(run_dir / "csv" / "metrics.csv") == _csv_rows(out_root / "mambatalk" / "full" / "csv" /
                                                                   "metrics.csv")

    # `python -m common.eval` runs the generator's own validation loop on a checkpoint of the run
    proc = subprocess.run([sys.executable, "-m", "common.eval", "experiment=mambatalk", "run_name=full", *common,
                           "split=val", "ckpt_path=last"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out_root / "mambatalk" / "full" / "eval" / "val-last.json").read_text())
    trained = [r for r in _csv_rows(out_root / "mambatalk" / "full" / "csv" / "metrics.csv") if r.get("val/loss")]
    assert report["metrics"]["val/loss"] == pytest.approx(float(trained[-1]["val/loss"]), rel=1e-5)

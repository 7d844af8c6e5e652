"""The training entrypoint end to end on the toy experiment: exact resume, explicit-resume errors, DDP on CPU,
offline wandb, run-folder contents. Real subprocesses of `python -m common.train`, as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), WANDB_SILENT="true", CI="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _cmd(tmp_path: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "common.train", "experiment=toy", f"paths.output_root={tmp_path / 'out'}",
            *overrides]


def _train(tmp_path: Path, *overrides: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(tmp_path, *overrides), cwd=ROOT, env=_env(tmp_path, **env), capture_output=True,
                          text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-4000:]}\nSTDERR\n{proc.stderr[-4000:]}")
    return proc


def _final_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return ckpt["state_dict"], json.loads((run_dir / "metrics.json").read_text())


def test_interrupted_run_resumed_by_same_command_equals_uninterrupted(tmp_path):
    common = ["trainer.max_epochs=4", "logger=csv", "model.step_delay_s=0.05", "test_after_fit=false"]
    _train(tmp_path, "run_name=full", *common)

    # Start the same run, interrupt it with Ctrl-C once the first epoch's checkpoint exists.
    cmd = _cmd(tmp_path, "run_name=cut", *common)
    last = tmp_path / "out" / "toy" / "cut" / "checkpoints" / "last.ckpt"
    # SIGINT back to its default in the child: a shell running `make test` in the background (`&`) starts its
    # children with SIGINT ignored, and Python keeps an ignored SIGINT ignored (no KeyboardInterrupt, no Ctrl-C).
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, f"the run was meant to be interrupted but finished:\n{out[-3000:]}"
    interrupted_epoch = torch.load(last, map_location="cpu", weights_only=False)["epoch"]
    assert interrupted_epoch < 3

    resumed = _train(tmp_path, "run_name=cut", *common)
    assert "Resuming toy/cut from" in resumed.stdout

    full_w, full_m = _final_state(tmp_path / "out" / "toy" / "full")
    cut_w, cut_m = _final_state(tmp_path / "out" / "toy" / "cut")
    assert full_w.keys() == cut_w.keys()
    for k in full_w:
        assert torch.equal(full_w[k], cut_w[k]), f"weight {k} differs after resume"
    assert full_m["val/loss"] == cut_m["val/loss"]
    assert (tmp_path / "out" / "toy" / "cut" / "config.yaml").is_file()
    assert (tmp_path / "out" / "toy" / "cut" / "csv" / "metrics.csv").is_file()


def test_resume_from_a_truncated_last_checkpoint_fails_naming_it(tmp_path):
    _train(tmp_path, "run_name=t", "trainer.max_epochs=1", "logger=csv", "test_after_fit=false")
    last = tmp_path / "out" / "toy" / "t" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    proc = _train(tmp_path, "run_name=t", "trainer.max_epochs=2", "logger=csv", check=False)
    assert proc.returncode != 0
    assert f"cannot resume from {last}: the file is unreadable" in proc.stderr + proc.stdout


def test_explicit_resume_without_checkpoint_fails_clearly(tmp_path):
    proc = _train(tmp_path, "run_name=nothing_here", "ckpt_path=last", "logger=csv", check=False)
    assert proc.returncode != 0
    assert "no checkpoint exists" in proc.stderr + proc.stdout
    assert not (tmp_path / "out" / "toy" / "nothing_here" / "checkpoints").exists()


def test_last_checkpoint_is_the_final_epoch_even_when_it_is_not_the_best(tmp_path):
    # monitor_mode=max on a falling loss: the best checkpoint is epoch 0, last.ckpt must still be epoch 2
    # test_ckpt=last: the test after fit loads last.ckpt, not the (epoch 0) best
    proc = _train(tmp_path, "run_name=m", "trainer.max_epochs=3", "logger=csv", "monitor_mode=max", "test_ckpt=last")
    ckpts = tmp_path / "out" / "toy" / "m" / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["epoch"] == 2
    assert [p.name for p in ckpts.glob("best-*.ckpt")] == ["best-epoch000.ckpt"]
    assert f"Testing {ckpts / 'last.ckpt'}" in proc.stdout


def test_resume_false_starts_fresh_and_keeps_old_checkpoints(tmp_path):
    _train(tmp_path, "run_name=r", "trainer.max_epochs=1", "logger=csv", "test_after_fit=false")
    proc = _train(tmp_path, "run_name=r", "trainer.max_epochs=1", "logger=csv", "resume=false",
                  "test_after_fit=false")
    assert "from scratch" in proc.stdout
    run_dir = tmp_path / "out" / "toy" / "r"
    assert list(run_dir.glob("checkpoints.prev-*")), "earlier checkpoints were not kept"
    assert list((run_dir / "csv").glob("metrics.prev-*.csv")), "the earlier metrics.csv was not kept"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 0


def test_multirun_jobs_get_their_own_run_folders_and_do_not_resume_each_other(tmp_path):
    """`-m seed=1,2`: two independent runs in two folders; the same sweep again resumes each from its own."""
    sweep = ["seed=1,2", "trainer.max_epochs=1", "logger=csv", "test_after_fit=false",
             f"hydra.sweep.dir={tmp_path / 'sweep'}"]

    def multirun() -> subprocess.CompletedProcess:
        cmd = _cmd(tmp_path, *sweep)
        cmd.insert(cmd.index("common.train") + 1, "--multirun")  # a flag before the overrides
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    proc = multirun()
    assert proc.stdout.count("from scratch") == 2, proc.stdout[-3000:]
    runs = sorted(p for p in (tmp_path / "out" / "toy").iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["toy-logger=csv,seed=1,test_after_fit=False,trainer.max_epochs=1",
                                      "toy-logger=csv,seed=2,test_after_fit=False,trainer.max_epochs=1"]
    weights = [torch.load(p / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"] for p in runs]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), "the two seeds trained alike"
    again = multirun()
    assert again.stdout.count("Resuming toy/toy-") == 2 and "from scratch" not in again.stdout


def test_ddp_cpu_two_ranks_and_synced_validation_metric(tmp_path):
    proc = _train(tmp_path, "run_name=ddp", "trainer=ddp_cpu", "trainer.max_epochs=2", "logger=csv",
                  "test_after_fit=false")
    log = proc.stdout + proc.stderr
    assert "MEMBER: 2/2" in log, log[-3000:]
    # The logged val/loss must be the MSE over the WHOLE val set (both ranks' shards), not one rank's half.
    from common.testing.toy import ToyRegressionData, ToyRegressor

    weights, metrics = _final_state(tmp_path / "out" / "toy" / "ddp")
    model = ToyRegressor(dim=8)
    model.load_state_dict({k: v for k, v in weights.items() if k.startswith("net.")}, strict=False)
    model.eval()
    ds = ToyRegressionData(batch_size=32).build_dataset("val")
    x = torch.as_tensor(ds.x)
    y = torch.as_tensor(ds.y)
    with torch.no_grad():
        mse = torch.mean((model(x) - y) ** 2).item()
    assert metrics["val/loss"] == pytest.approx(mse, rel=1e-5)


def test_wandb_offline_run_written_without_network(tmp_path):
    proc = _train(tmp_path, "run_name=wb", "trainer.max_epochs=1")
    run_dir = tmp_path / "out" / "toy" / "wb"
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline, f"no offline wandb run in {run_dir}: {proc.stdout[-2000:]}"
    assert "wandb sync" in proc.stdout
    assert f"Testing {run_dir / 'checkpoints' / 'best-epoch000.ckpt'}" in proc.stdout  # test_ckpt=best (default)
    assert (run_dir / "metrics.json").is_file()
    assert "test/loss" in json.loads((run_dir / "metrics.json").read_text())



def test_debug_profiler_and_overfit_and_trainer_cpu_configs_run(tmp_path):
    """`debug=profiler` writes Lightning's profile into the run folder; `debug=overfit` trains on the same
    batches until the loss has fallen; `trainer=cpu` picks the CPU."""
    _train(tmp_path, "run_name=prof", "debug=profiler", "trainer=cpu", "logger=csv")
    assert list((tmp_path / "out" / "toy" / "prof").glob("*profile*.txt")), "no profiler report"
    _train(tmp_path, "run_name=over", "debug=overfit", "trainer.max_epochs=15", "logger=csv")
    rows = [r for r in _read_csv(tmp_path / "out" / "toy" / "over" / "csv" / "metrics.csv") if r.get("train/loss")]
    losses = [float(r["train/loss"]) for r in rows]
    assert len(losses) > 10 and losses[-1] < 0.5 * losses[0], losses


def _read_csv(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_optuna_sweep_runs_each_trial_in_its_own_folder_and_reports_the_best(tmp_path):
    """`hparams_search=toy_optuna`: every trial is a run of its own (its sampled values first in its name), returns
    its final val/loss to the sweeper, and the sweep folder names the best trial's parameters and value."""
    import yaml

    # (the search config sets hydra.mode=MULTIRUN: no -m needed)
    proc = _train(tmp_path, "hparams_search=toy_optuna", "hydra.sweeper.n_trials=3",
                  "hydra.sweeper.sampler.n_startup_trials=2", "trainer.max_epochs=1", "logger=csv",
                  "test_after_fit=false", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    runs = sorted(p for p in (tmp_path / "out" / "toy").iterdir() if p.is_dir())
    assert len(runs) == 3 and all(p.name.startswith("toy-model.dropout=") for p in runs), [p.name for p in runs]
    losses = {p.name: json.loads((p / "metrics.json").read_text())["val/loss"] for p in runs}
    result = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(min(losses.values()), rel=1e-6), (result, losses)
    best = min(losses, key=losses.get)
    assert f"model.hidden={result['best_params']['model.hidden']}" in best
    assert "Best value" in proc.stdout + proc.stderr


def test_submitit_launcher_runs_sweep_jobs_in_processes_of_their_own(tmp_path):
    """`hydra/launcher=submitit_local` (the SLURM launcher's local twin): two jobs, two processes, two run folders.
    `hydra/launcher=slurm` composes into submitit's SLURM launcher with one task per GPU."""
    from hydra import compose, initialize_config_dir

    _train(tmp_path, "hydra.mode=MULTIRUN", "hydra/launcher=submitit_local", "seed=1,2", "trainer.max_epochs=1",
           "logger=csv", "test_after_fit=false", f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.launcher.timeout_min=5")
    runs = sorted(p.name for p in (tmp_path / "out" / "toy").iterdir() if p.is_dir())
    assert len(runs) == 2 and all((tmp_path / "out" / "toy" / r / "metrics.json").is_file() for r in runs)
    assert len([p for p in (tmp_path / "sweep" / ".submitit").iterdir() if p.name.isdigit()]) == 2  # 2 job ids

    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=toy", "hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node == 1 and launcher.max_num_timeout == 3


def test_loggers_are_picked_from_the_command_line(tmp_path):
    """`logger=[csv,tensorboard]`: both write into the run folder, wandb is not started; a logger whose package is
    missing is an error naming its config key."""
    _train(tmp_path, "run_name=tb", "trainer.max_epochs=1", "logger=[csv,tensorboard]", "test_after_fit=false")
    run_dir = tmp_path / "out" / "toy" / "tb"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (run_dir / "csv" / "metrics.csv").is_file() and not (run_dir / "wandb").exists()
    try:
        import mlflow  # noqa: F401
    except ImportError:
        proc = _train(tmp_path, "run_name=ml", "trainer.max_epochs=1", "logger=mlflow", check=False)
        assert proc.returncode != 0 and "logger.mlflow: could not build" in proc.stderr, proc.stderr[-2000:]

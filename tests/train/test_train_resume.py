"""Checkpoints and resume: a run killed with SIGKILL and resumed with --resume latest logs bitwise the same
losses as an uninterrupted run (CPU, one process); pruning, the train state format and resume errors."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from clipforge.io.runs import STATE_NAME, latest_checkpoint
from clipforge.train import TrainConfig, train
from clipforge.train.config import default_resume
from clipforge.train.logger import read_metrics

MICRO = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                         "head_width": 16},
         "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}

# Runs `clipforge train ARGS`, killing itself with SIGKILL right after logging step $KILL_AFTER_STEP.
_KILLED_RUN = """
import os, signal, sys
from clipforge.train import logger
kill_at, log = int(os.environ["KILL_AFTER_STEP"]), logger.RunLogger.log
def log_then_die(self, record):
    log(self, record)
    if record["step"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
logger.RunLogger.log = log_then_die
from clipforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def micro_json(tmp_path):
    path = tmp_path / "micro.json"
    path.write_text(json.dumps(MICRO))
    return str(path)


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _args(model, output, *extra):
    # 96 samples / batch 8 = 12 batches an epoch: 16 steps cross an epoch boundary; two loader workers
    # and random crops (the default) must both come back exactly.
    return ["train", "--model", model, "--train-data", "builtin:96", "--batch-size", "8", "--steps", "16",
            "--warmup", "3", "--lr", "1e-3", "--workers", "2", "--log-every", "1", "--save-every", "5",
            "--keep", "2", "--output", str(output), *extra]


def _cli(args, **env):
    return subprocess.run([sys.executable, "-m", "clipforge", *args], env=_env(**env), capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_killed_run_resumes_exactly(tmp_path, micro_json):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    done = _cli(_args(micro_json, whole))
    assert done.returncode == 0, done.stderr[-3000:]

    killed = subprocess.run([sys.executable, "-c", _KILLED_RUN, *_args(micro_json, broken)],
                            env=_env(KILL_AFTER_STEP="7"), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert latest_checkpoint(broken).name == "step_00000005"
    assert [r["step"] for r in read_metrics(broken)] == list(range(1, 8))  # steps 6-7 are lost work

    resumed = _cli(_args(micro_json, broken, "--resume", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, got = read_metrics(whole), read_metrics(broken)
    assert [r["step"] for r in got] == list(range(1, 17))
    for key in ("loss", "lr", "logit_scale", "grad_norm", "epoch"):
        assert [r[key] for r in got] == [r[key] for r in expected], key
    final = [load_file(run / "checkpoints" / "step_00000016" / "model.safetensors") for run in (whole, broken)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    assert sorted(p.name for p in (broken / "checkpoints").iterdir()) == ["step_00000015", "step_00000016"]
    config = json.loads((broken / "run_config.json").read_text())
    assert config["resolved"]["resumed_from"].endswith("step_00000005")


def _cfg(tmp_path, model, **kw):
    base = dict(model=model, train_data="builtin:64", output=str(tmp_path / "run"), steps=4, warmup=1,
                batch_size=8, workers=0, save_every=1, keep=2, log_every=1)
    return TrainConfig(**{**base, **kw})


@pytest.mark.slow
def test_checkpoints_are_pruned_and_hold_a_weights_only_state(tmp_path, micro_json):
    train(_cfg(tmp_path, micro_json))
    folders = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [f.name for f in folders] == ["step_00000003", "step_00000004"]
    state = torch.load(folders[-1] / STATE_NAME, weights_only=True)
    assert state["step"] == 4 and state["epoch"] == 0 and state["batch_in_epoch"] == 4
    assert {"optimizer", "schedule", "scaler", "rng", "skipped", "run"} <= set(state)
    assert set(state["rng"][0]) >= {"python", "numpy", "torch"}


@pytest.mark.slow
def test_resume_errors(tmp_path, micro_json):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(_cfg(tmp_path, micro_json, resume="latest"))
    with pytest.raises(FileNotFoundError, match="not a complete training checkpoint"):
        train(_cfg(tmp_path, micro_json, resume=str(tmp_path)))
    train(_cfg(tmp_path, micro_json, steps=2))
    with pytest.raises(ValueError, match=r"settings differ .*lr: [0-9.e-]+ -> 0.002"):
        train(_cfg(tmp_path, micro_json, steps=2, resume="latest", lr=2e-3))


@pytest.mark.slow
def test_resume_auto_starts_or_continues(tmp_path, micro_json):
    first = train(_cfg(tmp_path, micro_json, steps=3, save_every=2, resume="auto"))  # nothing yet: starts
    assert first["step"] == 3
    again = train(_cfg(tmp_path, micro_json, steps=3, save_every=2, resume="auto"))  # finished: nothing to do
    assert again["step"] == 3 and [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]
    assert default_resume({"TORCHELASTIC_RESTART_COUNT": "1"}) == "auto"
    assert default_resume({"TORCHELASTIC_RESTART_COUNT": "0"}) is None and default_resume({}) is None

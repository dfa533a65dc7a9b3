"""Data-parallel training on CPU (gloo): two processes launched by torchrun, or as SLURM's srun would, give
the losses, gradient norms and weights of one process training on the same global batches."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipforge.train import TrainConfig, train
from clipforge.runtime.distributed import first_host, launcher_env
from clipforge.train.logger import read_metrics

MICRO = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                         "head_width": 16},
         "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(model, output, batch_size, *extra):
    # No random crops: a sample's pixels then do not depend on which rank loads it. Rank r takes every
    # 2nd sample of the epoch's order, so the two ranks' batches g together are the 1-process batch g.
    return ["--model", model, "--train-data", "builtin:128", "--no-augment", "--batch-size", str(batch_size),
            "--steps", "3", "--warmup", "1", "--lr", "1e-3", "--workers", "0", "--log-every", "1",
            "--output", str(output), *extra]


def _launch_torchrun(args, output):
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
           str(_free_port()), "-m", "clipforge", "train", *args]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def _launch_like_srun(args, output):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost",
           "SLURM_JOB_ID": "4242", "MASTER_PORT": str(_free_port())}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(key, None)
    procs = [subprocess.Popen([sys.executable, "-m", "clipforge", "train", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)})
             for rank in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-2000:] + err[-3000:]


@pytest.mark.parametrize("launch, extra", [(_launch_torchrun, []),
                                           (_launch_like_srun, ["--local-loss", "--accum-freq", "2"])],
                         ids=["torchrun", "srun-local-loss-accum"])
@pytest.mark.slow
def test_two_processes_match_one(tmp_path, launch, extra):
    model = tmp_path / "micro.json"
    model.write_text(json.dumps(MICRO))
    launch(_args(model, tmp_path / "ddp", 8, *extra), tmp_path / "ddp")

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        accum = int(extra[-1]) if "--accum-freq" in extra else 1
        train(TrainConfig(model=str(model), train_data="builtin:128", augment=False, batch_size=16, steps=3,
                          warmup=1, lr=1e-3, workers=0, log_every=1, output=str(tmp_path / "one"),
                          accum_freq=accum))
    finally:
        torch.set_num_threads(before)

    resolved = json.loads((tmp_path / "ddp" / "run_config.json").read_text())["resolved"]
    assert resolved["world_size"] == 2 and resolved["global_batch_size"] == 16 * accum
    ddp, one = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "one")
    assert [r["step"] for r in ddp] == [1, 2, 3]
    for key in ("loss", "grad_norm", "logit_scale"):
        assert [r[key] for r in ddp] == pytest.approx([r[key] for r in one], rel=1e-5, abs=1e-6), key
    weights = [load_file(tmp_path / run / "checkpoints" / "step_00000003" / "model.safetensors")
               for run in ("ddp", "one")]
    for key in weights[0]:
        # Adam divides by the gradient's RMS, so entries whose gradient is pure rounding noise (the key
        # biases of attention, which softmax ignores) move by up to ~1e-4 * lr differently; a gradient
        # that really differed would move an entry by ~lr = 1e-3.
        torch.testing.assert_close(weights[0][key], weights[1][key], atol=2e-4, rtol=0)


def test_slurm_environment():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[007-008]",
           "SLURM_JOB_ID": "12345"}
    assert launcher_env(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu007",
                                 "MASTER_PORT": str(29500 + 345)}
    assert launcher_env({**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"})["MASTER_ADDR"] == "10.0.0.1"
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert launcher_env({**env, **torchrun}) == torchrun  # srun torchrun ...: torchrun's ranks win
    assert launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == {}
    assert launcher_env({}) == {}
    assert first_host("node1") == "node1"
    assert first_host("gpu[003-005,9],cpu1") == "gpu003"
    assert first_host("a-b[10,12]") == "a-b10"

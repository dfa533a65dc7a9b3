"""Training on small data without tuning: fitted learning rate and warm-up, --time-budget (within budget, the
schedule run to its end, exact resume), several captions per image, --keep-best and loading RUN@best."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import clipforge
from clipforge.data import build_train_data
from clipforge.data.samples import SkipCounter
from clipforge.data.sources import CsvSource, ShardSource
from clipforge.io.runs import read_best
from clipforge.train.checkpoint import best_mode
from clipforge.train.logger import read_metrics
from clipforge.train.optim import cosine_lr, fitted_lr, fitted_warmup
from test_train_resume import _KILLED_RUN, MICRO  # the micro model, and a run that kills itself after a step


@pytest.fixture
def micro_json(tmp_path):
    path = tmp_path / "micro.json"
    path.write_text(json.dumps(MICRO))
    return str(path)


def _cli(args, script=None, **env):
    command = [sys.executable, "-c", script] if script else [sys.executable, "-m", "clipforge"]
    return subprocess.run([*command, *args], env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=300)


def _train(model, output, *extra):
    return ["train", "--model", model, "--train-data", "builtin:64", "--batch-size", "8", "--workers", "0",
            "--log-every", "1", "--output", str(output), *extra]


def test_fitted_rules_follow_the_references():
    assert fitted_lr(32, pretrained=False) == fitted_lr(32768, pretrained=False) == pytest.approx(5e-4)
    assert fitted_lr(4 * 32768, pretrained=False) == pytest.approx(1e-3)  # sqrt(4) above the reference
    assert fitted_lr(64, pretrained=True) == pytest.approx(3e-5)
    assert fitted_lr(2048, pretrained=True) == pytest.approx(6e-5)
    assert fitted_warmup(100_000) == 100  # 2 / (1 - 0.98)
    assert fitted_warmup(150) == 15 and fitted_warmup(5) == 1  # at most a tenth of the run
    assert fitted_warmup(100_000, beta2=0.999) == 2000
    assert best_mode("val_loss") == ("loss", "min") and best_mode("zeroshot_top1") == ("zeroshot_top1", "max")
    assert best_mode("loss:max") == ("loss", "max")


@pytest.mark.slow
def test_cli_fits_the_schedule_and_warns_of_a_long_warmup(tmp_path, micro_json):
    fitted = _cli(_train(micro_json, tmp_path / "fitted", "--steps", "20"))
    assert fitted.returncode == 0, fitted.stderr[-2000:]
    resolved = json.loads((tmp_path / "fitted" / "run_config.json").read_text())["resolved"]
    assert resolved["warmup"] == 2 and resolved["lr"] == pytest.approx(5e-4)
    assert read_metrics(tmp_path / "fitted")[0]["lr"] == pytest.approx(resolved["lr"] / 2)
    assert "warning" not in fitted.stderr

    long = _cli(_train(micro_json, tmp_path / "long", "--steps", "6", "--warmup", "4"))
    assert long.returncode == 0, long.stderr[-2000:]
    assert "clipforge train: warning: the warm-up (4 steps) covers most of the run (6 steps)" in long.stderr


@pytest.mark.slow
def test_time_budget_run_ends_within_it_with_the_schedule_finished(tmp_path, micro_json):
    start = time.perf_counter()
    done = _cli(_train(micro_json, tmp_path / "run", "--time-budget", "12s"))
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-2000:]
    assert elapsed < 12 + 20  # generous: interpreter start-up and a shared, noisy machine
    resolved = json.loads((tmp_path / "run" / "run_config.json").read_text())["resolved"]
    total, records = resolved["total_steps"], [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert total > 10 and records[-1]["step"] == total
    assert records[-1]["lr"] == pytest.approx(cosine_lr(total - 1, resolved["lr"], resolved["warmup"], total))
    assert records[-1]["lr"] < 0.01 * resolved["lr"]  # the cosine reached its end
    assert (tmp_path / "run" / "checkpoints" / f"step_{total:08d}").is_dir()


@pytest.mark.slow
def test_time_budgeted_run_resumes_to_its_plan(tmp_path, micro_json):
    broken, whole = tmp_path / "broken", tmp_path / "whole"
    budget = _train(micro_json, broken, "--time-budget", "8s", "--save-every", "3", "--workers", "2")
    killed = _cli(budget, script=_KILLED_RUN, KILL_AFTER_STEP="4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    total = json.loads((broken / "run_config.json").read_text())["resolved"]["total_steps"]
    resumed = _cli([*budget, "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((broken / "run_config.json").read_text())["resolved"]["total_steps"] == total

    # the same plan, trained without a probe and without a crash
    reference = _cli(_train(micro_json, whole, "--steps", str(total), "--save-every", "3", "--workers", "2"))
    assert reference.returncode == 0, reference.stderr[-2000:]
    expected, got = read_metrics(whole), read_metrics(broken)
    assert [r["step"] for r in got] == list(range(1, total + 1))
    for key in ("loss", "lr", "grad_norm"):
        assert [r[key] for r in got] == [r[key] for r in expected], key
    final = [load_file(run / "checkpoints" / f"step_{total:08d}" / "model.safetensors") for run in (whole, broken)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def _png(colour) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(out, format="PNG")
    return out.getvalue()


def test_csv_with_several_captions_draws_one_per_step_deterministically(tmp_path):
    (tmp_path / "a.png").write_bytes(_png("red"))
    (tmp_path / "b.png").write_bytes(_png("blue"))
    lists = tmp_path / "lists.csv"
    lists.write_text('filepath,captions\na.png,"[""red one"", ""a red square""]"\nb.png,blue only\n')
    columns = tmp_path / "columns.csv"
    columns.write_text("filepath,c1,c2\na.png,red one,a red square\nb.png,blue only,\n")
    for path, key in ((lists, "captions"), (columns, "c1,c2")):
        source = CsvSource(str(path), caption_key=key)
        assert [source.load(i)[1] for i in range(2)] == [["red one", "a red square"], "blue only"]

    def drawn(seed):
        data = build_train_data(str(columns), lambda im: torch.zeros(3, 4, 4), lambda texts: texts, 2, seed=seed,
                                csv_caption_key="c1,c2")
        out = []
        for epoch in range(8):
            batches = data.batches(epoch)
            out.append(sorted(next(batches)[1]))
            batches.close()
        return out

    first = drawn(0)
    assert first == drawn(0)  # the same seed draws the same captions (so a resume draws them again)
    assert {tuple(b) for b in first} == {("a red square", "blue only"), ("blue only", "red one")}


def test_shards_with_a_json_caption_list(tmp_path):
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("s0.png", _png("red")), ("s0.json", json.dumps(["red", "a red square"]).encode()),
                           ("s1.png", _png("blue")), ("s1.json", json.dumps({"captions": ["blue"]}).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    source = ShardSource(str(path))
    captions = [source.decode(raw)[1] for raw in source.raw_samples([str(path)], SkipCounter())]
    assert captions == [["red", "a red square"], "blue"]


@pytest.mark.slow
def test_keep_best_keeps_the_best_validation_checkpoint(tmp_path, micro_json):
    run = tmp_path / "run"
    done = _cli(_train(micro_json, run, "--steps", "8", "--lr", "1e-2", "--val-data", "builtin:16",
                       "--val-every", "2", "--keep-best", "val_loss", "--keep", "1"))
    assert done.returncode == 0, done.stderr[-2000:]
    losses = {r["step"]: r["loss"] for r in read_metrics(run) if r.get("split") == "val"}
    best = read_best(run)
    assert best["metric"] == "loss" and best["mode"] == "min"
    assert best["value"] == min(losses.values()) and best["step"] == min(losses, key=losses.get)
    model, _ = clipforge.load(f"{run}@best", device="cpu")
    saved = load_file(run / "checkpoints" / "best" / "model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    newest, _ = clipforge.load(run, device="cpu")
    assert torch.equal(newest.logit_scale, load_file(run / "checkpoints" / "step_00000008" / "model.safetensors")
                       ["logit_scale"])
    with pytest.raises(FileNotFoundError, match="no best checkpoint"):
        clipforge.load(f"{tmp_path / 'nothing'}@best")

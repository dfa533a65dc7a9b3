"""Training on hostile or careless input (issue 11): bad samples reported on the console and counted once,
damaged or malicious checkpoints named and skipped for the newest intact one, an --output that is a file,
and resume advice that the trainer then follows."""
import csv
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from clipforge.io.tensors import CheckpointError
from clipforge.cli import main
from clipforge.data import DataSourceError, build_train_data
from clipforge.train import TrainConfig, train
from clipforge.train.logger import RunLogger

HOSTILE = Path(__file__).parents[1] / "fixtures" / "hostile"

pytestmark = pytest.mark.usefixtures("one_thread")  # micro_json: the two-layer model of conftest.py


def _csv(folder: Path, good: int, bad: list[str]) -> str:
    """A CSV of ``good`` readable images then copies of the hostile files named in ``bad``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [["filepath", "caption"]]
    for i in range(good):
        Image.new("RGB", (32, 32), (8 * i % 256, 40, 90)).save(folder / f"good{i}.png")
        rows.append([f"good{i}.png", f"a square of colour {i}"])
    for i, name in enumerate(bad):
        shutil.copy(HOSTILE / name, folder / f"bad{i}_{name}")
        rows.append([f"bad{i}_{name}", f"a broken image {i}"])
    with open(folder / "data.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return str(folder / "data.csv")


def _cfg(tmp_path, model, **kw):
    base = dict(model=model, train_data="builtin:64", output=str(tmp_path / "run"), steps=6, warmup=1,
                batch_size=8, workers=0, save_every=2, keep=3, log_every=1)
    return TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------- bad samples

@pytest.mark.parametrize("workers", [0, 1])
def test_skip_counts_count_bad_samples_not_retries(tmp_path, workers):
    bad = ["empty.png"] * 3 + ["truncated.png"] * 3 + ["not_an_image.jpg"] * 2  # 8 bad rows of 40
    spec = _csv(tmp_path / "data", 32, bad)
    data = build_train_data(spec, lambda image: torch.zeros(3, 32, 32), lambda texts: torch.zeros(len(texts), 4),
                            8, seed=0, workers=workers)
    assert sum(1 for _ in data.batches(0)) == 5
    assert data.skip_counts() == {"empty_file": 3, "unreadable_image": 5}
    examples = data.skip_examples()
    assert "bad" in examples["empty_file"] and "empty" in examples["empty_file"]


def test_all_bad_csv_names_the_source(tmp_path, micro_json):
    spec = _csv(tmp_path / "data", 0, ["empty.png"] * 4 + ["truncated.png"] * 4)
    data = build_train_data(spec, lambda image: torch.zeros(3, 32, 32), lambda t: torch.zeros(len(t), 4), 4)
    with pytest.raises(DataSourceError, match=rf"cannot fill a batch from '{spec}': every sample tried was bad"):
        next(iter(data.batches(0)))


def test_training_reports_bad_samples_on_the_console(tmp_path, micro_json, capsys):
    spec = _csv(tmp_path / "data", 28, ["empty.png", "truncated.png", "not_an_image.jpg", "empty.png"])  # 4 batches
    assert main(["train", "--model", micro_json, "--train-data", spec, "--output", str(tmp_path / "run"),
                 "--epochs", "1", "--batch-size", "8", "--warmup", "1", "--workers", "0"]) == 0
    captured = capsys.readouterr()
    lines = [line.strip() for line in captured.err.splitlines()]  # the progress bar redraws with \r
    warned = [line for line in lines if line.startswith("warning: skipping bad samples")]
    assert len(warned) == 2  # one line per reason, when first met, naming the file
    assert any("the image or video file, or tar member, has zero bytes" in w and "_empty.png" in w for w in warned)
    assert any("cannot be decoded" in w and ("bad1_truncated.png" in w or "bad2_not_an_image" in w) for w in warned)
    total = [line for line in lines if line.startswith("warning: skipped bad samples in total")]
    assert total == ["warning: skipped bad samples in total: 2 empty_file (the image or video file, or tar member, "
                     "has zero bytes), 2 unreadable_image (the image cannot be decoded (corrupt, truncated or not an image))"]
    assert json.loads(captured.out.splitlines()[-1])["skipped"] == {"empty_file": 2, "unreadable_image": 2}


def test_the_progress_bar_shows_the_running_skip_count(tmp_path):
    logger = RunLogger(tmp_path, True, 10)
    logger.log({"step": 1, "loss": 1.0, "skipped": {"empty_file": 2, "unreadable_image": 3}})
    assert "skipped=5" in logger.bar.postfix
    logger.close()


# ------------------------------------------------------------------------------ output and resume

def test_output_that_is_a_file_is_refused(tmp_path, micro_json, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    for output in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "run"):
        assert main(["train", "--model", micro_json, "--train-data", "builtin:64", "--output", str(output),
                     "--steps", "2", "--warmup", "1", "--batch-size", "8", "--workers", "0"]) == 2
        err = capsys.readouterr().err
        assert "is a file, not a folder" in err and "Traceback" not in err
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_resume_advice_after_a_run_that_failed_before_its_first_checkpoint(tmp_path, micro_json, capsys):
    spec = _csv(tmp_path / "data", 0, ["empty.png"] * 8)
    args = ["train", "--model", micro_json, "--train-data", spec, "--output", str(tmp_path / "run"), "--steps", "2",
            "--warmup", "1", "--batch-size", "4", "--workers", "0"]
    assert main(args) == 2 and "cannot fill a batch from" in capsys.readouterr().err
    assert main(args) == 2
    assert "stopped before its first checkpoint" in capsys.readouterr().err
    assert main([*args, "--resume", "latest"]) == 2
    advice = capsys.readouterr().err
    assert "pass --resume auto to start the run there from step 0" in advice
    for i in range(8):  # the data fixed, the advice followed
        Image.new("RGB", (32, 32), (30 * i, 0, 0)).save(tmp_path / "data" / f"bad{i}_empty.png")
    assert main([*args, "--resume", "auto"]) == 0


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (os.environ["HOSTILE_MARKER"],))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "malicious", "not_a_state"])
def test_a_damaged_newest_checkpoint_resumes_from_the_newest_intact_one(tmp_path, micro_json, damage, caplog,
                                                                         monkeypatch):
    monkeypatch.setenv("HOSTILE_MARKER", str(tmp_path / "payload_ran"))
    cfg = _cfg(tmp_path, micro_json)
    train(cfg)
    checkpoints = tmp_path / "run" / "checkpoints"
    expected = load_file(checkpoints / "step_00000006" / "model.safetensors")
    state = checkpoints / "step_00000006" / "train_state.pt"
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif damage == "malicious":
        torch.save({"step": 6, "payload": _Payload()}, state)
    else:
        torch.save([1, 2, 3], state)
    message = {"truncated": "truncated or corrupt", "malicious": r"refusing to load it: it holds a pickled Python object \((posix|os).mkdir\)",
               "not_a_state": "not a clipforge training state"}[damage]

    with pytest.raises(CheckpointError, match=rf"step_00000006.train_state.pt.*{message}"):
        train(_cfg(tmp_path, micro_json, resume=str(checkpoints / "step_00000006")))  # named: no fallback
    with caplog.at_level(logging.WARNING, logger="clipforge.train.loop"):
        result = train(_cfg(tmp_path, micro_json, resume="latest"))
    assert "resuming from the newest intact checkpoint instead" in caplog.text and "step_00000004" in caplog.text
    assert result["step"] == 6
    resumed = load_file(checkpoints / "step_00000006" / "model.safetensors")
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)  # the same weights as the first run
    assert not (tmp_path / "payload_ran").exists()
    config = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert config["resolved"]["resumed_from"].endswith("step_00000004")


def test_every_checkpoint_damaged_is_one_clear_error(tmp_path, micro_json):
    train(_cfg(tmp_path, micro_json, steps=4))
    for folder in (tmp_path / "run" / "checkpoints").iterdir():
        (folder / "train_state.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(CheckpointError, match=r"cannot resume: .*step_00000004.*truncated or corrupt.*step_00000002"):
        train(_cfg(tmp_path, micro_json, steps=4, resume="latest"))

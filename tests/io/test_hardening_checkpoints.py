"""Checkpoint files and the demo's output folder against hostile or careless input (issue 11): refused
pickles named by their global, strict config.json keys at the top level too, one file-permission rule,
and a demo that validates everything before writing and never replaces files it did not write."""
import json
import os
import stat

import pytest
import torch

import clipforge
from clipforge.apps.demo import DEMO_MARKER, DemoConfig, _claim_output
from clipforge.io.checkpoints import read_checkpoint
from clipforge.io.hf import export_hf
from clipforge.io.tensors import CheckpointError
from clipforge.cli import main
from clipforge.io.factory import create_model, save


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo payload-ran",))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("tiny-vit")


def test_a_refused_pickle_is_named_by_its_global(tmp_path, capfd):
    torch.save({"visual.proj": torch.zeros(2), "x": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil.pt: refusing to load it: it holds a pickled Python object "
                                              r"\((posix|os).system\)") as caught:
        clipforge.load(tmp_path / "evil.pt", device="cpu")
    assert "truncated" not in str(caught.value) and "weights_only" not in str(caught.value)
    assert "payload-ran" not in capfd.readouterr().out
    (tmp_path / "garbage.pt").write_bytes(b"\x00\x01 not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=r"garbage.pt: .*truncated or corrupt \(not a valid pickle"):
        read_checkpoint(tmp_path / "garbage.pt")


def test_unknown_top_level_config_keys_are_refused(tmp_path, tiny):
    folder = save(tiny, tmp_path / "ours")
    assert read_checkpoint(folder).format == "clipforge"
    meta = json.loads((folder / "config.json").read_text())
    meta["preprocess_config"] = meta.pop("preprocess_cfg")  # a typo of a top-level key
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"config.json: unknown key\(s\) \['preprocess_config'\]"):
        clipforge.load(folder, device="cpu")
    # foreign folders keep their own keys: Hugging Face's config.json and OpenCLIP's open_clip_config.json
    assert read_checkpoint(export_hf(tiny, tmp_path / "hf")).format == "hf"
    openclip = tmp_path / "openclip"
    openclip.mkdir()
    (openclip / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": tiny.config.to_dict(), "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    save(tiny, tmp_path / "weights")
    os.replace(tmp_path / "weights" / "model.safetensors", openclip / "open_clip_model.safetensors")
    assert read_checkpoint(openclip).format == "open_clip"


def test_every_file_of_a_checkpoint_follows_the_umask(tmp_path, tiny):
    old = os.umask(0o022)
    try:
        folder = save(tiny, tmp_path / "model")
    finally:
        os.umask(old)
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o644}


# ------------------------------------------------------------------------------------------- demo

def test_demo_refuses_a_folder_of_other_files_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "data" / "builtin").mkdir(parents=True)
    (out / "report.md").write_text("my notes")
    (out / "data" / "builtin" / "templates.txt").write_text("my templates")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(["demo", "--output", str(out), "--steps", "5", "--workers", "0"]) == 2
    assert "is not empty and is not a previous demo folder" in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (out / "report.md").read_text() == "my notes"
    assert (out / "data" / "builtin" / "templates.txt").read_text() == "my templates"


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be a positive integer, got 0"),
    (["--batch-size", "-1"], "--batch-size must be a positive integer"),
    (["--eval-samples", "0"], "--eval-samples must be a positive integer"),
    (["--lr", "0"], "--lr must be positive"),
    (["--workers", "-2"], "--workers must be >= 0"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
])
def test_demo_validates_every_argument_before_writing(tmp_path, capsys, args, message):
    out = tmp_path / "new"
    assert main(["demo", "--output", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_demo_claims_new_empty_or_its_own_folders_only(tmp_path):
    _claim_output(tmp_path / "new")
    _claim_output(tmp_path / "new")  # a previous demo folder: marked
    assert (tmp_path / "new" / DEMO_MARKER).is_file()
    (tmp_path / "empty").mkdir()
    _claim_output(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        _claim_output(tmp_path / "file")
    assert DemoConfig().output == "demo_output"

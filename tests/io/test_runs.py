"""The run layout: step folders and their parsing, the newest complete checkpoint, atomic writes and file modes."""
import os
import stat

import pytest
import torch

import clipforge
from clipforge.models import CLIP, get_model_config
from clipforge.io.runs import (CHECKPOINTS_DIR, MODEL_FILES, STATE_NAME, TRAIN_FILES, is_complete, latest_checkpoint,
                            step_folder, step_folders, write_files, write_folder)
from clipforge.train.checkpoint import save_checkpoint


def _tiny() -> CLIP:
    torch.manual_seed(0)
    return CLIP(get_model_config("tiny-vit")).eval()


def _fake_checkpoint(folder, names):
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_text("x")


@pytest.fixture
def umask():
    def set_umask(mask):
        os.umask(mask)
    old = os.umask(0o022)
    yield set_umask
    os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_every_checkpoint_file_follows_the_umask(tmp_path, umask, mask):
    umask(mask)
    model = _tiny()
    folders = [clipforge.save(model, tmp_path / "ours"), clipforge.export_hf(model, tmp_path / "hf"),
               save_checkpoint(tmp_path / "run", 3, model, {"step": 3}, keep=2)]
    modes = {f"{p.parent.name}/{p.name}": oct(stat.S_IMODE(p.stat().st_mode)) for f in folders for p in f.iterdir()}
    assert modes == {name: oct(0o666 & ~mask) for name in modes}
    weights = {"ours/model.safetensors", "hf/model.safetensors", "step_00000003/model.safetensors",
               "step_00000003/train_state.pt", "ours/config.json", "hf/config.json", "step_00000003/config.json"}
    assert weights <= set(modes)  # the files safetensors and torch.save write, among all the others


def test_step_folders_are_parsed_and_sorted_by_step(tmp_path):
    root = tmp_path / CHECKPOINTS_DIR
    for name in ("step_00000010", "step_2", "step_x", ".tmp_step_00000011", "notes"):
        (root / name).mkdir(parents=True)
    (root / "step_7").write_text("a file, not a folder")
    assert step_folders(tmp_path) == [(2, root / "step_2"), (10, root / "step_00000010")]
    assert step_folder(tmp_path, 10) == root / "step_00000010"
    assert step_folders(tmp_path / "nowhere") == []


def test_latest_checkpoint_is_the_newest_holding_the_required_files(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    _fake_checkpoint(step_folder(tmp_path, 1), TRAIN_FILES)
    _fake_checkpoint(step_folder(tmp_path, 2), MODEL_FILES)
    _fake_checkpoint(step_folder(tmp_path, 3), MODEL_FILES[:1])  # an interrupted save
    assert latest_checkpoint(tmp_path) == step_folder(tmp_path, 2)
    assert latest_checkpoint(tmp_path, require=TRAIN_FILES) == step_folder(tmp_path, 1)
    assert is_complete(step_folder(tmp_path, 1), TRAIN_FILES)
    assert not is_complete(step_folder(tmp_path, 2), TRAIN_FILES)


def test_write_folder_replaces_an_existing_folder_and_cleans_stale_temporaries(tmp_path):
    final = step_folder(tmp_path, 5)
    _fake_checkpoint(final, ["old.txt"])
    (final.parent / ".tmp_step_00000004").mkdir()  # left behind by a killed process
    write_folder(final, lambda folder: write_files(folder, {STATE_NAME: lambda p: p.write_text("new")}))
    assert sorted(p.name for p in final.parent.iterdir()) == [final.name]
    assert sorted(p.name for p in final.iterdir()) == [STATE_NAME]


def test_failed_write_folder_keeps_the_previous_folder(tmp_path):
    final = step_folder(tmp_path, 5)
    _fake_checkpoint(final, ["old.txt"])

    def crash(folder):
        (folder / "partial").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_folder(final, crash)
    assert sorted(p.name for p in final.parent.iterdir()) == [final.name]
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]

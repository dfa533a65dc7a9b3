"""Checkpoint interchange: our folders, OpenAI/OpenCLIP files, shape inference, resizing, and clear errors."""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import clipforge
from clipforge.io import checkpoints, runs, tensors
from clipforge.io.checkpoints import infer_config, model_from_checkpoint, read_checkpoint, resize_positional_embeddings
from clipforge.io.tensors import CheckpointError
from clipforge.models import CLIP, CLIPConfig, get_model_config
from clipforge.transforms import PreprocessConfig

DATA = "tests/fixtures"


def _tiny(name: str = "tiny-vit", seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(get_model_config(name)).eval()


def _tokens(n: int, context_length: int, vocab_size: int = 49408) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    tokens = torch.zeros(n, context_length, dtype=torch.long)
    tokens[:, 0] = vocab_size - 2
    tokens[:, 1:6] = torch.randint(1, vocab_size - 2, (n, 5), generator=g)
    tokens[:, 6] = vocab_size - 1
    return tokens


def _outputs(model: CLIP, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(_tokens(2, model.context_length, model.vocab_size))


def _reference(name: str) -> tuple[dict[str, torch.Tensor], CLIPConfig]:
    return load_file(f"{DATA}/{name}.safetensors"), CLIPConfig.from_json(f"{DATA}/{name}.json")


def _assert_same_weights(model: CLIP, state_dict: dict[str, torch.Tensor]) -> None:
    ours = model.state_dict()
    assert ours.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert torch.equal(ours[key], value.to(ours[key].dtype)), key


@pytest.mark.parametrize("name,size", [("tiny-vit", 32), ("tiny-rn", 64)])
def test_save_then_load_gives_identical_outputs(tmp_path, name, size):
    model = _tiny(name)
    clipforge.save(model, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["format"] == "clipforge" and meta["version"] == 1
    assert CLIPConfig.from_dict(meta["model_cfg"]) == model.config
    assert PreprocessConfig.from_dict(meta["preprocess_cfg"]) == PreprocessConfig(image_size=size)
    loaded, preprocess = clipforge.load(tmp_path / "ckpt", device="cpu")
    assert not loaded.training and loaded.dtype == torch.float32 and preprocess.config.image_size == size
    assert loaded.config == model.config
    assert all(p.requires_grad for p in loaded.parameters())  # ready for fine-tuning
    for ours, theirs in zip(_outputs(model, size), _outputs(loaded, size)):
        assert torch.equal(ours, theirs)


def test_saved_preprocessing_comes_back(tmp_path):
    pre = PreprocessConfig(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize_mode="squash")
    clipforge.save(_tiny(), tmp_path / "ckpt", preprocess=pre.to_dict())
    model, transform = clipforge.load(tmp_path / "ckpt", device="cpu")
    assert transform.config == pre
    clipforge.save(model, tmp_path / "again", preprocess=transform)  # a transform carries its config
    assert clipforge.load(tmp_path / "again", device="cpu")[1].config == pre
    with pytest.raises(TypeError, match="PreprocessConfig"):
        clipforge.save(_tiny(), tmp_path / "other", preprocess="openai")


def test_interrupted_save_never_looks_complete(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    old = _tiny(seed=0)
    clipforge.save(old, folder)

    def crash_writing(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tensors, "save_file", crash_writing)
    with pytest.raises(KeyboardInterrupt):
        clipforge.save(_tiny(seed=1), folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]  # no temporaries
    loaded, _ = clipforge.load(folder, device="cpu")
    _assert_same_weights(loaded, old.state_dict())  # the old checkpoint is intact
    monkeypatch.undo()

    real_replace = runs.os.replace

    def crash_before_config(src, dst):
        if str(dst).endswith("config.json"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(runs.os, "replace", crash_before_config)
    with pytest.raises(KeyboardInterrupt):
        clipforge.save(_tiny(seed=1), folder)
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors"]
    with pytest.raises(CheckpointError, match="incomplete"):
        clipforge.load(folder, device="cpu")


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_rn"])
def test_openai_state_dict_round_trips(name):
    state_dict, config = _reference(name)
    model = model_from_checkpoint(read_checkpoint(f"{DATA}/{name}.safetensors"), config)
    _assert_same_weights(model, state_dict)


class _OpenAIArchive(torch.nn.Module):
    """CLIP's modules and parameters at the top level plus OpenAI's three extra scalars, as in their archives."""

    def __init__(self, model: CLIP):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self.register_buffer("input_resolution", torch.tensor(model.image_size))
        self.register_buffer("context_length", torch.tensor(model.context_length))
        self.register_buffer("vocab_size", torch.tensor(model.vocab_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)


def _torchscript_archive(model: CLIP, path) -> None:
    """Save ``model`` the way OpenAI's released files are: a traced fp16 module with three extra scalars."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(_OpenAIArchive(model), torch.randn(1, 3, model.image_size, model.image_size))
        torch.jit.save(traced.half(), str(path))


def test_openai_torchscript_archive_loads(tmp_path):
    state_dict, config = _reference("tiny_vit")
    model = CLIP(config)
    model.load_state_dict(state_dict)
    _torchscript_archive(model, tmp_path / "ViT-tiny.pt")
    checkpoint = read_checkpoint(tmp_path / "ViT-tiny.pt")
    assert checkpoint.format == "torchscript" and checkpoint.state_dict.keys() == state_dict.keys()
    loaded, _ = clipforge.load(tmp_path / "ViT-tiny.pt", device="cpu")
    _assert_same_weights(loaded, {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()})
    assert loaded.dtype == torch.float32 and loaded.config.quick_gelu


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors"])
def test_openclip_checkpoints_load(tmp_path, suffix):
    state_dict, config = _reference("tiny_vit")
    wrapped = {f"module.{k}": v for k, v in state_dict.items()}
    path = tmp_path / f"epoch_3{suffix}"
    if suffix == ".safetensors":
        save_file(wrapped, str(path))
    else:
        model = CLIP(config)
        optimizer = torch.optim.AdamW(model.parameters())
        model.logit_scale.grad = torch.ones(())
        optimizer.step()
        torch.save({"epoch": 3, "name": "run", "state_dict": wrapped, "optimizer": optimizer.state_dict()}, path)
    model = clipforge.create_model(config, pretrained=path)
    _assert_same_weights(model, state_dict)


def _expected_inferred(config: CLIPConfig) -> CLIPConfig:
    """What shapes can tell: everything but the heads (OpenAI's 64 channels per head) and the activation."""
    text_heads = config.text_cfg.width // 64 if config.text_cfg.encoder == "transformer" else config.text_cfg.heads
    return config.replace(head_width=64, heads=text_heads, quick_gelu=True)


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_rn"])
def test_shape_inference_recovers_reference_configs(name):
    state_dict, config = _reference(name)
    assert infer_config(state_dict) == _expected_inferred(config)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn", "tiny-vit-cbow", "ViT-B-32-quickgelu", "RN50"])
def test_shape_inference_recovers_registered_configs(name):
    config = get_model_config(name)
    with torch.device("meta"):
        state_dict = CLIP(config).state_dict()
    inferred = infer_config(state_dict)
    if name.startswith("tiny"):
        config = _expected_inferred(config)
    if config.text_cfg.encoder == "cbow":  # no positions in a bag of words: the context length is unknown
        inferred = inferred.replace(context_length=config.text_cfg.context_length)
    assert inferred == config


def test_positional_embeddings_are_interpolated_on_load(tmp_path):
    model = _tiny("tiny-vit")
    clipforge.save(model, tmp_path / "ckpt")
    state_dict = model.state_dict()
    same = resize_positional_embeddings(state_dict, model)
    assert same.keys() == state_dict.keys() and all(same[k] is state_dict[k] for k in same)  # identity
    bigger = clipforge.create_model("tiny-vit", pretrained=tmp_path / "ckpt", image_size=64)
    pos = bigger.visual.positional_embedding
    assert pos.shape == (1 + 8 * 8, 128)
    assert torch.equal(pos[0], model.visual.positional_embedding[0])  # the class token is kept
    assert torch.isfinite(bigger.encode_image(torch.randn(1, 3, 64, 64))).all()
    flat = {"visual.positional_embedding": torch.ones(17, 128)}
    torch.testing.assert_close(resize_positional_embeddings(flat, bigger)["visual.positional_embedding"],
                               torch.ones(65, 128))  # a constant grid stays constant


def test_resnet_attention_pool_embeddings_are_interpolated(tmp_path):
    model = _tiny("tiny-rn")
    clipforge.save(model, tmp_path / "ckpt")
    bigger = clipforge.create_model("tiny-rn", pretrained=tmp_path / "ckpt", image_size=128)
    assert bigger.visual.attnpool.positional_embedding.shape == (1 + 4 * 4, 512)
    assert bigger.encode_image(torch.randn(1, 3, 128, 128)).shape == (1, 128)


def test_shorter_context_truncates_text_positions_exactly(tmp_path):
    model = _tiny("tiny-vit")
    clipforge.save(model, tmp_path / "ckpt")
    short = clipforge.create_model("tiny-vit", pretrained=tmp_path / "ckpt", context_length=8).eval()
    tokens = _tokens(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(short.encode_text(tokens), model.encode_text(tokens))


def test_training_run_directory_loads_newest_complete_step(tmp_path):
    run = tmp_path / "run"
    for step, seed in ((10, 0), (20, 1), (30, 2)):
        clipforge.save(_tiny(seed=seed), run / "checkpoints" / f"step_{step}")
    (run / "checkpoints" / "step_30" / "config.json").unlink()  # an interrupted save
    loaded, _ = clipforge.load(run, device="cpu")
    _assert_same_weights(loaded, _tiny(seed=1).state_dict())
    for step in (10, 20):
        (run / "checkpoints" / f"step_{step}" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"run.*no complete checkpoint"):
        clipforge.load(run, device="cpu")


# ---- bad input: each error names the file and says what is wrong ----

def test_nonexistent_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        clipforge.load(tmp_path / "nope.pt", device="cpu")
    with pytest.raises(FileNotFoundError, match="nope.pt.*does not exist"):
        clipforge.create_model("tiny-vit", pretrained=tmp_path / "nope.pt")


@pytest.mark.parametrize("kind", ["safetensors", "pt"])
def test_truncated_file(tmp_path, kind):
    state_dict, _ = _reference("tiny_vit")
    path = tmp_path / f"weights.{kind}"
    save_file(state_dict, str(path)) if kind == "safetensors" else torch.save(state_dict, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"weights\.{kind}.*truncated or corrupt"):
        clipforge.load(path, device="cpu")


def test_corrupt_and_empty_files(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"\x00\x01 not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="garbage.pt.*truncated or corrupt"):
        read_checkpoint(tmp_path / "garbage.pt")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.bin.*empty"):
        read_checkpoint(tmp_path / "empty.bin")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt.*no state dict"):
        read_checkpoint(tmp_path / "list.pt")


class Payload:
    """An arbitrary object; unpickling one must never happen."""

    unpickled = False

    def __setstate__(self, state):
        Payload.unpickled = True


def test_pickled_objects_are_refused(tmp_path):
    state_dict, _ = _reference("tiny_vit")
    torch.save({"state_dict": state_dict, "extra": Payload()}, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError, match="unsafe.pt.*arbitrary code"):
        read_checkpoint(tmp_path / "unsafe.pt")
    assert not Payload.unpickled


def test_checkpoint_of_another_architecture(tmp_path):
    with pytest.raises(CheckpointError) as info:
        clipforge.create_model("tiny-vit", pretrained=f"{DATA}/tiny_vit.safetensors")
    message = str(info.value)
    assert "tiny_vit.safetensors" in message and "shape mismatches" in message
    assert "token_embedding.weight: checkpoint (1000, 64) vs model (49408, 128)" in message
    expected = r"tiny_rn.safetensors.*missing keys \(31\): visual.class_embedding.*unexpected keys.*visual.attnpool"
    with pytest.raises(CheckpointError, match=expected):
        clipforge.create_model(f"{DATA}/tiny_vit.json", pretrained=f"{DATA}/tiny_rn.safetensors")


def test_missing_and_unexpected_keys(tmp_path):
    state_dict, config = _reference("tiny_vit")
    del state_dict["ln_final.bias"]
    state_dict["extra.weight"] = torch.zeros(1)
    save_file(state_dict, str(tmp_path / "edited.safetensors"))
    with pytest.raises(CheckpointError, match=r"edited.safetensors.*missing keys \(1\): ln_final.bias.*"
                                              r"unexpected keys \(1\): extra.weight"):
        clipforge.create_model(config, pretrained=tmp_path / "edited.safetensors")


def test_folders_that_are_not_checkpoints(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.*neither clipforge's files.*nor a Hugging Face"):
        clipforge.load(tmp_path / "notes", device="cpu")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CheckpointError, match="other/config.json.*neither a clipforge"):
        clipforge.load(tmp_path / "other", device="cpu")
    clipforge.save(_tiny(), tmp_path / "newer")
    meta = json.loads((tmp_path / "newer" / "config.json").read_text())
    (tmp_path / "newer" / "config.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(CheckpointError, match="newer/config.json.*newer clipforge"):
        clipforge.load(tmp_path / "newer", device="cpu")
    (tmp_path / "newer" / "config.json").write_text('{"format": "clip')
    with pytest.raises(CheckpointError, match="newer/config.json.*not valid JSON"):
        clipforge.load(tmp_path / "newer", device="cpu")


def test_state_dict_without_clip_keys_cannot_be_inferred(tmp_path):
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(tmp_path / "bert.safetensors"))
    with pytest.raises(CheckpointError, match="bert.safetensors.*does not look like a CLIP checkpoint"):
        clipforge.load(tmp_path / "bert.safetensors", device="cpu")


def test_take_keeps_owned_float32_tensors_and_copies_the_rest():
    state_dict, config = _reference("tiny_vit")
    checkpoint = read_checkpoint(f"{DATA}/tiny_vit.safetensors")
    name = "visual.conv1.weight"
    owned = checkpoint.state_dict[name]
    half = checkpoint.state_dict["text_projection"] = checkpoint.state_dict["text_projection"].half()
    model = model_from_checkpoint(checkpoint, config, take=True)
    assert model.visual.conv1.weight.data_ptr() == owned.data_ptr()  # taken, not copied
    assert model.text_projection.dtype == torch.float32 and model.text_projection.data_ptr() != half.data_ptr()
    copied = model_from_checkpoint(read_checkpoint(f"{DATA}/tiny_vit.safetensors"), config)
    assert copied.visual.conv1.weight.data_ptr() != owned.data_ptr()
    pointers = [p.data_ptr() for p in model.parameters()]
    assert len(set(pointers)) == len(pointers)  # no two parameters share storage
    view = torch.randn(8, 4)  # views of one tensor (a fused qkv split in three) are copied
    assert not checkpoints._owns_storage(view[:4]) and not checkpoints._owns_storage(view.t())
    assert checkpoints._owns_storage(view)

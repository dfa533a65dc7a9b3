"""TorchScript archives read as data: the same tensors as ``torch.jit.load``, and no archive code ever runs."""
import io
import os
import pickle
import warnings
import zipfile
from typing import Dict, List, Optional, Tuple

import pytest
import torch
from PIL import Image
from test_checkpoints import _torchscript_archive

import clipforge
from clipforge.io.checkpoints import read_checkpoint
from clipforge.io.tensors import CheckpointError
from clipforge.cli import main
from clipforge.io.openai import TorchScriptError, read_torchscript

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")  # the archives' writer


def _assert_bit_identical(ours: dict, reference: dict) -> None:
    assert list(ours) == list(reference)
    for key, expected in reference.items():
        got = ours[key]
        assert (got.dtype, got.shape, got.stride()) == (expected.dtype, expected.shape, expected.stride()), key
        assert torch.equal(got.reshape(-1).view(torch.uint8), expected.detach().reshape(-1).view(torch.uint8)), key
        assert not got.requires_grad


def _jit_state_dict(path) -> dict:
    return dict(torch.jit.load(str(path), map_location="cpu").state_dict())


def _traced_clip(name: str, path, half: bool = False) -> None:
    torch.manual_seed(0)
    model = clipforge.create_model(name).eval()
    images = torch.randn(1, 3, model.image_size, model.image_size)
    tokens = torch.zeros(1, model.context_length, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (images, tokens))
    torch.jit.save(traced.half() if half else traced, str(path))


@pytest.mark.parametrize("name,half", [("tiny-vit", False), ("tiny-rn", False), ("tiny-vit", True)])
def test_traced_clip_matches_jit_load(tmp_path, name, half):
    path = tmp_path / f"{name}.pt"
    _traced_clip(name, path, half)
    _assert_bit_identical(read_torchscript(path), _jit_state_dict(path))


def test_openai_layout_matches_jit_load(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "ViT-tiny.pt"
    _torchscript_archive(clipforge.create_model("tiny-vit").eval(), path)
    reference = _jit_state_dict(path)
    assert {"input_resolution", "context_length", "vocab_size"} <= reference.keys()
    _assert_bit_identical(read_torchscript(path), reference)


class _Block(torch.nn.Module):
    """Every kind of attribute a scripted module pickles: parameters (one None), persistent and non-persistent
    buffers, a plain tensor attribute (not in the state dict), typed lists, dicts, tuples, strings, devices."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 4, bias=False)
        self.register_buffer("steps", torch.arange(5))
        self.register_buffer("scratch", torch.ones(2), persistent=False)
        self.plain = torch.zeros(3)
        self.sizes: List[int] = [1, 2, 3]
        self.table: Dict[str, float] = {"a": 1.0}
        self.pair: Tuple[int, str] = (1, "x")
        self.maybe: Optional[torch.Tensor] = None
        self.floats: List[float] = [1.5]
        self.flags: List[bool] = [True]
        self.tensors: List[torch.Tensor] = [torch.ones(1)]
        self.device = torch.device("cpu")
        self.name = "block"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = self.plain.sum() + self.steps.sum() + self.scratch.sum() + len(self.sizes) + self.table["a"]
        return (self.proj(x) + extra + self.floats[0] + float(self.flags[0]) + self.tensors[0]).to(self.device)


class _Scriptable(torch.nn.Module):
    """A small scriptable model: clipforge's own towers branch on Python types that TorchScript cannot compile."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.randn(4).to(torch.bfloat16))
        self.register_buffer("transposed", torch.randn(2, 3).half().t())
        self.block = _Block()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        self.heads = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 2)})
        self.layers = torch.nn.ModuleList([torch.nn.LayerNorm(4), torch.nn.LayerNorm(4)])
        self.attn = torch.nn.MultiheadAttention(4, 2)
        self.shared = self.heads["a"]  # one module under two names: both appear in the state dict

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.block(x) + self.scale.float() + self.stem(image).mean()
        for layer in self.layers:
            x = layer(x)
        x = self.attn(x, x, x)[0]
        return self.heads["a"](x) + self.shared(x)


def test_scripted_module_matches_jit_load(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(_Scriptable().eval()), str(path))
    reference = _jit_state_dict(path)
    assert "block.scratch" in reference and "block.plain" not in reference and "shared.weight" in reference
    _assert_bit_identical(read_torchscript(path), reference)


class _Payload(torch.nn.Module):
    """A module whose scripted ``__setstate__`` creates (or overwrites) a file when ``torch.jit.load`` runs it."""

    def __init__(self, target: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))
        self.target = target
        self.blob = torch.zeros(0, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
        return self.weight, self.target, self.training

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
        self.weight, self.target, self.training = state[0], state[1], state[2]
        self.blob = torch.from_file(self.target, True, 16, dtype=torch.uint8)
        self.blob.fill_(65)


class _Carrier(torch.nn.Module):
    def __init__(self, target: str):
        super().__init__()
        self.visual = _Payload(target)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def _snapshot(folder) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture
def evil_archive(tmp_path):
    target = tmp_path / "written-on-load.bin"
    path = tmp_path / "evil.pt"
    torch.jit.save(torch.jit.script(_Carrier(str(target))), str(path))
    assert not target.exists()
    torch.jit.load(str(path))  # the payload is real: torch.jit.load writes the file
    assert target.read_bytes() == b"A" * 16
    target.unlink()
    return path, target


def test_scripted_setstate_is_refused_without_running(evil_archive, tmp_path):
    path, target = evil_archive
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=r"evil\.pt: refusing to load it: its class __torch__\.\S*_Payload "
                                              r"defines __setstate__"):
        clipforge.load(path, device="cpu")
    with pytest.raises(CheckpointError, match="__setstate__"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="__setstate__"):  # train --pretrained takes this path
        clipforge.create_model("tiny-vit", pretrained=path)
    assert not target.exists() and _snapshot(tmp_path) == before


def test_cli_refuses_the_archive_with_an_error_not_a_traceback(evil_archive, tmp_path, capsys):
    path, target = evil_archive
    image = tmp_path / "image.png"
    Image.new("RGB", (32, 32), "red").save(image)
    before = _snapshot(tmp_path)
    assert main(["classify", str(image), "--model", str(path), "--labels", "a,b"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("clipforge classify: error: ") and "__setstate__" in err and "Traceback" not in err
    assert not target.exists() and _snapshot(tmp_path) == before


def _rewrite(archive, out, replace: dict) -> None:
    """Copy a zip archive, replacing the contents of the records named in ``replace``."""
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info, replace.get(info.filename, src.read(info.filename)))


class _MakeDir:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_unexpected_global_is_refused_by_name(tmp_path):
    good = tmp_path / "good.pt"
    _traced_clip("tiny-vit", good)
    target = tmp_path / "made-on-load"
    evil = tmp_path / "evil.pt"
    _rewrite(good, evil, {"good/data.pkl": pickle.dumps(_MakeDir(str(target)), protocol=2)})
    with pytest.raises(CheckpointError, match=r"asks for the Python global (posix|os)\.mkdir"):
        read_checkpoint(evil)
    assert not target.exists()


def test_torch_jit_load_is_never_called(tmp_path, monkeypatch):
    path = tmp_path / "ViT-tiny.pt"
    source = clipforge.create_model("tiny-vit").eval()
    _torchscript_archive(source, path)

    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load runs the archive's code")

    monkeypatch.setattr(torch.jit, "load", refuse)
    model, _ = clipforge.load(path, device="cpu")
    assert torch.equal(model.visual.conv1.weight, source.visual.conv1.weight.half().float())


def _storage_records(path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        return [n for n in z.namelist() if "/data/" in n]


def test_damaged_archives_give_clear_errors(tmp_path):
    good = tmp_path / "good.pt"
    _traced_clip("tiny-vit", good)
    record = _storage_records(good)[0]
    short = tmp_path / "short.pt"
    _rewrite(good, short, {record: b"\0" * 3})
    with pytest.raises(CheckpointError, match=r"short\.pt: record .* holds 3 bytes"):
        read_checkpoint(short)
    no_code = tmp_path / "no_code.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(no_code, "w") as dst:
        for info in src.infolist():
            if "/code/" not in info.filename:
                dst.writestr(info, src.read(info.filename))
    with pytest.raises(CheckpointError, match="no record .* declaring its classes"):
        read_checkpoint(no_code)


def test_tensor_views_must_stay_inside_their_storage():
    from clipforge.io.openai import _rebuild_tensor, _Storage
    storage = _Storage(torch.float32, torch.zeros(4).untyped_storage())
    assert _rebuild_tensor(storage, 1, (3,), (1,)).tolist() == [0.0, 0.0, 0.0]
    for offset, size, stride in [(1, (4,), (1,)), (0, (2, 2), (3, 1)), (-1, (1,), (1,)), (0, (2,), (-1,))]:
        with pytest.raises(TorchScriptError):
            _rebuild_tensor(storage, offset, size, stride)
    assert storage.data.nbytes() == 16  # never grown to fit a bad view


def test_a_plain_zip_named_like_an_archive_is_not_unpickled_freely(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("x/constants.pkl", pickle.dumps(()))
        z.writestr("x/data.pkl", pickle.dumps(_MakeDir(str(tmp_path / "made")), protocol=2))
    (tmp_path / "x.pt").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="mkdir"):
        read_checkpoint(tmp_path / "x.pt")
    assert not (tmp_path / "made").exists()

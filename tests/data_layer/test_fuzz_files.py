"""Fuzzing the image decoder and the checkpoint sniffers with mutated real files (issue 11): bit flips,
truncations and header edits of PNG/JPEG/GIF/WebP/BMP/TIFF images and safetensors, torch zip and
TorchScript checkpoints raise only the documented errors, never run archive code, and stay within a
bounded amount of memory (measured in a child process)."""
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from clipforge.io.tensors import CheckpointError, read_tensors
from clipforge.data import BadSample, load_image

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")


def _images() -> dict[str, bytes]:
    img = Image.new("RGB", (24, 16))
    img.putdata([(x * 10 % 256, y * 15 % 256, (x + y) % 256) for y in range(16) for x in range(24)])
    out = {}
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"):
        buf = io.BytesIO()
        img.save(buf, fmt)
        out[fmt] = buf.getvalue()
    return out


def _checkpoints(folder: Path) -> dict[str, Path]:
    tensors = {"weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "bias": torch.ones(3)}
    paths = {"safetensors": folder / "m.safetensors", "torch": folder / "m.pt", "torchscript": folder / "ts.pt"}
    save_file(tensors, str(paths["safetensors"]))
    torch.save(tensors, paths["torch"])
    linear = torch.nn.Linear(4, 3)
    torch.jit.save(torch.jit.trace(linear, torch.zeros(1, 4)), str(paths["torchscript"]))
    return paths


IMAGES = _images()
mutations = st.lists(st.tuples(st.sampled_from(["flip", "header", "cut"]), st.floats(0, 1), st.integers(1, 255)),
                     min_size=1, max_size=5)


def mutate(data: bytes, edits) -> bytes:
    """Bit flips anywhere, byte edits in the first 64 bytes (sizes, lengths, magic), or a truncation."""
    data = bytearray(data)
    for kind, where, value in edits:
        if not data:
            break
        if kind == "flip":
            data[int(where * (len(data) - 1))] ^= value
        elif kind == "header":
            data[int(where * (min(64, len(data)) - 1))] = value
        else:
            data = data[: int(where * len(data))]
    return bytes(data)


def _no_jit_load(*args, **kwargs):
    raise AssertionError("torch.jit.load would run the archive's code")


@settings(max_examples=150, deadline=None)
@given(fmt=st.sampled_from(sorted(IMAGES)), edits=mutations)
def test_mutated_images_raise_only_bad_sample(fmt, edits):
    try:
        img = load_image(mutate(IMAGES[fmt], edits), name=f"mutated.{fmt.lower()}")
    except BadSample as bad:
        assert bad.reason in ("empty_file", "unreadable_image", "too_many_pixels") and "mutated." in str(bad)
        return
    assert img.width * img.height <= 89_478_485


@pytest.fixture(scope="module")
def checkpoint_files(tmp_path_factory) -> dict[str, bytes]:
    return {kind: path.read_bytes() for kind, path in _checkpoints(tmp_path_factory.mktemp("ckpt")).items()}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["safetensors", "torch", "torchscript"]), edits=mutations)
def test_mutated_checkpoints_raise_only_checkpoint_error(checkpoint_files, tmp_path_factory, monkeypatch, kind,
                                                         edits):
    monkeypatch.setattr(torch.jit, "load", _no_jit_load)
    path = tmp_path_factory.mktemp("mutated") / ("m.safetensors" if kind == "safetensors" else "m.pt")
    path.write_bytes(mutate(checkpoint_files[kind], edits))
    try:
        tensors, _ = read_tensors(path)
    except CheckpointError as error:
        assert str(path) in str(error)
        return
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())


def test_safetensors_header_claiming_huge_tensors_is_refused(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}}).encode()
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="huge.safetensors"):
        read_tensors(path)
    path.write_bytes(struct.pack("<Q", 1 << 62) + b"{}")  # a header length past the end of the file
    with pytest.raises(CheckpointError, match="huge.safetensors"):
        read_tensors(path)


_MEMORY_PROBE = r"""
import random, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import test_fuzz_files as fuzz
from clipforge.io.tensors import CheckpointError, read_tensors
from clipforge.data import BadSample, load_image
folder = Path(sys.argv[2])
checkpoints = {k: p.read_bytes() for k, p in fuzz._checkpoints(folder).items()}
rng = random.Random(5)
def edits():
    return [(rng.choice(["flip", "header", "cut"]), rng.random(), rng.randrange(1, 256)) for _ in range(rng.randrange(1, 6))]
for data in list(fuzz.IMAGES.values()) + list(checkpoints.values()):  # warm up every reader once
    try:
        load_image(data)
    except BadSample:
        pass
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for i in range(600):
    fmt = rng.choice(sorted(fuzz.IMAGES))
    try:
        load_image(fuzz.mutate(fuzz.IMAGES[fmt], edits()))
    except BadSample:
        pass
    kind = rng.choice(sorted(checkpoints))
    path = folder / f"m{i % 7}.{'safetensors' if kind == 'safetensors' else 'pt'}"
    path.write_bytes(fuzz.mutate(checkpoints[kind], edits()))
    try:
        read_tensors(path)
    except CheckpointError:
        pass
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.slow
def test_memory_stays_bounded_over_many_mutations(tmp_path):
    """A child process decodes 600 mutated images and reads 600 mutated checkpoints; its peak RSS may grow
    by at most 300 MiB (a decoded image is bounded by max_pixels; these files declare at most 64 KiB
    headers' worth of sizes)."""
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(Path(__file__).parent), str(tmp_path)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) < 300, done.stdout

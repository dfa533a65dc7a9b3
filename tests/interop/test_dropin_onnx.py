"""Users of other languages: an ONNX export folder describes itself and is used with ONNX Runtime alone
(a consumer script that imports no clipforge), giving clipforge's zero-shot probabilities."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (pip install 'clipforge[onnx]')")
onnx = pytest.importorskip("onnx")
pytest.importorskip("tokenizers")

import clipforge  # noqa: E402
from clipforge.io.onnx import IMAGE_FILE, META_FILE, TEXT_FILE, OnnxEncoder, export_onnx  # noqa: E402
from clipforge.transforms import PreprocessConfig  # noqa: E402

LABELS = ["a diagram", "a dog", "a cat"]

# Reads only the folder: onnx_config.json, tokenizer.json and the two graphs.
CONSUMER = r'''
import json, sys
import numpy as np, onnxruntime as ort
from PIL import Image
from tokenizers import Tokenizer

folder, image_path, labels = sys.argv[1], sys.argv[2], sys.argv[3:]
meta = json.load(open(f"{folder}/onnx_config.json"))
pre, size = meta["preprocess"], meta["preprocess"]["image_size"]
image = Image.open(image_path).convert("RGB")
scale = size / min(image.size)  # resize_mode "shortest": shorter side to size, then centre crop
image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                     {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[pre["interpolation"]])
left, top = (image.width - size) // 2, (image.height - size) // 2
pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
pixels = ((pixels - pre["mean"]) / pre["std"]).transpose(2, 0, 1)[None].astype(np.float32)
tokenizer = Tokenizer.from_file(f"{folder}/tokenizer.json")
rows = [e.ids for e in tokenizer.encode_batch(labels)]
tokens = np.zeros((len(rows), meta["context_length"]), dtype=np.int64)  # pad with zeros, as documented
for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
image_features = ort.InferenceSession(f"{folder}/image_encoder.onnx").run(None, {"images": pixels})[0]
text_features = ort.InferenceSession(f"{folder}/text_encoder.onnx").run(None, {"tokens": tokens})[0]
image_features /= np.linalg.norm(image_features, axis=-1, keepdims=True)
text_features /= np.linalg.norm(text_features, axis=-1, keepdims=True)
logits = meta["logit_scale"] * image_features @ text_features.T
probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
assert not any(name.startswith("clipforge") for name in sys.modules), "the consumer imported clipforge"
print(json.dumps(probabilities[0].tolist()))
'''


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = clipforge.create_model("tiny-vit").eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(50))  # a trained-looking temperature, not the initial one
    pre = PreprocessConfig(image_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))
    folder = tmp_path_factory.mktemp("onnx")
    export_onnx(model, folder, preprocess=pre)
    return model, pre, folder


@pytest.mark.slow
def test_folder_describes_itself(exported):
    model, pre, folder = exported
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["logit_scale"] == pytest.approx(50.0, rel=1e-6) and meta["features_normalized"] is False
    assert meta["context_length"] == 32 and meta["preprocess"]["mean"] == list(pre.mean)
    assert meta["preprocess"]["std"] == list(pre.std) and meta["preprocess"]["resize_mode"] == "shortest"
    assert meta["text_input"]["dtype"] == "int64" and meta["image_input"]["shape"][1:] == [3, 32, 32]
    for name in meta["tokenizer_files"]:
        assert (folder / name).is_file(), name
    for graph in (IMAGE_FILE, TEXT_FILE):  # the same description inside each graph
        props = {p.key: json.loads(p.value) for p in onnx.load(str(folder / graph)).metadata_props}
        assert props["logit_scale"] == meta["logit_scale"] and props["preprocess"] == meta["preprocess"]


def test_onnx_runtime_alone_gives_clipforges_probabilities(exported, tmp_path):
    model, pre, folder = exported
    noise = np.random.default_rng(0).integers(0, 255, (50, 71, 3), dtype=np.uint8)
    Image.fromarray(noise).resize((142, 100), Image.BILINEAR).save(tmp_path / "image.png")
    script = tmp_path / "consumer.py"
    script.write_text(CONSUMER)
    done = subprocess.run([sys.executable, str(script), str(folder), str(tmp_path / "image.png"), *LABELS],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    theirs = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))
    transform = clipforge.transforms.image_transform(32, mean=pre.mean, std=pre.std)
    with torch.no_grad():
        logits, _ = model(transform(Image.open(tmp_path / "image.png"))[None],
                          clipforge.tokenize(LABELS, context_length=32))
    ours = logits.softmax(-1)[0]
    assert ours.max() > 0.6  # a clear answer, not a near-uniform one
    torch.testing.assert_close(theirs, ours, atol=2e-3, rtol=0)


def test_int32_tokens_and_too_long_rows(exported):
    model, _, folder = exported
    encoder = OnnxEncoder(folder)
    tokens = clipforge.tokenize(LABELS, context_length=32)
    torch.testing.assert_close(encoder.encode_text(tokens.int().numpy()), encoder.encode_text(tokens))
    too_long = np.zeros((1, 33), dtype=np.int64)
    with pytest.raises(ValueError, match=r"length <= 32"):
        encoder.encode_text(too_long)

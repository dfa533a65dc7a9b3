"""ONNX export of CLIP's two encoders, and ONNX Runtime as an optional embedding backend (``onnx`` extra).

``export_onnx`` writes ``image_encoder.onnx`` (float32 images (N, 3, H, W) -> features (N, embed_dim))
and ``text_encoder.onnx`` (int64 tokens (N, L <= context_length) -> features), both with a dynamic batch
axis (the text graph also with a dynamic length: ``OnnxEncoder`` cuts rows after the last end-of-text),
using PyTorch's TorchScript-based exporter (ONNX opset 17; no ``onnxscript`` needed), plus
``onnx_config.json``: the model config and, for users of other languages, the preprocessing, the tokenizer
files written beside it, the context length and the trained logit scale (also in each graph's metadata).
``int8=True`` writes the same folder with both graphs quantised by ONNX Runtime's dynamic quantiser (int8
weights, activations quantised at run time) in the layers ``clipforge.models.quantize`` quantises.
``OnnxEncoder`` runs either with ONNX Runtime.
"""
from __future__ import annotations

import copy
import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipforge.io.hf import hf_tokenizer_files
from clipforge.models.clip import CLIP
from clipforge.models.config import CLIPConfig
from clipforge.models.text import cut_after_end_of_text
from clipforge.transforms import PreprocessConfig

IMAGE_FILE, TEXT_FILE, META_FILE = "image_encoder.onnx", "text_encoder.onnx", "onnx_config.json"
FORMAT, FORMAT_VERSION = "clipforge-onnx", 1
DEFAULT_OPSET = 17
DEFAULT_ATOL = 1e-4
INT8_MIN_COSINE = 0.99  # an int8 export's features must be at least this close to PyTorch's float32 ones
# The graph nodes an int8 export quantises, by the exporter's scope names: every MatMul of the Transformer blocks
# (attention projections, MLP) and a ResNet's attention-pool query, key and value projections, as
# clipforge.models.quantize does. Embeddings, convolutions and the projections into the joint space stay float32.
_INT8_SCOPES = ("/transformer/resblocks", "/attnpool/q_proj/", "/attnpool/k_proj/", "/attnpool/v_proj/")
INT8_DESCRIPTION = {
    "method": "onnxruntime.quantization.quantize_dynamic",
    "weights": "int8, one scale per tensor", "activations": "uint8, scale and zero point computed at each run",
    "quantized": "the MatMul nodes of the Transformer blocks (attention and MLP) and a ResNet's attention-pool "
                 "query/key/value projections",
    "float32": "embeddings, convolutions, LayerNorm, attention scores, the projections into the joint space"}
_INSTALL_HINT = "install the ONNX extra: pip install 'clipforge[onnx]' (onnx, onnxruntime)"


class _Encoder(nn.Module):
    """One of ``model``'s encoders (``"image"`` or ``"text"``) as a module with a single input, to export."""

    def __init__(self, model: CLIP, tower: str):
        super().__init__()
        self.model, self.tower = model, tower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x) if self.tower == "image" else self.model.encode_text(x)


def export_onnx(model: CLIP, folder: str | Path, opset: int = DEFAULT_OPSET, verify: bool = True,
                atol: float = DEFAULT_ATOL, preprocess: PreprocessConfig | None = None,
                int8: bool = False) -> dict[str, Path]:
    """Write ``model``'s image and text encoders as ONNX graphs into ``folder``; return the paths.

    ``preprocess`` (default OpenAI's at the model's image size) and the tokenizer are described in
    ``onnx_config.json`` (see ``describe``) and the tokenizer files (``tokenizer.json``, ``vocab.json``,
    ``merges.txt``, ...) written beside it, so the folder is usable without clipforge.

    The graphs are exported from an fp32 CPU copy in eval mode (``model`` itself is left as it was).
    ``verify=True`` runs both graphs with ONNX Runtime on a batch size other than the one traced
    and raises RuntimeError unless every output is within ``atol`` (relative to the largest feature
    magnitude, when that exceeds 1) of PyTorch's; the differences go into ``onnx_config.json``
    as ``max_difference``. Returns the paths of ``image``, ``text`` and ``config``.

    ``int8=True``: both graphs dynamically quantised by ONNX Runtime (``quantize_onnx``; ``onnx_config.json``
    says ``"precision": "int8"`` and how, under ``quantization``), for plain ONNX Runtime on a CPU. Verification
    then requires a cosine of at least ``INT8_MIN_COSINE`` between every ONNX Runtime feature and PyTorch's
    float32 one (``min_cosine`` in ``onnx_config.json``) instead of ``atol``.
    """
    _check_exportable(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).float().cpu().eval()
    paths = {"image": folder / IMAGE_FILE, "text": folder / TEXT_FILE}
    if int8:
        with tempfile.TemporaryDirectory(dir=folder, prefix=".float32-") as tmp:
            float_paths = _export_both(model, Path(tmp), opset)
            for name in ("image", "text"):
                quantize_onnx(float_paths[name], paths[name])
    else:
        _export_both(model, folder, opset)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "opset": opset, **describe(model, preprocess),
            "model_cfg": model.config.to_dict(), "precision": "int8" if int8 else "fp32"}
    if int8:
        meta["quantization"] = {**INT8_DESCRIPTION, "onnxruntime": _onnxruntime().__version__}
    _add_metadata(paths.values(), meta)
    for name, text in hf_tokenizer_files(model.context_length).items():
        (folder / name).write_text(text, encoding="utf-8")
    paths["config"] = folder / META_FILE
    paths["config"].write_text(json.dumps(meta, indent=2))
    if verify:
        meta.update(_verified(model, folder, atol, int8))
        paths["config"].write_text(json.dumps(meta, indent=2))
    return paths


def _check_exportable(model: CLIP) -> None:
    if not isinstance(model, CLIP):
        raise TypeError(f"export_onnx needs a clipforge CLIP model, got {type(model).__name__}")
    if model.config.text_cfg.hf_model_name or model.config.vision_cfg.timm_model_name:
        raise ValueError("ONNX export covers CLIP's own towers (its graphs and tokenizer files assume them), "
                         "not a Hugging Face text tower or a timm image tower; save the model with "
                         "clipforge.save(model, folder) instead")
    if getattr(model, "int8", False):
        raise ValueError("this model is already int8 (PyTorch's quantised modules have no ONNX export): export "
                         "the float32 model with int8=True (clipforge export onnx --int8), which quantises the "
                         "same layers with ONNX Runtime's quantiser")


def _export_both(model: CLIP, folder: Path, opset: int) -> dict[str, Path]:
    """Both float32 graphs written into ``folder``: their paths by encoder name."""
    paths = {"image": folder / IMAGE_FILE, "text": folder / TEXT_FILE}
    _export(_Encoder(model, "image"), example_images(model.config, 2), "images", paths["image"], opset)
    # any length up to context_length, so OnnxEncoder can stop at the batch's last end-of-text as CLIP does
    _export(_Encoder(model, "text"), example_tokens(model.config, 2), "tokens", paths["text"], opset,
            dynamic_length=True)
    return paths


def _verified(model: CLIP, folder: Path, atol: float, int8: bool) -> dict[str, dict[str, float]]:
    """What verification found (``max_difference``, and for int8 ``min_cosine``); RuntimeError past the bound."""
    pairs = _features_both_ways(model, folder)
    found = {"max_difference": _scaled_differences(pairs)}
    if int8:
        found["min_cosine"] = {name: F.cosine_similarity(ours, theirs).min().item()
                               for name, (ours, theirs) in pairs.items()}
        bad = {name: cos for name, cos in found["min_cosine"].items() if cos < INT8_MIN_COSINE}
        if bad:
            raise RuntimeError(f"the int8 ONNX export in {folder} is too far from PyTorch's float32 features: "
                               f"lowest cosines {bad} are below {INT8_MIN_COSINE}; use the float32 export")
        return found
    bad = {name: diff for name, diff in found["max_difference"].items() if diff > atol}
    if bad:
        raise RuntimeError(f"ONNX export in {folder} does not match PyTorch: largest scaled differences "
                           f"{bad} exceed {atol}")
    return found


def quantize_onnx(source: str | Path, target: str | Path) -> Path:
    """``source``, a float32 encoder graph written by ``export_onnx``, dynamically quantised by ONNX Runtime into
    ``target``: int8 weights and run-time quantised activations in the nodes ``_INT8_SCOPES`` names."""
    _onnxruntime()
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    graph = onnx.load(str(source), load_external_data=False).graph
    nodes = [node.name for node in graph.node if node.op_type == "MatMul" and node.name.startswith("/")
             and any(scope in node.name for scope in _INT8_SCOPES)]
    if not nodes:
        raise RuntimeError(f"{source}: found none of the Transformer block or attention-pool MatMul nodes to "
                           "quantise (has the exporter renamed them?)")
    logger = logging.getLogger()
    advice = _DropAdvice()
    logger.addFilter(advice)  # the quantiser advises shape-inference pre-processing, which these graphs have had
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, nodes_to_quantize=nodes)
    finally:
        logger.removeFilter(advice)
    return Path(target)


class _DropAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def describe(model: CLIP, preprocess: PreprocessConfig | None = None) -> dict[str, Any]:
    """What a consumer in any language needs: inputs, preprocessing, tokenizer, and how to score."""
    pre = preprocess or PreprocessConfig(image_size=model.image_size)
    resize = {"shortest": "resize the shorter side to image_size, then centre-crop image_size x image_size",
              "squash": "resize to image_size x image_size, ignoring the aspect ratio",
              "longest": "resize the longer side to image_size, then pad to a square with black"}[pre.resize_mode]
    return {
        "image_input": {"name": "images", "dtype": "float32", "shape": ["batch", 3, model.image_size, model.image_size],
                        "layout": "NCHW, RGB"},
        "preprocess": {"image_size": model.image_size, "resize_mode": pre.resize_mode, "resize": resize,
                       "interpolation": pre.interpolation, "rescale": "pixel / 255", "mean": list(pre.mean),
                       "std": list(pre.std), "normalize": "(pixel / 255 - mean) / std, per channel"},
        "text_input": {"name": "tokens", "dtype": "int64", "shape": ["batch", f"length <= {model.context_length}"],
                       "note": "cast int32 ids to int64 (OnnxEncoder does); rows are start-of-text, ids, "
                               "end-of-text, then zeros; longer rows are an error"},
        "context_length": model.context_length,
        "tokenizer_files": sorted(hf_tokenizer_files(model.context_length)),
        "tokenizer": {"start_of_text": model.vocab_size - 2, "end_of_text": model.vocab_size - 1, "pad": 0,
                      "note": "tokenizer.json is CLIP's BPE for the Hugging Face tokenizers library; it pads "
                              "with end-of-text, which after the first end-of-text changes nothing"},
        "features_normalized": False,
        "logit_scale": float(model.logit_scale.detach().float().exp()),
        "scoring": "logits = logit_scale * normalize(image_features) @ normalize(text_features).T; "
                   "softmax over texts for zero-shot probabilities",
    }


def _add_metadata(paths, meta: dict[str, Any]) -> None:
    """Store each description entry as ONNX metadata (JSON strings), so a lone .onnx file describes itself."""
    try:
        import onnx
    except ImportError as e:
        raise RuntimeError(f"onnx is not installed; {_INSTALL_HINT}") from e
    for path in paths:
        graph = onnx.load(str(path), load_external_data=False)  # large graphs keep their weights files
        for key, value in meta.items():
            entry = graph.metadata_props.add()
            entry.key, entry.value = key, json.dumps(value)
        onnx.save(graph, str(path))


def _export(module: nn.Module, example: torch.Tensor, input_name: str, path: Path, opset: int,
            dynamic_length: bool = False) -> None:
    axes = {0: "batch", 1: "length"} if dynamic_length else {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice and tracer chatter
        torch.onnx.export(module, (example,), str(path), input_names=[input_name], output_names=["features"],
                          dynamic_axes={input_name: axes, "features": {0: "batch"}},
                          opset_version=opset, do_constant_folding=True, dynamo=False)


def example_images(config: CLIPConfig, batch: int, seed: int = 0) -> torch.Tensor:
    """Random preprocessed images (batch, 3, S, S) for ``config``'s image size."""
    size = config.vision_cfg.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def example_tokens(config: CLIPConfig, batch: int, seed: int = 0) -> torch.Tensor:
    """Random token rows (batch, context_length): start token, words, end-of-text (the largest id), zeros."""
    gen = torch.Generator().manual_seed(seed)
    length, vocab = config.text_cfg.context_length, config.text_cfg.vocab_size
    tokens = torch.zeros(batch, length, dtype=torch.long)
    for i in range(batch):
        eot = int(torch.randint(2, length, (1,), generator=gen))
        tokens[i, 0] = vocab - 2
        tokens[i, 1:eot] = torch.randint(1, vocab - 2, (eot - 1,), generator=gen)
        tokens[i, eot] = vocab - 1
    return tokens


def verify_onnx(model: CLIP, folder: str | Path, batch: int = 3) -> dict[str, float]:
    """Largest difference between ONNX Runtime's and PyTorch's features (``model`` in eval mode), per encoder.

    Differences are divided by ``max(1, largest |feature|)``, so large random-init features are
    compared relatively and unit-scale features absolutely.
    """
    return _scaled_differences(_features_both_ways(model, folder, batch))


def _scaled_differences(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    return {name: ((ours - theirs).abs().max() / ours.abs().max().clamp_min(1.0)).item()
            for name, (ours, theirs) in pairs.items()}


def _features_both_ways(model: CLIP, folder: str | Path,
                        batch: int = 3) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"image" | "text": (PyTorch's features, ONNX Runtime's)} of the same example inputs."""
    encoder = OnnxEncoder(folder)
    images, tokens = example_images(model.config, batch, seed=1), example_tokens(model.config, batch, seed=1)
    device, was_training = next(model.parameters()).device, model.training
    model.eval()
    try:
        with torch.inference_mode():
            return {"image": (model.encode_image(images.to(device)).float().cpu(), encoder.encode_image(images)),
                    "text": (model.encode_text(tokens.to(device)).float().cpu(), encoder.encode_text(tokens))}
    finally:
        model.train(was_training)


class OnnxEncoder:
    """Embed images and text with ONNX Runtime from a folder written by ``export_onnx``.

    ``threads`` sets ONNX Runtime's intra-op threads (default: its own choice, one per core);
    ``providers`` its execution providers (default ``["CPUExecutionProvider"]``).
    """

    def __init__(self, folder: str | Path, threads: int | None = None, providers: list[str] | None = None):
        ort = _onnxruntime()
        self.folder = Path(folder)
        meta = _read_meta(self.folder)
        self.config = CLIPConfig.from_dict(meta["model_cfg"], source=str(self.folder / META_FILE))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
        providers = providers or ["CPUExecutionProvider"]
        self._sessions = {name: ort.InferenceSession(str(self.folder / file), options, providers=providers)
                          for name, file in (("image", IMAGE_FILE), ("text", TEXT_FILE))}
        # the text graph's length axis: a name where it is dynamic, a number in fixed-length exports
        self._text_length = self._sessions["text"].get_inputs()[0].shape[1]

    @property
    def image_size(self) -> int:
        return self.config.vision_cfg.image_size

    @property
    def context_length(self) -> int:
        return self.config.text_cfg.context_length

    def encode_image(self, images: torch.Tensor | np.ndarray, normalize: bool = False) -> torch.Tensor:
        """Preprocessed images (N, 3, H, W) -> features (N, embed_dim), as ``CLIP.encode_image``."""
        images = np.ascontiguousarray(_as_numpy(images), dtype=np.float32)
        expected = (3, self.image_size, self.image_size)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"images must be (batch, {', '.join(map(str, expected))}) for this model, "
                             f"got {images.shape}; preprocess them to {self.image_size} px first")
        return self._run("image", "images", images, normalize)

    def encode_text(self, tokens: torch.Tensor | np.ndarray, normalize: bool = False) -> torch.Tensor:
        """Token ids (N, L <= context_length) -> features (N, embed_dim), as ``CLIP.encode_text``."""
        tokens = _as_numpy(tokens).astype(np.int64, copy=False)
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"text tokens must be (batch, length <= {self.context_length}), got {tokens.shape}")
        if isinstance(self._text_length, int):  # an export with a fixed length; zeros after EOT change nothing
            tokens = np.pad(tokens, ((0, 0), (0, self._text_length - tokens.shape[1])))
        else:  # as CLIP.encode_text does
            tokens = cut_after_end_of_text(tokens)
        return self._run("text", "tokens", np.ascontiguousarray(tokens), normalize)

    def _run(self, tower: str, input_name: str, array: np.ndarray, normalize: bool) -> torch.Tensor:
        features = torch.from_numpy(self._sessions[tower].run(None, {input_name: array})[0])
        return F.normalize(features, dim=-1) if normalize else features


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _read_meta(folder: Path) -> dict[str, Any]:
    missing = [name for name in (IMAGE_FILE, TEXT_FILE, META_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not an ONNX export folder: {', '.join(missing)} missing. "
                                f"Write one with `clipforge export onnx --model NAME --output {folder}`")
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {folder / META_FILE}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model_cfg" not in meta:
        raise ValueError(f"{folder / META_FILE} is not a clipforge ONNX config "
                         f"(expected format {FORMAT!r}); re-export the model with export_onnx")
    return meta


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise RuntimeError(f"ONNX Runtime is not installed; {_INSTALL_HINT}") from e
    return onnxruntime

"""Int8 inference on the CPU: dynamic quantisation (Jacob et al. 2018) of CLIP's linear layers.

Every attention projection and MLP layer of both towers' Transformer blocks, and a ModifiedResNet's
attention-pool query, key and value projections, become ``Int8Linear``: PyTorch's dynamically quantised linear
kernel (``quantized::linear_dynamic``, FBGEMM's or oneDNN's) with int8 weights, one scale per output channel,
and activations quantised to 8 bits at each call from their own range. Embeddings,
convolutions (the patch embedding, a ResNet's body), LayerNorm, the projections into the joint space
(``proj``, ``text_projection``, a ResNet's ``attnpool.c_proj``) and the objectives' heads stay float32;
``docs/int8.md`` gives the measurements behind that choice.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings

import torch
from torch import nn

from clipforge.models.clip import CLIP
from clipforge.models.layers import MLP, Attention, Transformer, attend
from clipforge.models.resnet import AttentionPool2d

__all__ = ["INT8_DEVICE_ERROR", "input_levels", "is_int8", "pack_rows", "quantize_int8", "quantize_rows"]

_PACKING = threading.Lock()
INT8_DEVICE_ERROR = ("precision 'int8' runs on the CPU only (PyTorch's dynamically quantised int8 kernels have "
                     "no GPU version): use device='cpu', or fp16/bf16 on a GPU")


def quantize_int8(model: CLIP) -> CLIP:
    """``model`` (float32, on the CPU) with int8 linear layers in both towers, for inference: changed in place
    and returned, in eval mode. Its features are within a cosine of about 0.99 of the float32 ones (see
    ``docs/int8.md``). The result is for encoding only: it has no gradients and cannot move to a GPU. Its
    ``state_dict()`` holds plain tensors (each int8 layer's ``weight`` as int8, ``weight_scale`` and ``bias``), the
    same on every machine, and loads into another int8 model of the architecture; ``copy.deepcopy`` works."""
    _check(model)
    for tower, transformer in _transformers(model):
        engine = _packing_engine(tower)
        for block in transformer.resblocks:
            block.attn = Int8Attention(block.attn, engine)
            block.mlp = Int8MLP(block.mlp, engine)
    pool = getattr(model.visual, "attnpool", None)
    if isinstance(pool, AttentionPool2d):
        for name in ("q_proj", "k_proj", "v_proj"):  # c_proj, the projection into the joint space, stays
            linear = getattr(pool, name)
            setattr(pool, name, Int8Linear(linear.weight, linear.bias, _packing_engine("image")))
    model.int8 = True
    return model.eval()


def is_int8(model: nn.Module) -> bool:
    """Whether ``model`` went through ``quantize_int8``."""
    return bool(getattr(model, "int8", False))


class Int8Linear(nn.Module):
    """``F.linear(x, weight, bias)`` through PyTorch's dynamically quantised kernel (``quantized::linear_dynamic``):
    the weight int8 with one scale per output channel (PyTorch's per-channel dynamic qconfig), the input quantised
    to 8 bits from its own range at each call. On CPUs without AVX-512 VNNI the input keeps 7 bits
    (``reduce_range``, PyTorch's default there): their 8-bit products are summed in pairs into 16-bit
    registers, which full-range values can saturate.

    The state dict holds plain tensors (``weight`` int8, ``weight_scale``, ``bias``); the kernel's packed copy is
    made from them for the engine this layer was made for (``_packing_engine``), and made again on the next
    call after a deep copy, a pickle or ``load_state_dict``, rather than carrying one machine's layout.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, engine: str | None = None):
        super().__init__()
        values, scale = quantize_rows(weight)
        self.register_buffer("weight", values)  # (out, in) int8, symmetric: zero points are 0
        self.register_buffer("weight_scale", scale)  # (out,)
        self.register_buffer("bias", bias.detach().float().clone())  # (out,)
        self.engine = engine or torch.backends.quantized.engine
        self._packed: tuple[torch.ScriptObject, bool] | None = self._pack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            self._packed = self._pack()
        packed, reduce_range = self._packed
        return torch.ops.quantized.linear_dynamic(x, packed, reduce_range=reduce_range)

    def _pack(self) -> tuple[torch.ScriptObject, bool]:
        return pack_rows(self.weight, self.weight_scale, self.bias, self.engine)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_packed": None}

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._packed = None

    def _apply(self, fn, recurse: bool = True):
        self._packed = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, engine={self.engine}"


def quantize_rows(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values int8 (out, in), scales float32 (out,)) of a float matrix, one symmetric scale per row (PyTorch's
    per-channel dynamic qconfig): row i is about ``values[i] * scales[i]``."""
    with _quiet_quantization():
        from torch.ao.quantization import per_channel_dynamic_qconfig
        observer = per_channel_dynamic_qconfig.weight()
        observer(matrix.detach().float())
        scale, zero_point = observer.calculate_qparams()
        quantized = torch.quantize_per_channel(matrix.detach().float(), scale.float(), zero_point, 0, torch.qint8)
    return quantized.int_repr(), scale.float()


def pack_rows(values: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor,
              engine: str | None = None) -> tuple[torch.ScriptObject, bool]:
    """(packed weight, reduce_range) for ``torch.ops.quantized.linear_dynamic(x, packed, reduce_range)``, which
    computes ``x̂ @ (values * scales).T + bias`` with ``x̂`` the input quantised to 8 bits (7 with reduce_range,
    on CPUs without AVX-512 VNNI) from its own range: per element at most half a step, the step
    ``(max(x, 0) - min(x, 0)) / input_levels(reduce_range)``."""
    if values.device.type != "cpu":
        raise RuntimeError(INT8_DEVICE_ERROR)
    # the engine is process-wide: one layer packs at a time, so concurrent first calls cannot mix engines
    with _PACKING, _quiet_quantization(), _engine(engine or torch.backends.quantized.engine):
        zero_point = torch.zeros_like(scales, dtype=torch.long)
        quantized = torch._make_per_channel_quantized_tensor(values, scales.double(), zero_point, 0)
        packed = torch.ops.quantized.linear_prepack(quantized, bias.float())
        return packed, not _has_vnni(torch.backends.quantized.engine)


def input_levels(reduce_range: bool) -> int:
    """The steps between the smallest and largest input value that the int8 product quantises to (uint8: 255;
    127 with reduce_range)."""
    return 127 if reduce_range else 255


class Int8Attention(nn.Module):
    """``Attention`` with int8 input and output projections; the attention itself runs in float32."""

    def __init__(self, attention: Attention, engine: str | None = None):
        super().__init__()
        self.heads = attention.heads
        self.in_proj = Int8Linear(attention.in_proj_weight, attention.in_proj_bias, engine)
        self.out_proj = Int8Linear(attention.out_proj.weight, attention.out_proj.bias, engine)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        return self.out_proj(attend(self.in_proj(x), self.heads, causal))  # (N, L, D)


class Int8MLP(nn.Sequential):
    """``MLP`` with int8 ``c_fc`` and ``c_proj``; the activation between them runs in float32."""

    def __init__(self, mlp: MLP, engine: str | None = None):
        super().__init__()
        self.c_fc = Int8Linear(mlp.c_fc.weight, mlp.c_fc.bias, engine)
        self.gelu = mlp.gelu
        self.c_proj = Int8Linear(mlp.c_proj.weight, mlp.c_proj.bias, engine)


# FBGEMM's and oneDNN's own switches that cap the instructions they use below what the CPU has
# (FBGEMM_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA): the kernels then behave as on that older CPU, so the
# activation width and the image tower's engine must follow them, not the CPU. FBGEMM's VNNI values end in
# "E1"; oneDNN's AMX values name AMX ("ALL", its default, allows everything).
_FBGEMM_ISAS = {"AVX2": False, "AVX512": False, "AVX512_256": False, "AVX512_E1": True, "AVX512_E1_256": True}


def _has_vnni(engine: str = "x86") -> bool:
    """Whether ``engine``'s int8 products accumulate straight into 32 bits (AVX-512 VNNI, or AMX for oneDNN), so
    8-bit activations cannot saturate: the CPU's support by PyTorch's own test (which also chooses its oneDNN
    qconfig by it), unless FBGEMM_ENABLE_INSTRUCTIONS or ONEDNN_MAX_CPU_ISA caps the engine's kernels below it."""
    is_vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    if not (is_vnni is not None and is_vnni()):
        return False
    if engine == "onednn":
        return _onednn_allows("VNNI", "AMX", "AVX10")
    forced = os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").strip().upper()
    return _FBGEMM_ISAS.get(forced, True)


def _onednn_has_amx() -> bool:
    """Whether oneDNN may use AMX here: the CPU has it and ONEDNN_MAX_CPU_ISA does not cap oneDNN below it."""
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(has_amx is not None and has_amx()) and _onednn_allows("AMX")


def _onednn_allows(*names: str) -> bool:
    """Whether ONEDNN_MAX_CPU_ISA lets oneDNN use an instruction set named by any of ``names`` (unset, ALL and
    DEFAULT let it use everything the CPU has)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return not cap or cap in ("ALL", "DEFAULT") or any(name in cap for name in names)


def _packing_engine(tower: str) -> str:
    """The int8 kernels for a tower: oneDNN's where the CPU has AMX and the tower is the image one, else PyTorch's
    default x86 engine (FBGEMM). Measured (docs/int8.md): with AMX, oneDNN encodes images (50 or more rows per
    product) up to twice as fast as FBGEMM, and a text query (about ten rows) slightly slower; with only AVX-512
    VNNI or AVX2 (oneDNN capped by ONEDNN_MAX_CPU_ISA) it is slower than FBGEMM for both."""
    engines = torch.backends.quantized.supported_engines
    if tower == "image" and "onednn" in engines and _onednn_has_amx():
        return "onednn"
    return "x86" if "x86" in engines else torch.backends.quantized.engine


@contextlib.contextmanager
def _engine(name: str):
    """PyTorch's quantised engine set to ``name`` (where this machine has it) for packing, then put back: a packed
    weight keeps the engine it was packed for, whatever the global engine is when it runs."""
    before = torch.backends.quantized.engine
    if name in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


@contextlib.contextmanager
def _quiet_quantization():
    """torch.ao's eager quantisation API and quantised tensors are marked deprecated, in favour of torchao, whose
    CPU int8 path is slower in eager mode (docs/int8.md); the kernels are the FBGEMM and oneDNN ones torch ships."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation.*|.*quantize_per_.*")
        yield


def _transformers(model: CLIP) -> list[tuple[str, Transformer]]:
    """("image" | "text", Transformer stack) of both towers (a ResNet image tower and a CBOW text tower have none)."""
    stacks = [("image", getattr(model.visual, "transformer", None)), ("text", model.transformer)]
    return [(tower, stack) for tower, stack in stacks if isinstance(stack, Transformer)]


def _check(model: CLIP) -> None:
    if not isinstance(model, CLIP):
        raise TypeError(f"int8 quantisation needs a clipforge CLIP model, got {type(model).__name__}")
    if is_int8(model):
        raise ValueError("this model is already int8")
    if model.config.text_cfg.hf_model_name or model.config.vision_cfg.timm_model_name:
        raise ValueError("precision 'int8' covers CLIP's own towers, not a Hugging Face text tower or a timm image "
                         "tower; use fp32 for this model")
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cpu"}:
        raise ValueError(INT8_DEVICE_ERROR)
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(f"int8 quantisation starts from float32 weights; this model holds "
                         f"{', '.join(sorted(map(str, dtypes)))}: call model.float() first")
    if not (set(torch.backends.quantized.supported_engines) - {"none"}
            and hasattr(torch.ops.quantized, "linear_dynamic") and hasattr(torch, "quantize_per_channel")):
        raise RuntimeError(f"this PyTorch ({torch.__version__}) has no dynamically quantised int8 CPU kernels "
                           "(torch.ao.quantization): use fp32 here, or the int8 ONNX export (clipforge export "
                           "onnx --int8) with ONNX Runtime")


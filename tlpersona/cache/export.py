"""Persona vectors written where other tools load them.

The vector of persona X for recipe R at layer l is the one steering uses
(:meth:`tlpersona.cache.reader.Store.persona_vector`, ``relative_to="all"``): X's centroid minus
the mean centroid of every stored persona (not a difference from the base persona alone). It
lives in the residual stream after block l, ``blocks.{l}.hook_resid_post`` (HF ``hidden_states[l + 1]``).

Formats:

* ``gguf``: a llama.cpp control vector. llama.cpp adds tensor ``direction.N`` to the output of
  its layer ``N`` (0-based; ``llama_adapter_cvec::apply_to`` runs after the FFN residual add of
  layer ``il`` and the loader places ``direction.N`` at that layer), so our layer ``l`` is
  written as ``direction.l``. llama.cpp has no slot for ``direction.0`` (it rejects the name),
  so layer 0 cannot be exported in this format. Tensors are float32 ``[d_model]``; the file
  carries ``general.architecture = controlvector`` and ``controlvector.layer_count``, as
  llama.cpp's own generator writes them.
* ``safetensors``: ``{"<l>": [d_model]}`` float32, layer numbers as keys (our block index, as
  the steering-vectors library's ``layer_activations`` dict uses); provenance in the metadata.
* ``pt``: ``torch.save`` of ``{l: tensor}`` with int keys.
* ``npz``: ``numpy.savez`` with one array per layer named ``"<l>"``; ``npy``: a single layer's
  ``[d_model]`` array.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tlpersona.cache.reader import Store
from tlpersona.errors import TlpersonaError
from tlpersona.infra.files import atomic_save_pt, atomic_save_tensors, atomic_write_bytes, atomic_write_with

FORMATS = ("gguf", "safetensors", "pt", "npz", "npy")


@dataclass
class VectorExport:
    """What to export: ``layers`` None means every stored layer."""

    persona: str
    position: str
    format: str
    out: Path
    layers: list[int] | None = None
    meta: dict[str, str] = field(default_factory=dict)


def persona_layers(store: Store, persona: str, position: str, layers: list[int] | None
                   ) -> dict[int, torch.Tensor]:
    """``{layer: [d_model] float32}`` vectors of ``persona`` for recipe ``position``."""
    if persona not in store.personas:
        raise TlpersonaError(f"`persona` {persona!r} is not in the store")
    if position not in store.positions:
        raise TlpersonaError(f"`position` {position} is not in the store (stored: "
                             f"{', '.join(store.positions)})")
    wanted = list(store.layers) if layers is None else layers
    if not wanted:
        raise TlpersonaError("`layers`: no layers given")
    return {la: store.persona_vector(persona, position, la).vector.contiguous() for la in wanted}


def check_export(req: VectorExport) -> None:
    """Problems with the request itself, before anything is read or written."""
    if req.format not in FORMATS:
        raise TlpersonaError(f"unknown `format` {req.format!r} ({', '.join(FORMATS)})")
    if req.out.is_dir():
        raise TlpersonaError(f"`out` {req.out} is a directory; give a file name")
    if req.format == "gguf":
        _check_gguf_layers(req.layers)
    if req.format == "npy" and (req.layers is None or len(req.layers) != 1):
        raise TlpersonaError("`format` npy holds one layer: give exactly one `layers` value "
                             "(npz holds several)")


def _check_gguf_layers(layers: list[int] | None) -> None:
    if layers is not None and 0 in layers:
        raise TlpersonaError("`layers`: llama.cpp cannot add a control vector after block 0 "
                             "(it has no direction.0); leave layer 0 out")


def export_vectors(store: Store, req: VectorExport, layers: list[int] | None
                   ) -> dict[int, torch.Tensor]:
    """Write ``req.out`` (temporary file, then rename) and return what was written; ``layers``
    are ``req.layers`` as stored block numbers (None: every stored layer)."""
    check_export(req)
    if req.format == "gguf":
        # resolved: a negative layer (-30 of 30 blocks) can be block 0 too
        _check_gguf_layers(layers)
        if layers is None:
            layers = [la for la in store.layers if la != 0]
    vecs = persona_layers(store, req.persona, req.position, layers)
    meta = {"persona": req.persona, "position": req.position,
            "definition": "centroid(persona) - mean centroid of all stored personas, "
                          "blocks.{l}.hook_resid_post", **req.meta}
    if req.format == "gguf":
        atomic_write_with(req.out, lambda tmp: write_gguf(tmp, vecs, meta))
    elif req.format == "safetensors":
        atomic_save_tensors(req.out, {str(la): v for la, v in vecs.items()}, meta)
    elif req.format == "pt":
        atomic_save_pt(req.out, dict(vecs))
    else:
        buf = io.BytesIO()
        if req.format == "npy":
            np.save(buf, next(iter(vecs.values())).numpy())
        else:
            np.savez(buf, **{str(la): v.numpy() for la, v in vecs.items()})  # type: ignore[arg-type]
        atomic_write_bytes(req.out, buf.getvalue())
    return vecs


def write_gguf(path: str, vecs: dict[int, torch.Tensor], meta: dict[str, str]) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, "controlvector")
    writer.add_uint32("controlvector.layer_count", len(vecs))
    if "model" in meta:
        writer.add_string("controlvector.model_hint", meta["model"])
    for key, value in meta.items():
        writer.add_string(f"tlpersona.{key}", value)
    for layer, v in vecs.items():
        writer.add_tensor(f"direction.{layer}", v.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

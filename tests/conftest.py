"""Shared fixtures. Real-model fixtures use the embedded default model (SmolLM2-135M-Instruct),
fetched and dequantised once into $TLPERSONA_HOME."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "assistant_axis"


@pytest.fixture(scope="session")
def default_source() -> str:
    from tlpersona.models import resolve

    return resolve("default")[0]


@pytest.fixture(scope="session")
def tokenizer(default_source):
    from tlpersona.models import load_tokenizer

    return load_tokenizer(default_source)


@pytest.fixture(scope="session")
def loaded(default_source):
    from tlpersona.models import load_model

    torch.manual_seed(0)
    return load_model("default", device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def hf_ref(default_source):
    """An independent plain-HF copy (the bridge modifies its own model in place), with the
    eager attention that the bridge uses on the CPU."""
    from tlpersona.models import load_hf

    return load_hf(default_source, "cpu", torch.float32, attn="eager")

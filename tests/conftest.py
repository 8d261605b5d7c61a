"""Shared fixtures. Real-model fixtures use the embedded default model (SmolLM2-135M-Instruct),
fetched and dequantised once into $TLPERSONA_HOME."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton's interpreter runs the decoder's kernels on the CPU (tests/unit/test_kernels.py);
    # it is chosen when a kernel is defined, so before tlpersona.runtime.kernels is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

# factories.py holds the shared command-line assertions: rewritten, they say what differed
pytest.register_assert_rewrite("factories")

#: Fixtures that need the embedded model's files; a test using one is in the `model` tier.
MODEL_FIXTURES = {"default_source", "tokenizer", "loaded", "hf_ref"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)


@pytest.fixture(autouse=True)
def _model_tier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeps the fast tier honest: a test outside the `model` tier that reaches for the
    embedded model fails, naming the marker it needs."""
    if request.node.get_closest_marker("model") is None:
        import tlpersona.models.loading

        def refuse() -> None:
            raise RuntimeError("this test uses the embedded model: mark it @pytest.mark.model")

        monkeypatch.setattr(tlpersona.models.loading, "fetch_default_gguf", refuse)


@pytest.fixture
def one_thread():
    """One CPU thread for the test: with several, torch's CPU kernels split their work by the
    tensors' shapes, so a batch and its rows one by one can differ in the last bits (1e-4
    relative after 30 layers of the embedded model). Batch invariance and plain-HF equality are
    exact claims, checked where the kernels do not reorder sums."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def default_source() -> str:
    from tlpersona.models.loading import resolve

    return resolve("default")[0]


@pytest.fixture(scope="session")
def tokenizer(default_source):
    from tlpersona.models.loading import load_tokenizer

    return load_tokenizer(default_source)


@pytest.fixture(scope="session")
def loaded(default_source):
    from tlpersona.models.loading import load_model

    torch.manual_seed(0)
    return load_model("default", device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def hf_ref(default_source):
    """An independent plain-HF copy (the bridge modifies its own model in place), with the
    eager attention that the bridge uses on the CPU."""
    from tlpersona.models.loading import load_hf

    return load_hf(default_source, "cpu", torch.float32, attn="eager")

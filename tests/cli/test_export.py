"""Persona vectors exported for llama.cpp (GGUF control vectors), steering libraries
(safetensors / pt) and numpy: round trips through each format's own reader."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from tlpersona.cli import main
from tlpersona.data import builtin_personas, builtin_questions


@pytest.fixture(scope="module")
def store(loaded, tmp_path_factory):
    from tlpersona.cache.reader import open_store
    from tlpersona.chat.positions import parse_positions
    from tlpersona.extraction import ExtractConfig, extract_to_store

    cfg = ExtractConfig(parse_positions("last"), [0, 7, 15], batch_size=8, progress=False)
    path = extract_to_store(loaded, cfg, builtin_personas()[:3], builtin_questions()[:2],
                            tmp_path_factory.mktemp("export") / "s")
    return open_store(path)


def _expected(store, persona, layer):
    """Independently: the persona's centroid minus the mean of all stored centroids (numpy)."""
    cent = store.centroids("last")[:, store.layer_index(layer)].double().numpy()
    return cent[store.personas.index(persona)] - cent.mean(0)


def _export(store, *args):
    return CliRunner().invoke(main, ["export", str(store.root), *args])


def test_gguf_control_vector_round_trip(store, tmp_path):
    import gguf

    out = tmp_path / "pirate.gguf"
    res = _export(store, "--vectors", "gguf", "--persona", "pirate", "--position", "last", "--out", str(out))
    assert res.exit_code == 0, res.output
    reader = gguf.GGUFReader(out)
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    # layer 0 has no llama.cpp slot; layer l is direction.l (added to the output of block l)
    assert sorted(tensors) == ["direction.15", "direction.7"]
    for layer in (7, 15):
        t = tensors[f"direction.{layer}"]
        assert t.dtype == np.float32 and t.shape == (store.centroids("last").shape[-1],)
        np.testing.assert_allclose(t, _expected(store, "pirate", layer), rtol=1e-5, atol=1e-5)
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    count = reader.fields["controlvector.layer_count"]
    assert int(count.parts[count.data[0]][0]) == 2


def test_safetensors_pt_npz_npy_round_trips(store, tmp_path):
    args = ["--persona", "librarian", "--position", "last", "--layers", "0,15"]
    assert _export(store, "--vectors", "safetensors", "--out", str(tmp_path / "v.safetensors"),
                   *args).exit_code == 0
    assert _export(store, "--vectors", "pt", "--out", str(tmp_path / "v.pt"), *args).exit_code == 0
    assert _export(store, "--vectors", "npz", "--out", str(tmp_path / "v.npz"), *args).exit_code == 0
    res = _export(store, "--vectors", "npy", "--out", str(tmp_path / "v.npy"), "--persona", "librarian",
                  "--position", "last", "--layers", "7")
    assert res.exit_code == 0, res.output
    st = load_file(tmp_path / "v.safetensors")
    pt = torch.load(tmp_path / "v.pt")
    npz = np.load(tmp_path / "v.npz")
    assert sorted(st) == ["0", "15"] and sorted(pt) == [0, 15] and sorted(npz.files) == ["0", "15"]
    for layer in (0, 15):
        ref = _expected(store, "librarian", layer)
        for got in (st[str(layer)].numpy(), pt[layer].numpy(), npz[str(layer)]):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "v.npy"), _expected(store, "librarian", 7),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--vectors", "gguf", "--persona", "pirate", "--position", "last", "--layers", "0,7"],
     "llama.cpp cannot add a control vector after block 0"),
    (["--vectors", "onnx", "--persona", "pirate", "--position", "last"], "unknown --vectors 'onnx'"),
    (["--vectors", "npy", "--persona", "pirate", "--position", "last"], "npy holds one layer"),
    (["--vectors", "pt", "--persona", "nobody", "--position", "last"], "'nobody' is not in the store"),
    (["--vectors", "pt", "--persona", "pirate", "--position", "sys_end"], "sys_end is not in the store"),
    (["--vectors", "pt", "--persona", "pirate", "--position", "last", "--layers", "3"],
     "layer 3 is not in this store"),
    (["--vectors", "pt", "--persona", "pirate", "--position", "last", "--layers", "x"],
     "bad --layers 'x'"),
    (["--vectors", "pt", "--position", "last"], "--vectors needs --persona"),
])
def test_bad_export_is_one_line_exit_2_and_writes_nothing(store, tmp_path, args, message):
    out = tmp_path / "out" / "v.bin"
    res = _export(store, *args, "--out", str(out))
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], res.output
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_export_never_replaces_a_file_unasked_nor_writes_into_a_store(store, tmp_path):
    out = tmp_path / "mine.pt"
    out.write_bytes(b"the user's file")
    args = ["--vectors", "pt", "--persona", "pirate", "--position", "last"]
    res = _export(store, *args, "--out", str(out))
    assert res.exit_code == 2 and "exists; not replacing it without --overwrite" in res.output
    assert out.read_bytes() == b"the user's file"
    res = _export(store, *args, "--out", str(store.root / "pirate.pt"))
    assert res.exit_code == 2 and "inside a store's directory" in res.output
    assert not (store.root / "pirate.pt").exists()
    res = _export(store, *args, "--out", str(out), "--overwrite")
    assert res.exit_code == 0, res.output
    assert set(torch.load(out, weights_only=True)) == {0, 7, 15}
    res = _export(store, "--seed-layout", str(tmp_path / "seed"), "--persona", "pirate")
    assert res.exit_code == 2 and "go with --vectors" in res.output
    assert not (tmp_path / "seed").exists()

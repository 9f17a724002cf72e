"""Our GGUF header parser agrees with llama.cpp's gguf reader, and broken files give a clear error."""

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize
from salachat.engine.gguf_file import GGUFError, GGUFFile, unpermute_rope_rows


def test_metadata_and_tensors_equal_ggufreader(smollm2_path):
    ours = GGUFFile.open(smollm2_path)
    reference = GGUFReader(smollm2_path)
    fields = {k: f for k, f in reference.fields.items() if not k.startswith("GGUF.")}  # header, not metadata
    assert set(ours.metadata) == set(fields)
    for key, field in fields.items():
        assert ours.metadata[key] == pytest.approx(field.contents()), key
    assert [t.name for t in ours.tensor_infos] == [t.name for t in reference.tensors]
    for info, ref in list(zip(ours.tensor_infos, reference.tensors))[:40]:
        assert info.shape == tuple(int(x) for x in reversed(ref.shape))
        np.testing.assert_array_equal(ours._array(info).reshape(-1), dequantize(ref.data, ref.tensor_type).reshape(-1))


def test_truncated_gguf_names_the_file(tmp_path, smollm2_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(smollm2_path.read_bytes()[: 5 << 20])
    with pytest.raises(GGUFError, match="truncated"):  # the header is intact; the tensors are not
        GGUFFile.open(broken)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(smollm2_path.read_bytes()[:300_000])
    with pytest.raises(GGUFError, match="header.gguf"):
        GGUFFile.open(header_only)
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(GGUFError, match="not a readable GGUF"):
        GGUFFile.open(not_gguf)


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)
    n_head = 4
    permuted = w.reshape(n_head, 2, w.shape[0] // n_head // 2, 3).swapaxes(1, 2).reshape(w.shape)
    import torch

    assert torch.equal(unpermute_rope_rows(torch.from_numpy(permuted), n_head), torch.from_numpy(w))

"""The writer's tail: tensors whose size is known only at the end, read back by safetensors itself."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lema.adapters.weights.safetensors_writer import open_safetensors_writer


def test_tail_tensors_of_any_size_up_to_the_declared_one_read_back(tmp_path):
    path = tmp_path / "t.safetensors"
    entries = [("a", torch.float32, (2, 3)), ("b", torch.uint8, (5,))]
    tail = [("z", torch.uint8, (40,)), ("y", torch.uint8, (40,))]
    a, b = torch.randn(2, 3), torch.arange(5, dtype=torch.uint8)
    y, z = torch.tensor(list(b'{"quant_type": "nf4"}'), dtype=torch.uint8), torch.arange(7, dtype=torch.uint8)
    with open_safetensors_writer(path, entries, {"format": "pt"}, tail) as writer:
        writer.write_tail("y", y)  # before, between or after the others: any order
        writer.write("a", a)
        writer.write_tail("z", z)
        writer.write("b", b)
    loaded = load_file(path)
    assert set(loaded) == {"a", "b", "y", "z"}
    assert all(torch.equal(loaded[k], v) for k, v in {"a": a, "b": b, "y": y, "z": z}.items())
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert int.from_bytes(path.read_bytes()[:8], "little") % 8 == 0


def test_a_tail_tensor_too_large_or_missing_writes_nothing(tmp_path):
    path = tmp_path / "t.safetensors"
    with pytest.raises(ValueError, match="at most"):
        with open_safetensors_writer(path, [], None, [("z", torch.uint8, (4,))]) as writer:
            writer.write_tail("z", torch.zeros(5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="never written"):
        with open_safetensors_writer(path, [], None, [("z", torch.uint8, (4,))]):
            pass
    assert not path.exists()

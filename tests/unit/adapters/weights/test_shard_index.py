"""Index shards must be plain files inside the model folder (the Hugging Face cache's links excepted)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lema.adapters.weights.shard_index import read_weight_map
from lema.errors import ModelFormatError

BAD = settings.get_profile("bad-inputs")


def index_in(folder: Path, weight_map: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}), encoding="utf-8")
    return index


@BAD
@given(st.sampled_from(["../", "../../", "/", "sub/", "./", "a/../"]), st.text(alphabet="abc._", min_size=1, max_size=8))
def test_a_shard_path_that_is_not_a_bare_file_name_is_refused(prefix, name):
    """Property: any name with a separator or '..' is refused, whether or not the file exists."""
    folder = Path(tempfile.mkdtemp()) / "model"
    index = index_in(folder, {"w": prefix + name})
    with pytest.raises(ModelFormatError, match="is not a file name in the model folder"):
        read_weight_map(index)


@BAD
@given(st.none() | st.integers() | st.floats() | st.booleans() | st.lists(st.text(max_size=3), max_size=2)
       | st.sampled_from(["", ".", ".."]))
def test_a_shard_name_that_is_not_a_string_name_is_refused(value):
    with pytest.raises(ModelFormatError, match=r"shard .* is not a file name"):
        read_weight_map(index_in(Path(tempfile.mkdtemp()), {"w": value}))


def test_a_symlink_out_of_the_folder_is_refused(tmp_path):
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    index = index_in(tmp_path / "model", {"w": "link.safetensors"})
    (tmp_path / "model" / "link.safetensors").symlink_to(tmp_path / "secret.safetensors")
    with pytest.raises(ModelFormatError, match="outside the model folder"):
        read_weight_map(index)


def test_links_inside_the_folder_and_into_the_hub_cache_blobs_are_read(tmp_path):
    snapshot = tmp_path / "models--org--name" / "snapshots" / "abc123"
    blobs = tmp_path / "models--org--name" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "deadbeef").write_bytes(b"x")
    index = index_in(snapshot, {"a": "model-1.safetensors", "b": "model-2.safetensors"})
    (snapshot / "model-1.safetensors").symlink_to("../../blobs/deadbeef")
    (snapshot / "real.safetensors").write_bytes(b"y")
    (snapshot / "model-2.safetensors").symlink_to("real.safetensors")
    assert read_weight_map(index) == {"a": "model-1.safetensors", "b": "model-2.safetensors"}


def test_a_missing_shard_or_an_empty_map_is_named(tmp_path):
    with pytest.raises(ModelFormatError, match="shard gone.safetensors named by .* is missing"):
        read_weight_map(index_in(tmp_path / "a", {"w": "gone.safetensors"}))
    with pytest.raises(ModelFormatError, match="non-empty \"weight_map\""):
        read_weight_map(index_in(tmp_path / "b", {}))

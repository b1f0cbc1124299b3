"""`lema plan` on generated bad configs and headers: exit 2 and one Error line naming the problem."""

from __future__ import annotations

import json
import struct
import tempfile
import time
from pathlib import Path

from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from lema.cli import main

BAD = settings.get_profile("bad-inputs")
LLAMA = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100}
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                        max_size=3), max_leaves=8)


def plan(path: Path, *extra: str):
    return CliRunner().invoke(main, ["plan", "--model", str(path), *extra])


def one_error_line(result) -> str:
    lines = result.stderr.splitlines()
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def write(name: str, content: str | bytes) -> Path:
    path = Path(tempfile.mkdtemp()) / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


@BAD
@given(st.sampled_from(sorted(LLAMA.keys() - {"model_type"})),
       st.text(max_size=4) | st.floats() | st.lists(st.integers(), max_size=2) | st.booleans()
       | st.integers(max_value=0) | st.integers(min_value=1 << 40))
def test_plan_names_a_config_field_of_the_wrong_type_or_size(field, value):
    """Property: exit 2, one line naming the field, in well under a second."""
    path = write("config.json", json.dumps({**LLAMA, field: value}))
    began = time.perf_counter()
    result = plan(path)
    assert result.exit_code == 2
    assert f"{field}=" in one_error_line(result)
    assert time.perf_counter() - began < 1.0


@BAD
@given(json_values)
def test_plan_on_any_json_document_plans_or_says_why_in_one_line(document):
    """Property: whatever JSON a config.json holds, exit 0 (it plans) or 2 with one Error line."""
    result = plan(write("config.json", json.dumps(document)))
    if result.exit_code != 0:
        assert result.exit_code == 2
        one_error_line(result)


@BAD
@given(st.dictionaries(st.text(max_size=6), json_values, max_size=4), st.binary(max_size=64))
def test_plan_on_a_generated_safetensors_header_names_the_file(header, data):
    """Property: any header that is not a model is exit 2 with one line about that file."""
    raw = json.dumps(header).encode()
    path = write("model.safetensors", struct.pack("<Q", len(raw)) + raw + data)
    (path.parent / "config.json").write_text(json.dumps(LLAMA), encoding="utf-8")
    result = plan(path)
    assert result.exit_code == 2
    line = one_error_line(result)
    assert str(path) in line or "recognisable" in line or "weights do not match" in line


@BAD
@given(st.integers(4097, 10**12))
def test_plan_refuses_more_layers_than_the_bound_at_once(layers):
    path = write("config.json", json.dumps({**LLAMA, "num_hidden_layers": layers}))
    began = time.perf_counter()
    result = plan(path, "--vram", "8G", "--strategy", "auto")
    assert result.exit_code == 2 and "num_hidden_layers" in one_error_line(result)
    assert time.perf_counter() - began < 1.0

"""Read the small JSON files that describe models and checkpoints, each problem one LEMA error.

``config.json``, ``model.safetensors.index.json``, ``adapter_config.json``,
``trainer_state.json``: a file that is missing, a folder, larger than any honest such file,
not UTF-8, not JSON, nested too deeply or not a JSON object becomes the error class the
caller names (``ModelFormatError`` for model files, ``CheckpointError`` for checkpoints),
with the path and the fix. The size cap keeps a wrong path (a multi-gigabyte file named
``config.json``) from being read into memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lema.domain.json_values import JsonValueError, parse_json
from lema.domain.units import format_size
from lema.errors import LemaError

# A 405B model's index is ~100 KB and a config ~2 KB; 64 MiB is far above any of them.
MAX_JSON_BYTES = 64 * 1024 * 1024


def read_json_object(path: str | os.PathLike[str], what: str, error: type[LemaError],
                     fix: str = "re-download or re-create it", max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The JSON object in ``path``.

    Args:
        path: the file.
        what: what the file is, for messages (``"config"``, ``"index"``).
        error: the LemaError subclass to raise.
        fix: what the user should do about a corrupt file.
        max_bytes: larger files are refused without being read.

    Raises:
        error: missing, a folder, too large, not UTF-8, not JSON, too deep, or not an object.
    """
    path = Path(path)
    if not path.exists():
        raise error(f"{path}: no such {what} file; check the path")
    if not path.is_file():
        raise error(f"{path}: is not a file; expected a {what} JSON file")
    size = path.stat().st_size
    if size > max_bytes:
        raise error(f"{path}: {format_size(size)} is far larger than any {what} file (at most "
                    f"{format_size(max_bytes)}); is this the right file?")
    try:
        value = parse_json(path.read_bytes())
    except JsonValueError as exc:
        raise error(f"{path}: not a valid {what} file: {exc}; {fix}") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, found {json_kind(value)}; {fix}")
    return value


def json_kind(value: Any) -> str:
    """``"an array"``, ``"a string"``, ... for messages."""
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"

"""Fixtures shared by the CLI tests: a tiny Llama folder and the text/chat data files, made
once per module (a module that needs other data defines its own ``data``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.demo_models import tiny_llama_folder, write_data


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_llama_folder(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return write_data(tmp_path_factory.mktemp("data"))

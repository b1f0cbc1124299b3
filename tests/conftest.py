"""Shared pytest setup: Hypothesis profiles and the ``cuda`` marker's auto-skip."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", deadline=None, max_examples=50, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=20)
settings.register_profile("thorough", deadline=None, max_examples=1000)
_ACTIVE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(_ACTIVE)
# The bad-input properties (tests/**/test_*bad_input*, *_properties): each example writes a
# file or runs a command, so they take fewer examples than the pure ones.
settings.register_profile("bad-inputs", parent=settings.get_profile(_ACTIVE),
                          max_examples={"ci": 25, "dev": 10}.get(_ACTIVE, 300),
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True, scope="session")
def _lema_cache_under_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests write only under temporary folders: converted models and tokenized data too."""
    os.environ["LEMA_CACHE"] = str(tmp_path_factory.mktemp("lema-cache"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def quantized_model(tmp_path_factory):
    """``quantized_model(kind, variant)``: a tiny ``tests.tiny_models`` model quantized and saved by
    transformers + bitsandbytes (written once per session; see ``tests.quant_models``)."""
    from tests.quant_models import quantized_folder

    root = tmp_path_factory.mktemp("quantized")

    def make(kind: str, variant: str):
        return quantized_folder(kind, variant, root / kind)

    return make

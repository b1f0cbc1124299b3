"""Every family is a typed Family record the registry lists, consistent with itself."""

from __future__ import annotations

import pytest

from lema.domain.families import registry
from lema.domain.families.family import Family


@pytest.mark.parametrize("name", sorted(registry.FAMILIES))
def test_a_family_record_names_its_targets_among_its_module_keys(name):
    fam = registry.family(name)
    assert isinstance(fam, Family) and fam.name == name and fam.model_types
    leaves = {k.split(".")[-1] for k in fam.module_keys}
    assert set(fam.targets) == leaves
    assert set(fam.default_targets) <= set(fam.targets)
    assert fam.peft_prefix.startswith("base_model.model.") and fam.peft_prefix.endswith(".")


def test_model_types_belong_to_one_family_each():
    types = [t for fam in registry.FAMILIES.values() for t in fam.model_types]
    assert len(types) == len(set(types))

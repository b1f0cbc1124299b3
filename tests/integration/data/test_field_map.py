"""Field mappings, role names, roles to train and data-set weights: parsing and refusals."""

from __future__ import annotations

import pytest

from lema.data.field_map import FieldMap, parse_roles, parse_roles_to_train
from lema.data.mixing import counts, parse_weights
from lema.data.records import Record
from lema.errors import DataError


def test_a_mapping_renames_fields_keys_and_roles_and_leaves_the_rest():
    m = FieldMap(messages="dialog", role="speaker", content="text", roles=parse_roles("human=user,bot=assistant"))
    record = Record("line 1", 1, {"dialog": [{"speaker": "human", "text": "hi", "lang": "en"},
                                             {"speaker": "bot", "text": "hello"}], "id": 7})
    out = m.apply(record)
    assert out.fields == {"id": 7, "messages": [{"lang": "en", "role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "hello"}]}
    assert record.fields["dialog"][0]["speaker"] == "human"  # the input record is not changed
    assert FieldMap().apply(record) is record
    pc = FieldMap(prompt="q", completion="a", text="body")
    assert pc.apply_fields({"q": "1", "a": "2", "other": 3}) == {"other": 3, "prompt": "1", "completion": "2"}
    assert pc.apply_fields({"body": "x"}) == {"text": "x"}


@pytest.mark.parametrize("text", ["human", "human=", "=user", "human=person", "a=user,b"])
def test_bad_role_names_are_refused_with_the_form(text):
    with pytest.raises(DataError, match="NAME=ROLE"):
        parse_roles(text)


def test_roles_to_train():
    assert parse_roles_to_train(None) == ("assistant",)
    assert parse_roles_to_train("user, assistant") == ("user", "assistant")
    with pytest.raises(DataError, match="'bot'"):
        parse_roles_to_train("assistant,bot")


def test_weights_and_the_counts_they_give():
    assert parse_weights(None, 2) is None
    assert parse_weights("0.7,0.3", 2) == (0.7, 0.3)
    assert counts([30, 10], (0.75, 0.25)) == [30, 10]
    assert counts([30, 10], (1, 1)) == [20, 20]
    assert counts([30, 10], None) == [30, 10]
    assert counts([30, 10], None, (2, 0.5)) == [60, 5]
    for bad, match in (("0.7", "one per --data"), ("a,b", "numbers"), ("0,0", "not all 0"), ("-1,2", ">= 0"),
                       ("inf,1", "finite")):
        with pytest.raises(DataError, match=match):
            parse_weights(bad, 2)

"""Where data comes from (Parquet, CSV, folders, saved datasets, Hub ids offline), how it is
stored (compact arrays), cached (keyed by data + tokenizer + options) and packed."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from lema.data.examples import IGNORE_INDEX, batches, read_examples
from lema.data.loading import DataOptions, load_data, split_eval
from lema.data.packing import PackedExamples, collate_packed, pack_rows
from lema.errors import DataError, MissingDependencyError
from tests.chat_models import TEMPLATE, chat_tokenizer, conversations, write_chat_data


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory) -> dict[str, Path]:
    return write_chat_data(tmp_path_factory.mktemp("chat"), n=12)


def tokens_of(data) -> list:
    return [(e.input_ids, e.labels) for e in data.examples]


def test_parquet_csv_and_folder_read_like_jsonl(tmp_path, chat_files):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    tok = chat_tokenizer(TEMPLATE)
    reference = read_examples(chat_files["messages"], tok, seq=64)
    assert tokens_of(read_examples(chat_files["parquet"], tok, seq=64)) == tokens_of(reference)
    rows = [{"prompt": f"apple {i}", "completion": " river"} for i in range(5)]
    pcsv.write_csv(pa.Table.from_pylist(rows), tmp_path / "pc.csv")
    (tmp_path / "pc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    csv_data = read_examples(tmp_path / "pc.csv", tok, seq=64)
    assert csv_data.format == "prompt-completion"
    assert tokens_of(csv_data) == tokens_of(read_examples(tmp_path / "pc.jsonl", tok, seq=64))
    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:2]), folder / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[2:]), folder / "b.parquet")
    assert tokens_of(read_examples(folder, tok, seq=64)) == tokens_of(csv_data)


def test_a_folder_of_jsonl_names_the_file_in_errors_and_refuses_mixed_kinds(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "apple"}\n', encoding="utf-8")
    (folder / "b.jsonl").write_text('{"text": "river"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d, b\.jsonl, line 2: field \"text\" must be a string"):
        read_examples(folder, chat_tokenizer(), seq=32)
    (folder / "c.txt").write_text("plain", encoding="utf-8")
    with pytest.raises(DataError, match="mixes data kinds"):
        read_examples(folder, chat_tokenizer(), seq=32)


def test_a_saved_dataset_folder_is_read(tmp_path, chat_files):
    import datasets

    tok = chat_tokenizer(TEMPLATE)
    rows = [{"messages": c} for c in conversations(12)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert tokens_of(read_examples(tmp_path / "saved", tok, seq=64)) == \
        tokens_of(read_examples(chat_files["messages"], tok, seq=64))


def test_hub_ids_offline_read_the_local_datasets_cache_or_say_they_are_not_there(tmp_path, monkeypatch, chat_files):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    tok = chat_tokenizer(TEMPLATE)
    with pytest.raises(DataError, match=r"someone/chat: the Hub dataset 'someone/chat' is not in the local datasets "
                                        r"cache and the Hub is offline"):
        read_examples("someone/chat", tok, seq=64)
    # What `load_dataset("someone/chat")` leaves in the cache when it ran online once.
    builder = datasets.load_dataset_builder("json", data_files={"train": str(chat_files["messages"])},
                                            cache_dir=str(tmp_path / "build"))
    builder.download_and_prepare()
    (built,) = [p for p in (tmp_path / "build" / "json").glob("*/*/*") if p.is_dir()]
    entry = tmp_path / "cache" / "someone___chat" / "default" / "0.0.0" / built.name
    entry.mkdir(parents=True)
    for f in built.iterdir():
        (entry / f.name.replace("json-", "chat-")).write_bytes(f.read_bytes())
    data = read_examples("someone/chat:train", tok, seq=64)
    assert tokens_of(data) == tokens_of(read_examples(chat_files["messages"], tok, seq=64))


def test_a_missing_datasets_package_names_the_extra(monkeypatch, chat_files):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(MissingDependencyError, match=r"needs the optional package 'datasets': pip install 'lema\[data\]'"):
        read_examples(chat_files["parquet"], chat_tokenizer(), seq=64)


def test_the_store_costs_about_five_bytes_a_token(chat_files):
    data = read_examples(chat_files["messages"], chat_tokenizer(TEMPLATE), seq=64)
    store = data.examples
    assert store.tokens.dtype == np.int32 and store.mask.dtype == np.uint8
    assert store.nbytes <= 5 * store.n_tokens + 8 * (len(store) + 1)


def test_the_cache_is_hit_for_the_same_data_tokenizer_and_options_only(tmp_path):
    tok = chat_tokenizer(TEMPLATE)
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations(6)), encoding="utf-8")
    options = DataOptions(seq=64, cache_dir=tmp_path / "cache")
    first = load_data(path, tok, options)
    again = load_data(path, tok, options)
    assert not first.cached and again.cached and "tokens from the cache" in again.describe()
    assert tokens_of_store(first.store) == tokens_of_store(again.store)
    assert isinstance(again.store.tokens, np.memmap)
    assert not load_data(path, tok, DataOptions(seq=32, cache_dir=tmp_path / "cache")).cached
    assert not load_data(path, chat_tokenizer("{# v2 #}" + TEMPLATE), options).cached  # another chat template
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations(7)), encoding="utf-8")
    os.utime(path, ns=(1, 1))
    changed = load_data(path, tok, options)
    assert not changed.cached and len(changed.store) == 7
    assert len(list((tmp_path / "cache").iterdir())) == 4


def tokens_of_store(store) -> list:
    return [(e.input_ids, e.labels) for e in store]


def test_eval_split_is_seeded_and_disjoint(chat_files):
    store = read_examples(chat_files["messages"], chat_tokenizer(TEMPLATE), seq=64).examples
    train, held = split_eval(store, 0.25, seed=1)
    assert len(train) == 9 and len(held) == 3
    assert sorted(map(int, np.concatenate([train.index, held.index]))) == list(range(12))
    assert list(split_eval(store, 0.25, seed=1)[1].index) == list(held.index)
    with pytest.raises(DataError, match="between 0 and 1"):
        split_eval(store, 1.5, seed=0)


def test_pack_rows_keeps_every_example_whole_within_seq():
    lengths = [5, 9, 3, 7, 2, 8, 4, 6]
    rows = pack_rows(lengths, seq=12, seed=3)
    assert sorted(i for row in rows for i in row) == list(range(8))
    assert all(sum(lengths[i] for i in row) <= 12 for row in rows)
    assert rows == pack_rows(lengths, seq=12, seed=3) != pack_rows(lengths, seq=12, seed=4)


def test_packed_batches_restart_positions_and_skip_padding(chat_files):
    store = read_examples(chat_files["messages"], chat_tokenizer(TEMPLATE), seq=64).examples
    packed = PackedExamples(store, seq=64, seed=0)
    assert len(packed) < len(store) and packed.efficiency > 0.6
    batch = next(batches(packed, 2, pad_id=0, seq=64, shuffle=False, collate_fn=collate_packed))
    row = packed[0]
    lengths = [len(store[i].input_ids) for i in row.members]
    n = sum(lengths)
    assert batch["position_ids"][0, :n].tolist() == [p for k in lengths for p in range(k)]
    assert batch["input_ids"][0, :n].tolist() == [t for i in row.members for t in store[i].input_ids]
    assert batch["labels"][0, :n].tolist() == [t for i in row.members for t in store[i].labels]
    assert batch["attention_mask"][0].sum() == n and batch["input_ids"].shape[1] <= 64
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()

"""What ``--data`` names: a file, a folder of files, a saved dataset, or a Hub dataset id.

=======================================  ==================================================
``--data``                               read by
=======================================  ==================================================
``train.jsonl``, ``train.json``          LEMA, line by line (JSON lines, or a JSON array)
``train.txt`` (``.text``, ``.md``)       LEMA, in line-aligned chunks: one text stream
``train.parquet``, ``.csv``, ``.tsv``    HF ``datasets``, streamed (``pip install 'lema[data]'``)
``data/`` (a folder)                     every data file in it, in name order (one kind)
a ``Dataset.save_to_disk`` folder        HF ``datasets``, memory-mapped Arrow
``owner/name`` or ``owner/name:split``   HF ``datasets`` from the Hub or its local cache
                                         (``HF_HUB_OFFLINE=1``: the cache only)
=======================================  ==================================================

A source yields :class:`~lema.data.records.Record` rows (or text chunks for plain text)
and an ``identity`` that changes whenever the data may have changed (file sizes and
modification times, or the dataset's fingerprint): the tokenized-data cache is keyed by it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import attrs

from lema.data import records as rec
from lema.data.text_files import one_document
from lema.domain.json_values import JsonValueError, parse_json
from lema.errors import DataError, missing_extra

TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".arrow": "arrow"}
DATA_SUFFIXES = (*rec.TEXT_SUFFIXES, *rec.JSON_SUFFIXES, *TABLE_SUFFIXES)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}(/[A-Za-z0-9][\w.\-]{0,95})?(:[\w.\-\[\]%:+]+)?$")


@attrs.frozen
class Source:
    """Data to read.

    Attributes:
        name: how messages name it (a path or a Hub id).
        kind: ``"text"`` (plain text: one stream) or ``"records"``.
        identity: changes whenever the data may have changed.
        rows: ``rows(problems)`` iterates the records (``"records"`` only).
        chunks: ``chunks()`` iterates the text (``"text"`` only).
        json_lines: the records come from JSON files.
    """

    name: str
    kind: str
    identity: str
    rows: Callable[[rec.Problems], Iterator[rec.Record]] | None = None
    chunks: Callable[[], Iterator[str]] | None = None
    json_lines: bool = False


def open_source(spec: str | os.PathLike[str], max_line_bytes: int = rec.MAX_LINE_BYTES) -> Source:
    """Resolve ``--data``; ``max_line_bytes`` caps one line of a text or JSON file.

    Raises:
        DataError: no such file or folder and not a Hub id; a folder without data files or
            with files of different kinds; an unreadable dataset.
        MissingDependencyError: Parquet/CSV/Hub data without the ``datasets`` package.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder(path, max_line_bytes)
    if path.exists():
        return _of_kind(kind_of(path), [path], str(path), max_line_bytes)
    text = str(spec)
    if _HUB_ID.match(text) and ".." not in text and "/" in text.split(":")[0]:
        return _hub(text)
    raise DataError(f"{text}: no such data file or folder; check the path (or give a Hub dataset id as owner/name)")


def _stat_identity(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def kind_of(path: Path) -> str:
    """``"text"``, ``"json"`` or a table kind (``"parquet"``, ``"csv"``, ``"arrow"``) of one file:
    from its extension, else its content (a JSON object on the first line, or one JSON
    document: JSON; otherwise text)."""
    suffix = path.suffix.lower()
    if suffix in rec.TEXT_SUFFIXES:
        return "text"
    if suffix in rec.JSON_SUFFIXES:
        return "json"
    if suffix in TABLE_SUFFIXES:
        return TABLE_SUFFIXES[suffix]
    with open(path, "rb") as f:
        first = f.readline(1 << 16)
        while first and not first.strip():
            first = f.readline(1 << 16)
    first = first.lstrip(b"\xef\xbb\xbf").strip()
    if first[:1] not in (b"{", b"["):
        return "text"
    try:
        if isinstance(parse_json(first), dict):
            return "json"
    except JsonValueError:
        pass
    if path.stat().st_size <= 64 << 20:  # one JSON document (an array, an object over lines)?
        try:
            if one_document(path.read_bytes().decode("utf-8").lstrip("\ufeff")) is not None:
                return "json"  # the JSON reader explains it
        except UnicodeDecodeError:
            pass
    return "text"


def _of_kind(kind: str, paths: list[Path], name: str, max_line_bytes: int) -> Source:
    identity = f"{kind}:{_stat_identity(paths)}"
    if kind == "text":
        def chunks() -> Iterator[str]:
            for p in paths:
                yield from rec.text_chunks(p, max_line_bytes)

        return Source(name, "text", identity, chunks=chunks)
    if kind == "json":
        def rows(problems: rec.Problems) -> Iterator[rec.Record]:
            for order, p in enumerate(paths):
                scoped = problems if len(paths) == 1 else problems.scoped(f"{p.name}, ", order)
                for r in rec.json_records(p, scoped, max_line_bytes):
                    yield r if len(paths) == 1 else attrs.evolve(r, where=f"{p.name}, {r.where}")

        return Source(name, "records", identity, rows=rows, json_lines=True)
    return Source(name, "records", identity, rows=_table_rows(kind, paths, name))


def _folder(path: Path, max_line_bytes: int) -> Source:
    if (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
        return _saved(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise DataError(f"{path}: no data files in the folder (looked for {', '.join(DATA_SUFFIXES)})")
    kinds = {kind_of(p) for p in files}
    if len(kinds) > 1:
        raise DataError(f"{path}: the folder mixes data kinds ({', '.join(sorted(kinds))}); keep one kind per folder")
    return _of_kind(kinds.pop(), files, str(path), max_line_bytes)


def _datasets(purpose: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise missing_extra("datasets", "data", purpose) from None
    datasets.disable_progress_bars()
    return datasets


def _table_rows(kind: str, paths: list[Path], name: str) -> Callable[[rec.Problems], Iterator[rec.Record]]:
    def rows(problems: rec.Problems) -> Iterator[rec.Record]:
        ds = _datasets(f"reading {kind} files")
        files = [str(p) for p in paths]
        options: dict[str, Any] = {"delimiter": "\t"} if all(p.suffix.lower() == ".tsv" for p in paths) else {}
        try:
            table = ds.load_dataset(kind, data_files=files, split="train", streaming=True, **options)
            yield from _rows_of(table, name)
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - pyarrow and datasets raise many kinds
            raise DataError(f"{name}: cannot read it as {kind} ({_first_line(exc)}); check the file") from None

    return rows


def _rows_of(table: Any, name: str) -> Iterator[rec.Record]:
    for number, row in enumerate(table, start=1):
        yield rec.Record(f"row {number}", number, dict(row))


def _saved(path: Path) -> Source:
    ds = _datasets("reading a saved dataset")
    try:
        data = ds.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: cannot read the saved dataset ({_first_line(exc)})") from None
    if isinstance(data, ds.DatasetDict):
        if "train" not in data:
            raise DataError(f"{path}: a dataset dictionary without a \"train\" split (has {', '.join(data)})")
        data = data["train"]
    return Source(str(path), "records", f"saved:{data._fingerprint}", rows=lambda problems: _rows_of(data, str(path)))


def _hub(spec: str) -> Source:
    name, _, split = spec.partition(":")
    split = split or "train"
    ds = _datasets("reading a Hub dataset")
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or \
        os.environ.get("HF_DATASETS_OFFLINE", "") not in ("", "0")
    try:
        data = ds.load_dataset(name, split=split)
    except (ConnectionError, FileNotFoundError) as exc:
        if offline:
            raise DataError(f"{spec}: the Hub dataset {name!r} is not in the local datasets cache and the Hub is "
                            "offline (HF_HUB_OFFLINE=1); load it once online, or pass a local file") from None
        raise DataError(f"{spec}: cannot load the Hub dataset {name!r} ({_first_line(exc)}); check the id and the "
                        "network, or pass a local file") from None
    except ValueError as exc:
        raise DataError(f"{spec}: {_first_line(exc)} (give the split as {name}:SPLIT)") from None
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{spec}: cannot load the Hub dataset ({_first_line(exc)})") from None
    return Source(spec, "records", f"hub:{name}:{split}:{data._fingerprint}",
                  rows=lambda problems: _rows_of(data, spec))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

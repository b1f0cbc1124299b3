"""The tokenized-data cache: a store per (data, tokenizer, options), under ``$LEMA_CACHE/data``.

The key hashes the data's identity (file sizes and modification times, or a dataset's
fingerprint), the tokenizer (its serialized vocabulary and rules, special tokens and
chat template) and every option that changes the tokens (format, sequence length,
template). A second run on the same data opens the arrays memory-mapped instead of
tokenizing again. Entries are written to a temporary folder and renamed into place, so a
killed run never leaves half an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from lema.data.store import TokenStore

VERSION = 1  # bump when the encoding of any format changes


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything in a tokenizer that decides token ids."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {"class": type(tokenizer).__name__, "bos": getattr(tokenizer, "bos_token_id", None),
             "eos": getattr(tokenizer, "eos_token_id", None),
             "template": getattr(tokenizer, "chat_template", None)}
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(identity: str, tokenizer: Any, options: dict[str, Any]) -> str:
    """The entry name for ``identity`` tokenized by ``tokenizer`` with ``options``."""
    payload = {"version": VERSION, "data": identity, "tokenizer": tokenizer_fingerprint(tokenizer),
               "options": options}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load(root: Path, key: str) -> TokenStore | None:
    """The cached store, memory-mapped, or None (absent or unreadable: it is rebuilt)."""
    folder = root / key
    if not (folder / "meta.json").is_file():
        return None
    try:
        return TokenStore.load(folder, mmap=True)
    except (OSError, ValueError):
        return None


def save(root: Path, key: str, store: TokenStore) -> bool:
    """Write ``store`` as entry ``key``, atomically (a temporary folder renamed into place).

    Returns False when the cache cannot be written (a read-only or full disk): the run goes
    on with the store in memory, and tokenizes again next time.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{key}.{secrets.token_hex(6)}"
        tmp.mkdir(0o777)  # the umask's mode, as every output of LEMA (mkdtemp would make it 0700)
    except OSError:
        return False
    try:
        store.save(tmp)
        try:
            os.rename(tmp, root / key)
        except OSError:  # another run wrote the same entry first: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
        return True
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""Token counting, done once per message at write time and stored with it."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from functools import lru_cache
from typing import Any

Tokenizer = Callable[[str], int]
"""Counts the tokens of a text."""

DEFAULT_ENCODING = "cl100k_base"  # ships inside the tiktoken wheel's cache via llama-index: works offline


@lru_cache(maxsize=4)
def tiktoken_counter(encoding: str = DEFAULT_ENCODING) -> Tokenizer:
    """A counter backed by tiktoken; special-token text is counted as plain text, never refused."""
    import tiktoken  # deferred: loading the encoding takes ~100 ms and is not needed to import engram

    enc = _get_encoding_offline(tiktoken, encoding)

    def count(text: str) -> int:
        return len(enc.encode(text, disallowed_special=()))

    return count


def _get_encoding_offline(tiktoken: Any, encoding: str) -> Any:
    """Load an encoding from the copy llama-index-core ships, as LlamaIndex itself does, so nothing is
    downloaded. An explicit TIKTOKEN_CACHE_DIR wins."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return tiktoken.get_encoding(encoding)
    spec = importlib.util.find_spec("llama_index.core")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        return tiktoken.get_encoding(encoding)
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.join(locations[0], "_static", "tiktoken_cache")
    try:
        return tiktoken.get_encoding(encoding)
    finally:
        del os.environ["TIKTOKEN_CACHE_DIR"]


def default_tokenizer() -> Tokenizer:
    return tiktoken_counter(DEFAULT_ENCODING)

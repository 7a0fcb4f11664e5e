"""Durable chat history in Redis: the store, its cache and its Redis Functions library."""

from engram.history.functions import LIBRARY_NAME, TENANT_COMMANDS, ensure_library
from engram.history.store import HistoryStore

__all__ = ["LIBRARY_NAME", "TENANT_COMMANDS", "HistoryStore", "ensure_library"]

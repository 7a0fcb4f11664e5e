"""Errors raised by Engram's library code.

The tree::

    EngramError
    ├── InvalidInput                  the caller sent something we refuse; nothing was written
    │   ├── InvalidSessionId
    │   ├── InvalidTenant
    │   ├── InvalidMessage            empty content, unknown role, ...
    │   ├── MessageTooLarge
    │   └── InvalidCursor
    ├── NotFound                      the session (or message) does not exist
    └── StoreUnavailable              Redis could not be reached or timed out; nothing was written

Each carries a stable ``code`` that the HTTP layer puts in its JSON error body.
"""

from __future__ import annotations


class EngramError(Exception):
    code = "engram_error"


class InvalidInput(EngramError, ValueError):
    code = "invalid_input"


class InvalidSessionId(InvalidInput):
    code = "invalid_session_id"


class InvalidTenant(InvalidInput):
    code = "invalid_tenant"


class InvalidMessage(InvalidInput):
    code = "invalid_message"


class MessageTooLarge(InvalidInput):
    code = "message_too_large"


class InvalidCursor(InvalidInput):
    code = "invalid_cursor"


class NotFound(EngramError, LookupError):
    code = "not_found"


class StoreUnavailable(EngramError, ConnectionError):
    code = "store_unavailable"

"""Errors raised by Engram's library code.

The tree::

    EngramError
    ├── InvalidInput                  the caller sent something we refuse; nothing was written
    │   ├── InvalidSessionId
    │   ├── InvalidSubject            an end-user (subject) id we cannot key by
    │   ├── SubjectMismatch           a turn names another subject than its session has
    │   ├── InvalidTenant
    │   ├── InvalidPolicy             a tenant memory policy field out of its bounds
    │   ├── InvalidMessage            empty content, unknown role, ...
    │   ├── MessageTooLarge
    │   └── InvalidCursor
    ├── NotFound                      the session (or message) does not exist
    ├── RateLimited                   the tenant is over its request rate; retry after ``retry_after``
    ├── QuotaExceeded                 the tenant is at a quota; nothing was written
    │   ├── SessionQuotaExceeded      a new session over ``max_sessions``
    │   └── StorageQuotaExceeded      messages over ``max_stored_bytes``
    ├── StoreFull                     Redis is at maxmemory and refuses writes; nothing was written
    └── StoreUnavailable              Redis could not be reached or timed out; nothing was written
        ├── StoreReadOnly             Redis refuses writes for now (read-only replica, NOREPLICAS, MISCONF)
        └── OutcomeUnknown            a commit was sent but no answer came: it may or may not have landed
            └── NotReplicated         stored on the primary, but no replica confirmed it in time (replicated)

Each carries a stable ``code`` that the HTTP layer puts in its JSON error body.
"""

from __future__ import annotations


class EngramError(Exception):
    code = "engram_error"


class InvalidInput(EngramError, ValueError):
    code = "invalid_input"


class InvalidSessionId(InvalidInput):
    code = "invalid_session_id"


class InvalidSubject(InvalidInput):
    code = "invalid_subject"


class SubjectMismatch(InvalidInput):
    """A turn names a subject other than the one its session belongs to (a session has one subject)."""

    code = "subject_mismatch"


class InvalidTenant(InvalidInput):
    code = "invalid_tenant"


class InvalidPolicy(InvalidInput):
    """A memory policy field is outside its bounds; the message names the field, the range and the value."""

    code = "invalid_policy"


class InvalidMessage(InvalidInput):
    code = "invalid_message"


class MessageTooLarge(InvalidInput):
    code = "message_too_large"


class InvalidCursor(InvalidInput):
    code = "invalid_cursor"


class NotFound(EngramError, LookupError):
    code = "not_found"


class RateLimited(EngramError):
    """The tenant sent more requests than its ``requests_per_second`` (plus ``burst``) allows."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # seconds until a request would be accepted


class QuotaExceeded(EngramError):
    """The tenant is at one of its quotas; nothing was written. Retrying does not help until it has
    less (sessions deleted or expired) or its quota is raised."""

    code = "quota_exceeded"


class SessionQuotaExceeded(QuotaExceeded):
    code = "session_quota_exceeded"


class StorageQuotaExceeded(QuotaExceeded):
    code = "storage_quota_exceeded"


class StoreUnavailable(EngramError, ConnectionError):
    code = "store_unavailable"


class StoreFull(EngramError):
    """Redis is at its ``maxmemory`` and refuses writes (``-OOM``). Deletes still work."""

    code = "store_full"


class StoreReadOnly(StoreUnavailable):
    """Redis refuses writes for now: ``-READONLY`` (a replica, e.g. mid-failover), ``-NOREPLICAS``
    (min-replicas-to-write) or ``-MISCONF`` (failing snapshots). Nothing was written."""

    code = "store_read_only"


class OutcomeUnknown(StoreUnavailable):
    """A write was sent and Redis did not answer in time: it may still run (a frozen or slow Redis
    executes what it has queued). Retrying the same ``turn_id`` is safe: a turn is never stored twice."""

    code = "outcome_unknown"

    def __init__(self, message: str, turn_id: str) -> None:
        super().__init__(message)
        self.turn_id = turn_id


class NotReplicated(OutcomeUnknown):
    """With ``ENGRAM_COMMIT_DURABILITY=replicated``: the primary stored the turn but no replica confirmed
    it within ``ENGRAM_COMMIT_REPLICA_TIMEOUT_MS``, so a failover could still lose it. The turn is not
    acknowledged; retrying the same ``turn_id`` is safe (it is stored once) and waits for a replica again."""

    code = "not_replicated"

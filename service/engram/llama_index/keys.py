"""LlamaIndex keys <-> Engram session ids: any non-empty string key, reversibly and without collisions.

LlamaIndex accepts any string as a chat-store key (``"user:42"``, ``"alice@example.com"``, ``"chat
history"``, non-ASCII, 200+ characters). Engram's session ids are ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``
(they go into Redis key names, hash tags and ACL patterns; the HTTP API keeps that pattern). A key maps
onto a session id in exactly one of three forms:

=============  =========================================  ==================================================
form           when                                       session id
=============  =========================================  ==================================================
plain          the key is a valid session id and does     the key itself (``"s1"`` stays ``"s1"``, so the
               not start with ``k__`` or ``h__``          HTTP API and the adapters see one session)
encoded        any other key whose encoding fits 128      ``k__`` + unpadded base64url of its UTF-8 bytes
               characters (up to 93 UTF-8 bytes)          (``"user:42"`` -> ``"k__dXNlcjo0Mg"``)
hashed         longer keys                                ``h__`` + unpadded base64url of its SHA-256 (46
                                                          characters); the key itself is stored in the
                                                          session's meta hash (field ``key``) by the same
                                                          atomic call that writes the messages
=============  =========================================  ==================================================

No collisions: a plain id never starts with a reserved prefix (a key that does, even a valid id such as
``"k__x"``, is encoded instead), the encoded and hashed forms have different prefixes, base64url is
injective, and two keys share a hashed id only if they share a SHA-256. Reversal: plain ids are
themselves; encoded ids decode; hashed ids are looked up in meta. Why a stored key for long keys only:
the encoded form needs no state (an id read from anywhere, e.g. ``GET /v1/sessions``, decodes without
Redis), and no encoding of arbitrary strings fits a bounded length, so long keys need the stored copy.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from engram.redis_keys import SESSION_ID_PATTERN

ENCODED_PREFIX = "k__"
HASHED_PREFIX = "h__"
_RESERVED = (ENCODED_PREFIX, HASHED_PREFIX)
_MAX_SESSION_ID = 128


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def session_id_for(key: str) -> str:
    """The session id that holds the LlamaIndex key ``key`` (any non-empty string)."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"chat store key must be a non-empty string, got {key!r}")
    if SESSION_ID_PATTERN.fullmatch(key) and not key.startswith(_RESERVED):
        return key
    encoded = ENCODED_PREFIX + _b64(key.encode("utf-8", "surrogatepass"))
    if len(encoded) <= _MAX_SESSION_ID:
        return encoded
    return HASHED_PREFIX + _b64(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest())


def label_for(key: str) -> str:
    """What the store keeps in the session's meta for ``key``: the key for hashed ids, else nothing."""
    return key if session_id_for(key).startswith(HASHED_PREFIX) else ""


def key_for(session_id: str, label: str | None = None) -> str | None:
    """The LlamaIndex key a session id stands for (``label``: the key stored with a hashed id), or
    None when it cannot be known (a hashed id whose stored key is missing or does not hash to it)."""
    if session_id.startswith(ENCODED_PREFIX):
        try:
            payload = session_id[len(ENCODED_PREFIX) :]
            raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
            key = raw.decode("utf-8", "surrogatepass")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        return key if session_id_for(key) == session_id else None
    if session_id.startswith(HASHED_PREFIX):
        return label if label and session_id_for(label) == session_id else None
    return session_id

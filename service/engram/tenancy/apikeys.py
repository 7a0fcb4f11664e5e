"""API keys: ``egk_<tenant>.<secret>``.

The tenant is part of the key, so resolving a key is one hash lookup of that tenant's registry record
(O(1)), never a scan. Only the key's SHA-256 is stored. A plain, unsalted hash is enough here: the secret
is 256 random bits, so there is nothing to brute-force and no need for a slow password hash.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from engram.redis_keys import validate_tenant

PREFIX = "egk_"
SECRET_BYTES = 32  # 256 bits -> 43 URL-safe base64 characters
# Tenants are DNS labels (no '.'), and token_urlsafe never yields '.', so the split is unambiguous.
API_KEY_PATTERN = re.compile(r"egk_([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)\.([A-Za-z0-9_-]{43})")
PASSWORD_BYTES = 32


@dataclass(frozen=True, slots=True)
class ParsedApiKey:
    tenant: str
    secret: str


def generate_api_key(tenant: str) -> str:
    """A new random API key for ``tenant``."""
    return f"{PREFIX}{validate_tenant(tenant)}.{secrets.token_urlsafe(SECRET_BYTES)}"


def parse_api_key(api_key: str) -> ParsedApiKey | None:
    """The tenant and secret of a well-formed key, or None (never raises on bad input)."""
    match = API_KEY_PATTERN.fullmatch(api_key) if isinstance(api_key, str) else None
    if match is None:
        return None
    return ParsedApiKey(tenant=match.group(1), secret=match.group(2))


def hash_secret(value: str) -> str:
    """Hex SHA-256 of an API key or a Redis password (the form Redis ACLs take with ``#<hash>``)."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def generate_password() -> str:
    """A new random password for a tenant's Redis ACL user."""
    return secrets.token_urlsafe(PASSWORD_BYTES)

"""The tenant registry record: one Redis hash per tenant at ``KeySpace.tenant_record(tenant)``.

Fields (all strings, as Redis stores them)::

    tenant                      acme
    token_limit                 3000        the policy fields: defaults and bounds in engram.policy;
    session_ttl_seconds         604800      a record outside them does not parse (InvalidRecord)
    max_messages_per_session    10000
    retention                   Delete | Retain   what happens to the data when the tenant is deleted
    memory                      window | summary | '' (unset: the service's ENGRAM_MEMORY); optional
    api_key_sha256              hex SHA-256 of the tenant's API key
    redis_username              the tenant's Redis ACL user
    password_sha256             hex SHA-256 of that user's password (what ``ACL SETUSER ... #<hash>`` takes)
    owner                       who manages the tenant: ``cli`` or ``MemoryNamespace/<namespace>/<name>``
    created_at, updated_at      seconds since the epoch

Registered tenants are also members of the set ``KeySpace.tenant_set()``. Both keys live in the
``_sys`` segment, which no tenant ACL pattern can reach. Keeping the password hash here lets the
operator and the CLI re-create a vanished ACL user from Redis alone, without the clear password.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from engram.errors import InvalidPolicy
from engram.policy import MEMORY_MODE, POLICY_FIELDS, QUOTA_FIELDS, RETENTION, Policy, Retention
from engram.redis_keys import validate_tenant

CLI_OWNER = "cli"

# Fields that say what the tenant is; created_at/updated_at only say when.
_CONTENT_FIELDS = (
    "tenant",
    "token_limit",
    "session_ttl_seconds",
    "max_messages_per_session",
    "retention",
    "api_key_sha256",
    "redis_username",
    "password_sha256",
    "owner",
)

log = logging.getLogger(__name__)


class InvalidRecord(ValueError):
    """A registry hash that is missing fields or holds values that do not parse."""


@dataclass(frozen=True, slots=True)
class TenantRecord:
    tenant: str
    policy: Policy
    api_key_sha256: str
    redis_username: str
    password_sha256: str
    retention: Retention = "Retain"
    owner: str = CLI_OWNER
    created_at: float | None = field(default=None, compare=False)
    updated_at: float | None = field(default=None, compare=False)

    def content(self) -> dict[str, str]:
        """The fields that define the tenant (no timestamps), as stored."""
        return {
            "tenant": self.tenant,
            **{f.name: str(getattr(self.policy, f.name)) for f in POLICY_FIELDS},
            "retention": self.retention,
            "api_key_sha256": self.api_key_sha256,
            "redis_username": self.redis_username,
            "password_sha256": self.password_sha256,
            "owner": self.owner,
            MEMORY_MODE.name: self.policy.memory or "",
        }

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> TenantRecord:
        """Parse a hash read with ``HGETALL`` (decoded to str)."""
        missing = [name for name in _CONTENT_FIELDS if not raw.get(name)]
        if missing:
            raise InvalidRecord(f"tenant record lacks {', '.join(missing)}")
        values: dict[str, int] = {}
        for policy_field in POLICY_FIELDS:
            if policy_field in QUOTA_FIELDS and policy_field.name not in raw:
                # written before quotas existed: no limit, until the operator or `engram tenant update` writes one
                values[policy_field.name] = policy_field.default
                continue
            text = raw[policy_field.name]
            try:
                value = int(text)
            except ValueError:
                raise InvalidRecord(f"tenant record has {policy_field.name}: {policy_field.problem(text)}") from None
            # Older versions stored values the bounds now refuse (e.g. `--token-limit 0`): the nearest bound
            # serves the tenant instead of locking it out after an upgrade; `engram tenant create` rewrites it.
            bounded = min(max(value, policy_field.minimum), policy_field.maximum)
            if bounded != value:
                log.warning(
                    "tenant record %s has %s: %s; using %d (re-create the tenant to store a valid policy)",
                    raw["tenant"],
                    policy_field.name,
                    policy_field.problem(value),
                    bounded,
                )
            values[policy_field.name] = bounded
        try:
            retention = RETENTION.parse(raw["retention"])
            policy = Policy(**values, memory=MEMORY_MODE.parse(raw.get(MEMORY_MODE.name)))
        except InvalidPolicy as error:
            raise InvalidRecord(f"tenant record has {error}") from None
        try:
            created_at = float(raw["created_at"]) if raw.get("created_at") else None
            updated_at = float(raw["updated_at"]) if raw.get("updated_at") else None
        except ValueError as error:
            raise InvalidRecord(f"tenant record has a non-numeric timestamp: {error}") from None
        return cls(
            tenant=validate_tenant(raw["tenant"]),
            policy=policy,
            api_key_sha256=raw["api_key_sha256"],
            redis_username=raw["redis_username"],
            password_sha256=raw["password_sha256"],
            retention=retention,
            owner=raw["owner"],
            created_at=created_at,
            updated_at=updated_at,
        )


def decode_hash(raw: dict[bytes | str, bytes | str]) -> dict[str, str]:
    """HGETALL's reply as ``str -> str`` whether or not the client decodes responses."""

    def text(value: bytes | str) -> str:
        return value.decode("utf-8") if isinstance(value, bytes) else value

    return {text(k): text(v) for k, v in raw.items()}

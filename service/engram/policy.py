"""A tenant and its memory policy."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Policy:
    """Per-tenant memory policy."""

    token_limit: int = 3000
    session_ttl_seconds: int = 7 * 24 * 3600  # 0 = never expire
    max_messages_per_session: int = 10_000


@dataclass(frozen=True, slots=True)
class Tenant:
    """Who a request acts for, and the memory policy that applies to it."""

    name: str
    policy: Policy = field(default_factory=Policy)

"""A tenant and its memory policy, and the one definition of each policy field.

Each field of the policy is described once, here (:data:`POLICY_FIELDS`, :data:`RETENTION`, :data:`MEMORY_MODE`): its
default, its bounds, and the names it goes by elsewhere (MemoryNamespace spec and chart values,
``ENGRAM_*`` setting, ``engram tenant create`` flag). ``Settings``, the operator, the CLI and the
registry record take them from here. The CRD (``deploy/helm/engram/crds/``) and the chart's
``values.schema.json`` must be static files for Helm: ``tests/deploy/test_policy_fields.py`` holds their
defaults and bounds equal to these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from engram.errors import InvalidPolicy


@dataclass(frozen=True, slots=True)
class PolicyField:
    """One integer field of the memory policy: its default, its bounds (inclusive) and its names."""

    name: str  # attribute of Policy, field of Settings and of the tenant registry record
    crd_name: str  # MemoryNamespace spec field and chart value (camelCase)
    cli_flag: str  # option of `engram tenant create`
    default: int
    minimum: int
    maximum: int
    description: str

    @property
    def env_name(self) -> str:
        """The environment variable of the setting that gives the service's default."""
        return f"ENGRAM_{self.name.upper()}"

    @property
    def expected(self) -> str:
        return f"an integer in [{self.minimum}, {self.maximum}]"

    def problem(self, value: object) -> str | None:
        """Why ``value`` is not valid for this field (``"expected ..., got ..."``), or None if it is."""
        if isinstance(value, int) and not isinstance(value, bool) and self.minimum <= value <= self.maximum:
            return None
        return f"expected {self.expected}, got {value!r}"


TOKEN_LIMIT = PolicyField(
    name="token_limit",
    crd_name="tokenLimit",
    cli_flag="--token-limit",
    default=3000,
    minimum=16,
    maximum=1_000_000,
    description="Tokens of history given to the model on each turn.",
)
SESSION_TTL_SECONDS = PolicyField(
    name="session_ttl_seconds",
    crd_name="sessionTTLSeconds",
    cli_flag="--ttl",
    default=7 * 24 * 3600,
    minimum=0,
    maximum=10 * 365 * 24 * 3600,
    description="Idle seconds after which a session expires; 0 keeps sessions forever.",
)
MAX_MESSAGES_PER_SESSION = PolicyField(
    name="max_messages_per_session",
    crd_name="maxMessagesPerSession",
    cli_flag="--max-messages",
    default=10_000,
    minimum=2,
    maximum=10_000_000,
    description="The oldest messages of a session are trimmed beyond this count.",
)
# Quotas (0 = no limit). Enforced in Redis, inside the calls a turn makes anyway (docs/design.md, "Quotas").
MAX_SESSIONS = PolicyField(
    name="max_sessions",
    crd_name="maxSessions",
    cli_flag="--max-sessions",
    default=0,
    minimum=0,
    maximum=1_000_000_000,
    description="Live sessions the tenant may have; a turn that would start one more is refused (403). 0: no limit.",
)
MAX_STORED_BYTES = PolicyField(
    name="max_stored_bytes",
    crd_name="maxStoredBytes",
    cli_flag="--max-stored-bytes",
    default=0,
    minimum=0,
    maximum=2**50,
    description=(
        "Bytes of messages (role, content, extra) the tenant may store; a turn that would go over is refused "
        "(403). 0: no limit."
    ),
)
REQUESTS_PER_SECOND = PolicyField(
    name="requests_per_second",
    crd_name="requestsPerSecond",
    cli_flag="--requests-per-second",
    default=0,
    minimum=0,
    maximum=1_000_000,
    description="Sustained requests per second of the tenant, over all replicas; above it 429. 0: no limit.",
)
BURST = PolicyField(
    name="burst",
    crd_name="burst",
    cli_flag="--burst",
    default=0,
    minimum=0,
    maximum=1_000_000,
    description="Requests the tenant may send at once above its rate; 0: one second's worth (requestsPerSecond).",
)
QUOTA_FIELDS: tuple[PolicyField, ...] = (MAX_SESSIONS, MAX_STORED_BYTES, REQUESTS_PER_SECOND, BURST)
POLICY_FIELDS: tuple[PolicyField, ...] = (
    TOKEN_LIMIT,
    SESSION_TTL_SECONDS,
    MAX_MESSAGES_PER_SESSION,
    *QUOTA_FIELDS,
)


Retention = Literal["Delete", "Retain"]
RETENTIONS: tuple[Retention, ...] = ("Delete", "Retain")


@dataclass(frozen=True, slots=True)
class RetentionField:
    """What happens to a tenant's sessions when it is deleted. Not part of :class:`Policy` (requests never
    need it): the MemoryNamespace spec, the registry record and the CLI carry it beside the policy."""

    name: str = "retention"
    crd_name: str = "retentionPolicy"
    cli_flag: str = "--retention"
    default: Retention = "Retain"
    choices: tuple[Retention, ...] = RETENTIONS
    description: str = (
        "What happens to the tenant's sessions when it is deleted: Delete purges them, Retain keeps them."
    )

    def problem(self, value: object) -> str | None:
        """Why ``value`` is not a valid retention (``"expected ..., got ..."``), or None if it is."""
        return None if value in self.choices else f"expected {' or '.join(self.choices)}, got {value!r}"

    def parse(self, value: object) -> Retention:
        """``value`` as a :data:`Retention`; raises :class:`~engram.errors.InvalidPolicy` naming the choices."""
        for choice in self.choices:
            if value == choice:
                return choice
        raise InvalidPolicy(f"{self.name}: {self.problem(value)}")


RETENTION = RetentionField()


# --- the memory mode: window, or window + rolling summary (docs/design.md, "Rolling summary") --------------
MemoryMode = Literal["window", "summary"]
MEMORY_MODES: tuple[MemoryMode, ...] = ("window", "summary")


@dataclass(frozen=True, slots=True)
class MemoryModeField:
    """What a tenant's turns remember: the window that fits the token limit, or the window plus a rolling
    summary of what fell out of it. Unset (None, no CRD default) means the service's ``ENGRAM_MEMORY``."""

    name: str = "memory"
    crd_name: str = "memory"
    cli_flag: str = "--memory"
    choices: tuple[MemoryMode, ...] = MEMORY_MODES
    description: str = (
        "What each turn is given: window (the newest messages that fit the token limit) or summary (the window "
        "plus a rolling summary of the messages that fell out of it). Unset: the service's ENGRAM_MEMORY."
    )

    def problem(self, value: object) -> str | None:
        """Why ``value`` is not a valid memory mode (None, unset, is), or None if it is."""
        if value is None or value in self.choices:
            return None
        return f"expected {' or '.join(self.choices)}, got {value!r}"

    def parse(self, value: object) -> MemoryMode | None:
        """``value`` as a :data:`MemoryMode` (None or '' = unset); raises :class:`InvalidPolicy` naming the choices."""
        if value is None or value == "":
            return None
        for choice in self.choices:
            if value == choice:
                return choice
        raise InvalidPolicy(f"{self.name}: {self.problem(value)}")


MEMORY_MODE = MemoryModeField()


@dataclass(frozen=True, slots=True)
class Policy:
    """Per-tenant memory policy. Construction checks every field against its :class:`PolicyField` and
    raises :class:`~engram.errors.InvalidPolicy` naming the field, its range and the value given."""

    token_limit: int = TOKEN_LIMIT.default
    session_ttl_seconds: int = SESSION_TTL_SECONDS.default  # 0 = never expire
    max_messages_per_session: int = MAX_MESSAGES_PER_SESSION.default
    max_sessions: int = MAX_SESSIONS.default  # 0 = no limit
    max_stored_bytes: int = MAX_STORED_BYTES.default  # 0 = no limit
    requests_per_second: int = REQUESTS_PER_SECOND.default  # 0 = no limit
    burst: int = BURST.default  # 0 = requests_per_second
    memory: MemoryMode | None = None  # None: the service's ENGRAM_MEMORY

    @property
    def effective_burst(self) -> int:
        """Requests allowed at once: ``burst``, or one second's worth when it is 0."""
        return self.burst or max(1, self.requests_per_second)

    def __post_init__(self) -> None:
        for spec in POLICY_FIELDS:
            problem = spec.problem(getattr(self, spec.name))
            if problem is not None:
                raise InvalidPolicy(f"{spec.name}: {problem}")
        if (problem := MEMORY_MODE.problem(self.memory)) is not None:
            raise InvalidPolicy(f"{MEMORY_MODE.name}: {problem}")


@dataclass(frozen=True, slots=True)
class Tenant:
    """Who a request acts for, and the memory policy that applies to it."""

    name: str
    policy: Policy = field(default_factory=Policy)

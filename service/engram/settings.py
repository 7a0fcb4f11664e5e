"""The one settings object: every knob of Engram comes from an ``ENGRAM_*`` environment variable.

Read it once (:func:`get_settings`) and pass it down. Invalid values fail at start with pydantic's
message naming the variable.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engram.policy import (
    BURST,
    MAX_MESSAGES_PER_SESSION,
    MAX_SESSIONS,
    MAX_STORED_BYTES,
    REQUESTS_PER_SECOND,
    SESSION_TTL_SECONDS,
    TOKEN_LIMIT,
    PolicyField,
)
from engram.redis_keys import NAMESPACE_PATTERN


def parse_host_ports(value: str) -> list[tuple[str, int]]:
    """``"a:26379, [::1]:26380"`` -> ``[("a", 26379), ("::1", 26380)]``; ValueError naming a bad entry."""
    addresses = []
    for entry in (part.strip() for part in value.split(",")):
        if not entry:
            continue
        host, _, port = entry.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c in host for c in "/@ "):
            raise ValueError(f"{entry!r} is not host:port (e.g. redis-sentinel-0:26379)")
        addresses.append((host, int(port)))
    return addresses


def _bounds(policy_field: PolicyField) -> Any:
    """A memory policy setting's constraints, from its one definition in :mod:`engram.policy`."""
    return Field(ge=policy_field.minimum, le=policy_field.maximum, description=policy_field.description)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ENGRAM_", extra="ignore", frozen=True)

    # --- Redis -----------------------------------------------------------------------------------------
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL (redis://, rediss://, unix://)")
    redis_username: str | None = Field(None, description="Redis ACL user (overrides the URL's)")
    redis_password: SecretStr | None = Field(None, description="Redis password (overrides the URL's)")
    # The timeouts are wall-clock seconds on this process's event loop, so they include time the loop
    # spends on other requests: short enough that a hung Redis fails a turn quickly, long enough that a
    # busy replica does not mistake its own queue for a Redis outage.
    redis_socket_timeout: float = Field(5.0, gt=0, le=60, description="seconds before a Redis call fails")
    redis_connect_timeout: float = Field(2.0, gt=0, le=60, description="seconds to open a connection")
    redis_max_connections: int = Field(64, ge=1, le=10_000, description="connections per process")
    redis_pool_timeout: float = Field(
        5.0, gt=0, le=60, description="seconds a call waits for a free connection when all are busy, then 503"
    )
    namespace: str = Field("engram", description="first segment of every Redis key")

    # --- Redis topology and commit durability (one block; checked together in _redis_topology) ---------
    redis_mode: Literal["standalone", "sentinel", "cluster"] = Field(
        "standalone",
        description="standalone: ENGRAM_REDIS_URL is the primary; sentinel: the primary is asked of "
        "ENGRAM_REDIS_SENTINELS and followed through failovers; cluster: ENGRAM_REDIS_URL is any seed node of "
        "a Redis Cluster (redis-py's cluster client finds the others and follows failovers and resharding)",
    )
    redis_sentinels: str = Field("", description="sentinel mode: the Sentinels, host:port,host:port,...")
    redis_sentinel_service: str = Field(
        "engram", min_length=1, description="sentinel mode: the name the Sentinels monitor the primary under"
    )
    redis_sentinel_username: str | None = Field(None, description="ACL user on the Sentinels, if they need one")
    redis_sentinel_password: SecretStr | None = Field(None, description="password of the Sentinels, if they need one")
    commit_durability: Literal["local", "replicated"] = Field(
        "local",
        description="local: a turn is acknowledged once the primary ran its commit; replicated: once at least "
        "one replica has it too (WAIT in the commit's round trip; 503 not_replicated otherwise)",
    )
    commit_replica_timeout_ms: int = Field(
        1000, ge=1, le=60_000, description="replicated: ms a commit waits for a replica before answering 503"
    )

    # --- HTTP ---------------------------------------------------------------------------------------------
    docs_ui: bool = Field(
        False,
        description="serve Swagger UI at /docs; off by default: it loads its assets from a CDN, on the origin "
        "whose localStorage holds the page's API key (/openapi.json is always served)",
    )

    # --- memory policy (defaults; a tenant's registry record may override) ------------------------------
    # (default, bounds and description of each: engram.policy, the one definition)
    token_limit: Annotated[int, _bounds(TOKEN_LIMIT)] = TOKEN_LIMIT.default
    session_ttl_seconds: Annotated[int, _bounds(SESSION_TTL_SECONDS)] = SESSION_TTL_SECONDS.default
    max_messages_per_session: Annotated[int, _bounds(MAX_MESSAGES_PER_SESSION)] = MAX_MESSAGES_PER_SESSION.default
    max_sessions: Annotated[int, _bounds(MAX_SESSIONS)] = MAX_SESSIONS.default
    max_stored_bytes: Annotated[int, _bounds(MAX_STORED_BYTES)] = MAX_STORED_BYTES.default
    requests_per_second: Annotated[int, _bounds(REQUESTS_PER_SECOND)] = REQUESTS_PER_SECOND.default
    burst: Annotated[int, _bounds(BURST)] = BURST.default
    max_message_bytes: int = Field(32 * 1024, ge=1, le=16 * 1024 * 1024, description="UTF-8 bytes per message")
    cache_sessions: int = Field(10_000, ge=0, description="session tails kept per process (0 = no cache)")
    memory: Literal["on", "window", "summary", "off"] = Field(
        "on",
        description="on (or window) = the window of history that fits the token limit; summary = the window plus a "
        "durable rolling summary of what fell out of it (docs/design.md, 'Rolling summary'); off = a benchmark "
        "baseline only: chat turns skip loading and storing history and the model gets just the new message (a "
        "stateless service, for comparison; see docs/benchmarks.md)",
    )
    # --- rolling summary (ENGRAM_MEMORY=summary) ---------------------------------------------------------
    summary_max_tokens: int = Field(
        512, ge=16, le=100_000, description="tokens of the token limit kept for the summary (at most half of it)"
    )
    summary_batch: int = Field(
        16, ge=1, le=1000, description="messages out of the window, not yet summarized, that start a summarizer"
    )
    summary_concurrency: int = Field(
        4, ge=1, le=1000, description="summarizers running at once per process (more are skipped, not queued)"
    )

    # --- model ---------------------------------------------------------------------------------------
    llm: Literal["echo", "openai-like"] = "echo"
    llm_base_url: str | None = None
    llm_model: str | None = None
    llm_api_key: SecretStr | None = None
    llm_timeout: float = Field(60.0, gt=0)

    # --- API ------------------------------------------------------------------------------------------
    auth: Literal["required", "disabled"] = "required"
    tenant_cache_seconds: float = Field(2.0, ge=0, le=60, description="API-key lookups are cached this long")

    # --- tenancy: operator and `engram tenant` (added by the tenancy work) -----------------------------
    redis_replica_urls: str = Field(
        "", description="comma-separated replica URLs: tenant ACL users are set on each (ACLs do not replicate)"
    )
    operator_repair_interval_seconds: float = Field(
        60.0, gt=0, le=86_400, description="how often the operator re-checks each tenant for drift"
    )
    operator_purge_batch: int = Field(100, ge=1, le=10_000, description="sessions deleted per purge batch")

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels_are_host_port_pairs(cls, value: str) -> str:
        parse_host_ports(value)  # raises ValueError naming the bad entry
        return value

    @model_validator(mode="after")
    def _redis_topology(self) -> Settings:
        if self.redis_mode == "cluster" and self.sentinel_addresses:
            raise ValueError(
                "ENGRAM_REDIS_SENTINELS is set but ENGRAM_REDIS_MODE is cluster (a cluster has no Sentinels)"
            )
        if self.redis_mode == "cluster" and self.redis_url.lower().startswith("unix://"):
            raise ValueError("ENGRAM_REDIS_MODE=cluster needs ENGRAM_REDIS_URL=redis://<seed host>:<port>, no socket")
        if self.redis_mode == "sentinel" and not self.sentinel_addresses:
            raise ValueError("ENGRAM_REDIS_MODE=sentinel needs ENGRAM_REDIS_SENTINELS (host:port,host:port,...)")
        if self.redis_mode == "standalone" and self.sentinel_addresses:
            raise ValueError("ENGRAM_REDIS_SENTINELS is set but ENGRAM_REDIS_MODE is standalone: set it to sentinel")
        replicated = self.commit_durability == "replicated"
        if replicated and self.commit_replica_timeout_ms >= self.redis_socket_timeout * 1000:
            raise ValueError(
                f"ENGRAM_COMMIT_REPLICA_TIMEOUT_MS ({self.commit_replica_timeout_ms}) must be below "
                f"ENGRAM_REDIS_SOCKET_TIMEOUT ({self.redis_socket_timeout} s): the commit waits for replicas "
                "within one Redis call"
            )
        return self

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return parse_host_ports(self.redis_sentinels)

    @field_validator("namespace")
    @classmethod
    def _namespace_is_a_key_segment(cls, value: str) -> str:
        if not NAMESPACE_PATTERN.fullmatch(value):
            raise ValueError("must match [a-z][a-z0-9_-]{0,31}")
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()

"""Every Redis key Engram reads or writes is built here, and nowhere else.

Layout (``engram`` is the configurable namespace, ``acme`` a tenant, ``s1`` a session)::

    engram:acme:{acme:s1}:log      stream   the session's messages, oldest first (server-ordered ids)
    engram:acme:{acme:s1}:meta     hash     epoch (changes on any rewrite), created, updated, key (LlamaIndex key)
    engram:acme:{acme:s1}:turns    hash     turn_id -> "<user msg id> <assistant msg id>" (idempotency)
    engram:acme:{acme:s1}:archive  stream   messages LlamaIndex's Memory archived (moved out of the log)
    engram:acme:{acme:s1}:summary  hash     rolling summary: text, covers_through, messages_covered, tokens, epoch
    engram:acme:{acme:s1}:facts    zset     LlamaIndex memory blocks' facts: "<block id>:<fact>" scored by server time
    engram:acme:{acme:s1}:blocks   hash     other memory blocks' state: "<block id>" -> JSON (static content)
    engram:acme:sessions           zset     session_id scored by last update (ms): the tenant's session index
    engram:acme:usage              hash     session_id -> bytes of its messages; ":bytes" -> the tenant's total
    engram:acme:expiry             zset     session_id -> ms its keys expire ("inf": no TTL); its size = sessions
    engram:acme:rate               hash     the tenant's request rate state (tat: GCRA theoretical arrival, ms)
    engram:acme:subject:u-7        set      session ids of one subject (end user), for erasure by subject
    engram:acme:replicated         hash     a counter written (expires in a minute) so WAIT can confirm a replayed turn
    engram:_sys:tenant:acme        hash     tenant registry record (policy, API-key hash) - NOT tenant-writable
    engram:_sys:tenants            set      names of registered tenants

Why this shape:
- Every key of tenant ``acme`` starts with ``engram:acme:``. Tenant names are DNS labels (``[a-z0-9-]``),
  so the ACL pattern ``engram:acme:*`` can never match ``engram:acme-2:...``: the character after ``acme``
  is ``:`` for acme and ``-`` for acme-2. ``_sys`` is not a DNS label, so no tenant pattern reaches the
  registry.
- The keys of one session share the hash tag ``{tenant:session}``, so the Lua functions that touch them
  all are single-slot. The tenant index is a separate slot: fine on one node, CROSSSLOT on a Cluster.

Redis Cluster (``KeySpace(tenant_slot=True)``, ``ENGRAM_REDIS_MODE=cluster``): every key of a tenant gets the
hash tag ``{tenant}`` right after the tenant prefix, so a tenant's sessions, index, usage, expiry, rate and
subjects share one slot and every function stays one atomic call (quotas and the rate limit are tenant-wide
checks inside the commit and the load)::

    engram:acme:{acme}:{acme:s1}:log    (the first {...} is the hash tag: the slot of "acme")
    engram:acme:{acme}:sessions

Tenants spread over the cluster's primaries; one tenant lives on one shard (docs/design.md, "Redis
Cluster"). The prefix ``engram:acme:`` is unchanged, so ACL patterns are the same in both layouts.
- Session ids are ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``: no glob metacharacters, no ``{}`` or ``:``,
  so they can neither break the hash tag nor widen an ACL pattern.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engram.errors import InvalidInput, InvalidSessionId, InvalidSubject, InvalidTenant

DEFAULT_NAMESPACE = "engram"
SYSTEM_SEGMENT = "_sys"

SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SUBJECT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+:-]{0,127}")
# RFC 1123 DNS label, as Kubernetes names are.
TENANT_PATTERN = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
NAMESPACE_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def matching(value: object, pattern: re.Pattern[str], error: type[InvalidInput], what: str, expected: str) -> str:
    """Return ``value`` if it is a string ``pattern`` matches whole, else raise ``error`` saying what was expected."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise error(f"invalid {what} {value!r}: expected {expected}")
    return value


def validate_session_id(session_id: object) -> str:
    """Return ``session_id`` if it is a valid session id, else raise :class:`InvalidSessionId`."""
    expected = "1-128 characters of [A-Za-z0-9._-], starting with a letter or digit"
    return matching(session_id, SESSION_ID_PATTERN, InvalidSessionId, "session id", expected)


def validate_subject_id(subject: object) -> str:
    """Return ``subject`` (an end user's id given by the client) if valid, else raise :class:`InvalidSubject`.
    E-mail-like ids are allowed; braces, globs and whitespace are not (they would reach key names)."""
    expected = "1-128 characters of [A-Za-z0-9._@+:-], starting with a letter or digit"
    return matching(subject, SUBJECT_ID_PATTERN, InvalidSubject, "subject id", expected)


def validate_tenant(tenant: object) -> str:
    """Return ``tenant`` if it is a DNS label (lowercase, digits, '-', at most 63), else raise."""
    expected = "a DNS label (1-63 of [a-z0-9-], starting and ending with a letter or digit)"
    return matching(tenant, TENANT_PATTERN, InvalidTenant, "tenant", expected)


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """The keys of one session. All share one hash tag."""

    log: str
    meta: str
    turns: str
    archive: str
    index: str  # the tenant's session index (different slot)
    session_id: str
    usage: str  # the tenant's usage hash and expiry zset (quotas; different slot)
    expiry: str
    rate: str  # the tenant's request rate (different slot)

    def session_keys(self) -> tuple[str, str, str, str]:
        """The keys that belong to the session itself (deleted with it)."""
        return (self.log, self.meta, self.turns, self.archive)

    # --- rolling summary (docs/design.md, "Rolling summary") ---------------------------------------------
    @property
    def summary(self) -> str:
        """The session's rolling summary (a hash; same hash tag, deleted with the session)."""
        return self.log.removesuffix(":log") + ":summary"

    def function_keys(self) -> tuple[str, ...]:
        """The KEYS of the library's functions that change a session, in their order (engram.lua)."""
        own = (self.log, self.meta, self.turns)
        return (*own, self.index, self.archive, self.usage, self.expiry, self.summary, *self.memory_blocks.all())

    @property
    def memory_blocks(self) -> BlockKeys:
        """The session's durable LlamaIndex memory blocks' state (same hash tag; deleted with the session)."""
        base = self.log.removesuffix(":log")
        return BlockKeys(facts=f"{base}:facts", blocks=f"{base}:blocks")


@dataclass(frozen=True, slots=True)
class BlockKeys:
    """The keys of one session's durable memory blocks (same hash tag as :class:`SessionKeys`)."""

    facts: str  # zset: every fact-extraction block's facts, member "<block id>:<fact>"
    blocks: str  # hash: "<block id>" -> JSON state of other blocks (static content)

    def all(self) -> tuple[str, str]:
        """Both keys (what deleting or erasing the session must delete too)."""
        return (self.facts, self.blocks)


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Builds keys under one namespace (``engram`` by default)."""

    namespace: str = DEFAULT_NAMESPACE
    # Redis Cluster: every key of a tenant in the tenant's hash slot (see the module's docstring)
    tenant_slot: bool = False

    def __post_init__(self) -> None:
        if not NAMESPACE_PATTERN.fullmatch(self.namespace):
            raise ValueError(f"invalid key namespace {self.namespace!r}: expected [a-z][a-z0-9_-]{{0,31}}")

    # --- tenant space -------------------------------------------------------------------------------
    def tenant_prefix(self, tenant: str) -> str:
        """Prefix shared by every key of ``tenant`` (and by no key of any other tenant)."""
        return f"{self.namespace}:{validate_tenant(tenant)}:"

    def tenant_key_pattern(self, tenant: str) -> str:
        """Glob matching every key of ``tenant`` and nothing else (no metacharacter can occur in the
        prefix: namespaces and tenants are [a-z0-9_-]). For ACLs and the purge's SCAN MATCH."""
        return f"{self.tenant_prefix(tenant)}*"

    def tenant_acl_key_patterns(self, tenant: str) -> list[str]:
        """ACL key patterns (``~pattern``) that match every key of ``tenant`` and nothing else."""
        return [self.tenant_key_pattern(tenant)]

    def _tenant_base(self, tenant: str) -> str:
        """What every key of ``tenant`` starts with: the prefix, and on a Cluster the tenant's hash tag."""
        prefix = self.tenant_prefix(tenant)
        return f"{prefix}{{{tenant}}}:" if self.tenant_slot else prefix

    def session_index(self, tenant: str) -> str:
        return f"{self._tenant_base(tenant)}sessions"

    def usage(self, tenant: str) -> str:
        return f"{self._tenant_base(tenant)}usage"

    def session_expiry(self, tenant: str) -> str:
        return f"{self._tenant_base(tenant)}expiry"

    def rate(self, tenant: str) -> str:
        return f"{self._tenant_base(tenant)}rate"

    def subject(self, tenant: str, subject: str) -> str:
        """The set of a subject's (an end user's) session ids."""
        return f"{self._tenant_base(tenant)}subject:{validate_subject_id(subject)}"

    # --- commit durability (ENGRAM_COMMIT_DURABILITY=replicated) --------------------------------------
    def replication_barrier(self, tenant: str) -> str:
        """A key the store writes before ``WAIT`` when a turn it answers was stored earlier (a retry): WAIT
        only counts a connection's own writes, so without one it would confirm nothing."""
        return f"{self._tenant_base(tenant)}replicated"

    def session(self, tenant: str, session_id: str) -> SessionKeys:
        tag = f"{{{tenant}:{validate_session_id(session_id)}}}"
        base = f"{self._tenant_base(tenant)}{tag}"
        return SessionKeys(
            log=f"{base}:log",
            meta=f"{base}:meta",
            turns=f"{base}:turns",
            archive=f"{base}:archive",
            index=self.session_index(tenant),
            session_id=session_id,
            usage=self.usage(tenant),
            expiry=self.session_expiry(tenant),
            rate=self.rate(tenant),
        )

    def session_id_of(self, tenant: str, key: str) -> str | None:
        """The session a key of ``tenant`` belongs to (from its hash tag), or None for the tenant's own
        keys (the session index) and for anything that is not a session key."""
        prefix = f"{self._tenant_base(tenant)}{{{tenant}:"
        if not key.startswith(prefix):
            return None
        session_id, brace, _ = key[len(prefix) :].partition("}")
        return session_id if brace and SESSION_ID_PATTERN.fullmatch(session_id) else None

    # --- durable memory blocks (LlamaIndex ``Memory``; engram.history.blocks) -----------------------
    def memory_blocks(self, tenant: str, session_id: str) -> BlockKeys:
        """The keys holding a session's memory blocks' state: in the session's hash tag (its slot)."""
        return self.session(tenant, session_id).memory_blocks

    # --- system space (operator / CLI only; never in a tenant's ACL) ---------------------------------
    def tenant_record(self, tenant: str) -> str:
        return f"{self.namespace}:{SYSTEM_SEGMENT}:tenant:{validate_tenant(tenant)}"

    def tenant_set(self) -> str:
        return f"{self.namespace}:{SYSTEM_SEGMENT}:tenants"

"""Who a request acts for: ``Authorization: Bearer <api key>`` resolved by the tenant registry.

With ``ENGRAM_AUTH=disabled`` every request is tenant ``default`` with the policy from the settings
(for a laptop; the service says so loudly at start-up).
"""

from __future__ import annotations

from typing import Protocol

from engram.policy import POLICY_FIELDS, Policy, Tenant
from engram.server import metrics
from engram.server.errors import Unauthorized
from engram.settings import Settings

DEFAULT_TENANT = "default"


class KeyResolver(Protocol):
    async def resolve_api_key(self, api_key: str) -> Tenant | None: ...


def default_tenant(settings: Settings) -> Tenant:
    return Tenant(DEFAULT_TENANT, Policy(**{f.name: getattr(settings, f.name) for f in POLICY_FIELDS}))


def bearer_token(authorization: str | None) -> str:
    """The API key of an ``Authorization: Bearer <key>`` header, or :class:`Unauthorized`."""
    if not authorization:
        raise Unauthorized("missing API key: send `Authorization: Bearer <api key>`")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("malformed Authorization header: expected `Bearer <api key>`")
    return token.strip()


class Authenticator:
    """Resolves the tenant of a request: the registry when auth is required, else ``default``."""

    def __init__(self, settings: Settings, resolver: KeyResolver | None) -> None:
        self.required = settings.auth == "required"
        self.resolver = resolver
        self.anonymous = default_tenant(settings)

    async def tenant(self, authorization: str | None) -> Tenant:
        if not self.required:
            return self.anonymous
        api_key = bearer_token(authorization)
        if self.resolver is None:
            raise Unauthorized("no tenant registry is configured")
        with metrics.redis_operation("auth"):
            tenant = await self.resolver.resolve_api_key(api_key)
        if tenant is None:
            raise Unauthorized("unknown or revoked API key")
        return tenant

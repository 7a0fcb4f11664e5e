"""Tenancy: API keys, the tenant registry, Redis ACL users, and the reconcile code shared by the
operator (``engram_operator``) and the ``engram tenant`` CLI. See docs/tenancy.md."""

from engram.tenancy.apikeys import generate_api_key, hash_secret, parse_api_key
from engram.tenancy.records import TenantRecord
from engram.tenancy.registry import TenantRegistry

__all__ = ["TenantRecord", "TenantRegistry", "generate_api_key", "hash_secret", "parse_api_key"]

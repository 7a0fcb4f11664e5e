from __future__ import annotations

from fnmatch import fnmatchcase

import pytest

from engram.errors import InvalidSessionId, InvalidTenant
from engram.redis_keys import KeySpace


def test_tenant_acl_patterns_match_its_keys_and_not_a_prefix_sibling() -> None:
    keys = KeySpace()
    acme, acme2 = keys.tenant_acl_key_patterns("acme"), keys.tenant_acl_key_patterns("acme-2")
    acme_keys = [*keys.session("acme", "s1").session_keys(), keys.session_index("acme")]
    acme2_keys = [*keys.session("acme-2", "s1").session_keys(), keys.session_index("acme-2")]
    assert all(any(fnmatchcase(k, p) for p in acme) for k in acme_keys)
    assert not any(fnmatchcase(k, p) for p in acme for k in acme2_keys)
    assert not any(fnmatchcase(k, p) for p in acme2 for k in acme_keys)


def test_registry_keys_are_outside_every_tenant_pattern() -> None:
    keys = KeySpace()
    for tenant in ("acme", "a", "sys", "x-1"):
        patterns = keys.tenant_acl_key_patterns(tenant)
        for system_key in (keys.tenant_record(tenant), keys.tenant_set()):
            assert not any(fnmatchcase(system_key, p) for p in patterns)


def test_keys_of_one_session_share_one_cluster_hash_tag() -> None:
    session = KeySpace().session("acme", "chat-1.a_b")
    tags = {key[key.index("{") : key.index("}") + 1] for key in session.session_keys()}
    assert tags == {"{acme:chat-1.a_b}"}


@pytest.mark.parametrize("bad", ["", "-leading", "has space", "a" * 129, "semi:colon", "br{ace}", "st*ar", "é"])
def test_invalid_session_ids_are_refused(bad: str) -> None:
    with pytest.raises(InvalidSessionId, match="invalid session id"):
        KeySpace().session("acme", bad)


@pytest.mark.parametrize("bad", ["", "Acme", "acme_2", "-acme", "acme-", "a" * 64, "ac:me", "_sys"])
def test_invalid_tenants_are_refused(bad: str) -> None:
    with pytest.raises(InvalidTenant, match="invalid tenant"):
        KeySpace().session(bad, "s1")

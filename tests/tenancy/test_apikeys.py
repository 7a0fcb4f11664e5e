from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from engram.redis_keys import TENANT_PATTERN
from engram.tenancy.apikeys import generate_api_key, hash_secret, parse_api_key

tenants = st.from_regex(TENANT_PATTERN, fullmatch=True)


@given(tenants)
def test_a_generated_key_names_its_tenant(tenant: str) -> None:
    parsed = parse_api_key(generate_api_key(tenant))
    assert parsed is not None and parsed.tenant == tenant


def test_two_keys_of_one_tenant_differ() -> None:
    assert generate_api_key("acme") != generate_api_key("acme")


@given(st.text(max_size=80))
def test_parsing_arbitrary_text_never_raises(text: str) -> None:
    parsed = parse_api_key(text)
    assert parsed is None or text.startswith("egk_")


def test_malformed_keys_are_refused() -> None:
    key = generate_api_key("acme")
    secret = key.split(".", 1)[1]
    for bad in ("", "egk_acme", f"egk_.{secret}", f"egk_ACME.{secret}", f"egk_acme.{secret}x", f"xyz_acme.{secret}",
                f"egk_acme.{secret[:-1]}*", f"egk_acme-.{secret}", f" {key}", f"Bearer {key}"):  # fmt: skip
        assert parse_api_key(bad) is None, bad


def test_hash_is_hex_sha256_as_redis_acls_take_it() -> None:
    assert hash_secret("pw") == "30c952fab122c3f9759f02a6d95c3758b246b4fee239957b2d4fee46e26170c4"

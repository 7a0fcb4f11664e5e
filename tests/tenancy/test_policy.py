"""The memory policy's one definition (engram.policy): Policy checks its bounds, and a registry record in a
real Redis whose policy is outside them does not parse, so its API key resolves to no tenant."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from engram.errors import InvalidInput, InvalidPolicy
from engram.policy import MEMORY_MODE, POLICY_FIELDS, RETENTION, Policy, PolicyField
from engram.tenancy.provision import list_tenants
from engram.tenancy.records import InvalidRecord
from engram.tenancy.registry import TenantRegistry, read_record
from tests.tenancy.conftest import KEYS, MakeTenant

OUT_OF_BOUNDS = [
    pytest.param(field, value, id=f"{field.name}={value}")
    for field in POLICY_FIELDS
    for value in (field.minimum - 1, field.maximum + 1)
]


def test_policy_defaults_are_the_fields_defaults() -> None:
    assert Policy() == Policy(**{f.name: f.default for f in POLICY_FIELDS})
    assert [f.name for f in POLICY_FIELDS] == [n for n in Policy.__dataclass_fields__ if n != MEMORY_MODE.name]
    assert Policy().memory is None  # the service's ENGRAM_MEMORY


@pytest.mark.parametrize(("field", "value"), OUT_OF_BOUNDS)
def test_policy_refuses_a_value_out_of_bounds_naming_field_range_and_value(field: PolicyField, value: int) -> None:
    with pytest.raises(InvalidPolicy) as refused:
        Policy(**{field.name: value})
    assert str(refused.value) == f"{field.name}: expected an integer in [{field.minimum}, {field.maximum}], got {value}"
    assert isinstance(refused.value, InvalidInput) and refused.value.code == "invalid_policy"


@pytest.mark.parametrize("field", POLICY_FIELDS, ids=lambda f: f.name)
def test_policy_takes_both_bounds_themselves(field: PolicyField) -> None:
    for value in (field.minimum, field.maximum):
        assert getattr(Policy(**{field.name: value}), field.name) == value


@pytest.mark.parametrize("value", [True, "3000", 3000.0, None])
def test_policy_refuses_what_is_not_an_integer(value: object) -> None:
    with pytest.raises(InvalidPolicy, match="token_limit: expected an integer"):
        Policy(token_limit=value)  # type: ignore[arg-type]


def test_retention_takes_only_its_choices() -> None:
    assert [RETENTION.parse(choice) for choice in RETENTION.choices] == ["Delete", "Retain"]
    with pytest.raises(InvalidPolicy, match=r"retention: expected Delete or Retain, got 'delete'"):
        RETENTION.parse("delete")


def test_the_memory_mode_takes_only_its_choices_or_unset() -> None:
    assert [MEMORY_MODE.parse(choice) for choice in MEMORY_MODE.choices] == ["window", "summary"]
    assert MEMORY_MODE.parse(None) is None and MEMORY_MODE.parse("") is None
    with pytest.raises(InvalidPolicy, match=r"memory: expected window or summary, got 'Summary'"):
        MEMORY_MODE.parse("Summary")
    with pytest.raises(InvalidPolicy, match=r"memory: expected window or summary, got 'all'"):
        Policy(memory="all")  # type: ignore[arg-type]


async def test_a_tenants_memory_mode_is_stored_and_resolved_with_its_key(
    admin: aioredis.Redis, make_tenant: MakeTenant
) -> None:
    credentials = await make_tenant("acme", Policy(memory="summary"))
    await make_tenant("other")
    registry = TenantRegistry(admin, KEYS, cache_seconds=0)
    tenant = await registry.resolve_api_key(credentials.api_key)
    assert tenant is not None and tenant.policy.memory == "summary"
    other = await read_record(admin, KEYS, "other")
    assert other is not None and other.policy.memory is None
    await admin.hdel(KEYS.tenant_record("other"), MEMORY_MODE.name)  # a record written before the field existed
    older = await read_record(admin, KEYS, "other")
    assert older is not None and older.policy.memory is None
    await admin.hset(KEYS.tenant_record("acme"), MEMORY_MODE.name, "everything")
    with pytest.raises(InvalidRecord, match=r"memory: expected window or summary, got 'everything'"):
        await read_record(admin, KEYS, "acme")


@pytest.mark.parametrize(("field", "value"), OUT_OF_BOUNDS)
async def test_a_stored_record_out_of_bounds_still_serves_its_tenant_at_the_nearest_bound(
    admin: aioredis.Redis, make_tenant: MakeTenant, field: PolicyField, value: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A record written by an older version that took such values: an upgrade must not lock the tenant out."""
    credentials = await make_tenant("acme")
    registry = TenantRegistry(admin, KEYS, cache_seconds=0)
    await admin.hset(KEYS.tenant_record("acme"), field.name, str(value))
    record = await read_record(admin, KEYS, "acme")
    assert record is not None
    nearest = field.minimum if value < field.minimum else field.maximum
    assert getattr(record.policy, field.name) == nearest
    assert f"{field.name}: expected an integer in [{field.minimum}, {field.maximum}], got {value}" in caplog.text
    tenant = await registry.resolve_api_key(credentials.api_key)
    assert tenant is not None and getattr(tenant.policy, field.name) == nearest
    assert [t.tenant for t in await list_tenants(admin, KEYS)] == ["acme"]


async def test_a_stored_record_with_a_non_integer_policy_field_names_the_field(
    admin: aioredis.Redis, make_tenant: MakeTenant
) -> None:
    await make_tenant("acme")
    await admin.hset(KEYS.tenant_record("acme"), "session_ttl_seconds", "1h")
    with pytest.raises(InvalidRecord, match=r"session_ttl_seconds: expected an integer in \[0, 315360000\], got '1h'"):
        await read_record(admin, KEYS, "acme")


async def test_a_stored_record_with_an_unknown_retention_is_unreadable(
    admin: aioredis.Redis, make_tenant: MakeTenant
) -> None:
    await make_tenant("acme")
    await admin.hset(KEYS.tenant_record("acme"), "retention", "Forever")
    with pytest.raises(InvalidRecord, match=r"retention: expected Delete or Retain, got 'Forever'"):
        await read_record(admin, KEYS, "acme")

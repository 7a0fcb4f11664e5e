"""The operator under test: kopf running engram_operator.handlers against KMock (the Kubernetes API
emulator by kopf's author; the only stand-in in these tests) and a real redis-server.

Recipe (see docs anchors): declare the custom resource AND v1/namespaces (kopf waits for it in discovery),
seed metadata.resourceVersion (KMock does not set it and kopf's patches need it), and point both kopf and
the operator's Kubernetes client at a kubeconfig whose server is KMock. KMock runs on the test's event loop
while kopf runs in KopfRunner's thread: wait with ``await asyncio.sleep`` (see ``eventually``), never
``time.sleep``.
"""

from __future__ import annotations

import asyncio
import importlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import kmock
import pytest
import redis.asyncio as aioredis
import yaml
from kopf.testing import KopfRunner

from engram.settings import get_settings

# Every operator test runs the repair timer this often (kopf fixes it when the handlers are imported).
REPAIR_INTERVAL = 0.5
CR = "engram.dev/v1alpha1/memorynamespaces"
NAMESPACE = "team-a"


def kubeconfig(server: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": server}}],
        "users": [{"name": "kmock", "user": {"token": "not-a-real-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": "default"}}],
        "current-context": "kmock",
    }


def declare_resources(k: kmock.KubernetesEmulator) -> None:
    verbs = {"get", "list", "watch", "create", "patch", "update", "delete"}
    k.resources[CR] = kmock.ResourceInfo(
        kind="MemoryNamespace", singular="memorynamespace", namespaced=True, verbs=verbs, subresources={"status"}
    )
    k.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs=verbs)
    k.resources["v1/secrets"] = kmock.ResourceInfo(kind="Secret", namespaced=True, verbs=verbs)
    k.resources["v1/events"] = kmock.ResourceInfo(kind="Event", namespaced=True, verbs=verbs)


def memory_namespace(name: str, namespace: str = NAMESPACE, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "engram.dev/v1alpha1",
        "kind": "MemoryNamespace",
        # KMock sets neither resourceVersion nor uid: seed them as the API server would.
        "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()), "resourceVersion": "1"},
        "spec": spec,
    }


def cr_path(name: str | None = None, namespace: str = NAMESPACE) -> str:
    base = f"/apis/engram.dev/v1alpha1/namespaces/{namespace}/memorynamespaces"
    return f"{base}/{name}" if name else base


async def eventually(
    check: Callable[[], Awaitable[Any]] | Callable[[], Any], timeout: float = 60.0, interval: float = 0.05
) -> Any:
    """Poll ``check`` until it returns something truthy (returns that) or raise after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            last = result
            if result:
                return result
        except (KeyError, ValueError, AssertionError) as error:
            last = error
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s; last result: {last!r}")
        await asyncio.sleep(interval)


class Cluster:
    """KMock plus helpers that speak its HTTP API, so the operator sees real watch events."""

    def __init__(self, emulator: kmock.KubernetesEmulator) -> None:
        self.k = emulator

    async def create(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        response = await self.k.post(cr_path(namespace=meta["namespace"]), json=body)
        assert response.status < 300, await response.text()

    async def patch_spec(self, name: str, spec: dict[str, Any], namespace: str = NAMESPACE) -> None:
        response = await self.k.patch(cr_path(name, namespace), json={"spec": spec})
        assert response.status < 300, await response.text()

    async def delete(self, name: str, namespace: str = NAMESPACE) -> None:
        response = await self.k.delete(cr_path(name, namespace))
        assert response.status < 300, await response.text()

    async def delete_secret(self, name: str, namespace: str = NAMESPACE) -> None:
        response = await self.k.delete(f"/api/v1/namespaces/{namespace}/secrets/{name}")
        assert response.status < 300, await response.text()

    def _object(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj = self.k.objects[resource, namespace, name]
        except KeyError:
            return None
        return None if obj.deleted else obj.raw

    def get(self, name: str, namespace: str = NAMESPACE) -> dict[str, Any] | None:
        return self._object(CR, namespace, name)

    def status(self, name: str, namespace: str = NAMESPACE) -> dict[str, Any]:
        return (self.get(name, namespace) or {}).get("status") or {}

    def secret(self, name: str, namespace: str = NAMESPACE) -> dict[str, Any] | None:
        return self._object("v1/secrets", namespace, name)

    def events(self, reason: str | None = None) -> list[dict[str, Any]]:
        """Events the operator posted. Read from KMock's request log: KMock ignores generateName, so it
        stores only the first of kopf's events (the rest get 409, which kopf logs and ignores)."""
        posted = []
        for request in self.k:
            if request.action == kmock.action.CREATE and request.resource == "v1/events":
                if reason is None or request.data.get("reason") == reason:
                    posted.append(request.data)
        return posted


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
        declare_resources(emulator)
        path = tmp_path / "kubeconfig"
        path.write_text(yaml.safe_dump(kubeconfig(str(server.url).rstrip("/"))))
        monkeypatch.setenv("KUBECONFIG", str(path))
        # Both Kubernetes clients read their default location at import: point those at KMock too.
        monkeypatch.setattr("kubernetes_asyncio.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION", str(path))
        yield Cluster(emulator)


@pytest.fixture
def operator_env(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("ENGRAM_REDIS_URL", redis_url)
    monkeypatch.setenv("ENGRAM_OPERATOR_REPAIR_INTERVAL_SECONDS", str(REPAIR_INTERVAL))
    get_settings.cache_clear()
    handlers = importlib.import_module("engram_operator.handlers")
    assert handlers.REPAIR_INTERVAL == REPAIR_INTERVAL, "engram_operator.handlers was imported with other settings"
    yield
    get_settings.cache_clear()


OperatorFactory = Callable[[], KopfRunner]


@pytest.fixture
def run_operator(cluster: Cluster, operator_env: None) -> OperatorFactory:
    """Makes a KopfRunner for the operator command the Helm chart uses (minus the liveness port)."""

    def make() -> KopfRunner:
        args = ["run", "--standalone", "--all-namespaces", "-m", "engram_operator.handlers"]
        return KopfRunner(args, timeout=30)

    return make


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()

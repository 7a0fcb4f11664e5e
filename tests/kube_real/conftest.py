"""One local Kubernetes control plane (scripts/control-plane.sh) for every kube_real test, and what the tests
share on it: the chart installed with its defaults, kubectl/helm runners, ServiceAccount kubeconfigs from the
TokenRequest API, and the operator run as a local process.

Outside ``make test`` the tests are skipped, with the reason, when the control-plane binaries or helm are
missing. ``make test`` sets ``ENGRAM_REQUIRE_CONTROL_PLANE=1`` (after building the binaries), which turns a
missing binary into a failure: there the Kubernetes tests must run.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from testkit.processes import stop_process
from testkit.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
CHART = ROOT / "deploy" / "helm" / "engram"
CRD_FILE = CHART / "crds" / "memorynamespaces.engram.dev.yaml"
K8S_VERSION = os.environ.get("ENGRAM_K8S_VERSION", "v1.36.3")
REQUIRED = os.environ.get("ENGRAM_REQUIRE_CONTROL_PLANE") == "1"

# The release every test module may rely on: the chart with its defaults, installed once per session.
RELEASE, RELEASE_NAMESPACE = "engram", "engram"
# Static volumes: each bundled Redis pod claims one and a released volume is never reused (Retain); the
# cluster-mode values file alone claims 6.
PERSISTENT_VOLUMES = 24
# The admin Redis user the operator logs in as (the chart's redis.auth.adminUsername).
REDIS_ADMIN = "engram-admin"


def missing(reason: str) -> None:
    """Skip outside make test; fail inside it (ENGRAM_REQUIRE_CONTROL_PLANE=1), where these tests must run."""
    if REQUIRED:
        pytest.fail(f"{reason} (ENGRAM_REQUIRE_CONTROL_PLANE=1: make test requires it)", pytrace=False)
    pytest.skip(reason)


@cache
def control_plane_bin() -> Path | None:
    """The cached binaries' directory, or None when they are not built (no build is started from here)."""
    result = subprocess.run(
        [str(SCRIPTS / "build-control-plane.sh"), "--print"], capture_output=True, text=True, check=False, timeout=30
    )
    return Path(result.stdout.strip()) if result.returncode == 0 else None


@cache
def helm_binary() -> str | None:
    if os.environ.get("HELM"):
        return os.environ["HELM"]
    local = ROOT / ".tools" / "bin" / "helm"
    return str(local) if local.exists() else None


def run(args: list[str], *, env: dict[str, str] | None = None, input: str | None = None, timeout: float = 180.0) -> Any:
    return subprocess.run(args, capture_output=True, text=True, check=False, env=env, input=input, timeout=timeout)


def wait_until(what: str, condition: Callable[[], Any], timeout: float = 60.0, interval: float = 0.25) -> Any:
    """Poll ``condition`` until it returns something truthy (returned), or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass(frozen=True)
class ControlPlane:
    dir: Path
    bin: Path
    pids: dict[str, int]
    helm_path: str

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def ca(self) -> Path:
        return self.dir / "pki" / "ca.crt"

    @property
    def api_url(self) -> str:
        env = dict(line.split("=", 1) for line in (self.dir / "env").read_text().splitlines())
        return env["API_URL"]

    @property
    def env(self) -> dict[str, str]:
        """The environment for helm, kubectl and scripts: the admin kubeconfig and this kubectl first on PATH."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PATH": f"{self.bin}:{os.environ['PATH']}"}

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        config = kubeconfig or self.kubeconfig
        result = run([str(self.bin / "kubectl"), f"--kubeconfig={config}", *args], input=input, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def exists(self, *args: str) -> bool:
        return self.kubectl("get", *args, "-o", "name", check=False).returncode == 0

    def apply(self, *objects: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(o) for o in objects))

    def helm(self, *args: str, check: bool = True, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        result = run([self.helm_path, *args], env=self.env, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(
                f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )
        return result

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path) -> Path:
        """A kubeconfig holding a token of ServiceAccount namespace/name from the TokenRequest API (what a
        pod of that ServiceAccount gets mounted), and nothing else: no client certificate, no impersonation."""
        token = self.kubectl("create", "token", name, "-n", namespace, "--duration=2h").stdout.strip()
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        assert claims["sub"] == f"system:serviceaccount:{namespace}:{name}"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "local", "cluster": {"server": self.api_url, "certificate-authority": str(self.ca)}}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": name, "context": {"cluster": "local", "user": name, "namespace": namespace}}],
            "current-context": name,
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose; /proc says so.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def control_plane_script(command: str, directory: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ENGRAM_CONTROL_PLANE_PVS": str(PERSISTENT_VOLUMES)}
    return run([str(SCRIPTS / "control-plane.sh"), command, str(directory)], env=env)


@pytest.fixture(scope="session")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """The session's control plane: started once (about 6 s), stopped after the last kube_real test."""
    bin_dir = control_plane_bin()
    if bin_dir is None:
        missing("control-plane binaries not built: run `make control-plane` (Go; ~20 min cold, cached afterwards)")
    helm = helm_binary()
    if helm is None:
        missing("no helm: run `make helm` (or set HELM)")
    assert bin_dir is not None and helm is not None
    directory = tmp_path_factory.mktemp("control-plane")
    started = time.monotonic()
    result = control_plane_script("start", directory)
    if result.returncode != 0:
        control_plane_script("stop", directory)
        raise AssertionError(f"control-plane.sh start failed:\n{result.stderr}")
    print(f"\ncontrol plane started in {time.monotonic() - started:.1f} s")
    pids = {p.stem: int(p.read_text()) for p in (directory / "run").glob("*.pid")}
    assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"}
    yield ControlPlane(directory, bin_dir, pids, helm)
    stopped = control_plane_script("stop", directory)
    assert stopped.returncode == 0, stopped.stderr
    left = {name: pid for name, pid in pids.items() if alive(pid)}
    assert not left, f"still running after control-plane.sh stop: {left}"
    assert not list((directory / "run").glob("*.pid"))


@dataclass(frozen=True)
class Release:
    name: str
    namespace: str

    @property
    def fullname(self) -> str:
        return self.name if "engram" in self.name else f"{self.name}-engram"

    @property
    def operator_service_account(self) -> str:
        return f"{self.fullname}-operator"

    @property
    def chat_service_account(self) -> str:
        return f"{self.fullname}-chat"

    @property
    def selector(self) -> str:
        return f"app.kubernetes.io/instance={self.name}"


@pytest.fixture(scope="session")
def release(plane: ControlPlane) -> Release:
    """The chart with its defaults, installed once with --wait (its own test checks what that gives)."""
    started = time.monotonic()
    plane.helm("install", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE, "--create-namespace", "--wait", "--timeout=3m")
    print(f"\nhelm install --wait (defaults) took {time.monotonic() - started:.1f} s")
    return Release(RELEASE, RELEASE_NAMESPACE)


# --- the operator as a local process ----------------------------------------------------------------------------


def chart_admin_commands() -> list[str]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    return list(values["redis"]["acl"]["adminCommands"])


@dataclass
class OperatorRedis:
    """A real redis-server with the chart's admin user: the operator gets exactly the allow-list the chart
    gives it (filtered to the commands this redis-server knows: Debian's 7.0 lacks ``client|setinfo``)."""

    server: RedisServer
    password: str = "admin-password-for-tests"

    def __post_init__(self) -> None:
        client = self.client()
        try:
            client.execute_command("ACL", "SETUSER", REDIS_ADMIN, "on", f">{self.password}", "resetchannels")
            client.execute_command("ACL", "SETUSER", REDIS_ADMIN, "~engram:*", "-@all")
            for command in chart_admin_commands():
                try:
                    client.execute_command("ACL", "SETUSER", REDIS_ADMIN, f"+{command}")
                except redis.ResponseError:
                    pass  # unknown to this server version
        finally:
            client.close()

    @property
    def url(self) -> str:
        return self.server.url

    def client(self) -> redis.Redis:
        """A client as the default (unrestricted) user, for the tests' own checks."""
        return redis.Redis(port=self.server.port, decode_responses=True)


@pytest.fixture(scope="module")
def operator_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorRedis]:
    server = RedisServer(tmp_path_factory.mktemp("operator-redis")).start()
    try:
        yield OperatorRedis(server)
    finally:
        server.stop()


@dataclass
class LocalOperator:
    """``kopf run`` of engram_operator.handlers with the chart's own arguments, as a local process that holds
    only a ServiceAccount token (its kubeconfig) and the admin Redis user's password."""

    kubeconfig: Path
    redis: OperatorRedis
    log_dir: Path
    repair_interval: float = 5.0
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    starts: int = 0
    logs: list[Path] = field(default_factory=list)

    def environment(self) -> dict[str, str]:
        # Nothing inherited that could point the operator elsewhere (ENGRAM_*, KUBERNETES_SERVICE_*).
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ENGRAM_", "KUBERNETES_"))}
        env |= {
            "KUBECONFIG": str(self.kubeconfig),
            "ENGRAM_REDIS_URL": self.redis.url,
            "ENGRAM_REDIS_USERNAME": REDIS_ADMIN,
            "ENGRAM_REDIS_PASSWORD": self.redis.password,
            "ENGRAM_REDIS_REPLICA_URLS": "",
            "ENGRAM_OPERATOR_REPAIR_INTERVAL_SECONDS": str(self.repair_interval),
            "PYTHONUNBUFFERED": "1",
        }
        return env

    def start(self) -> LocalOperator:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.port = free_port()
        self.starts += 1
        log = self.log_dir / f"operator-{self.starts}.log"
        self.logs.append(log)
        # The chart's container command (operator-deployment.yaml), the liveness endpoint on loopback.
        args = ["run", "--standalone", "--all-namespaces", "-m", "engram_operator.handlers"]
        args.append(f"--liveness=http://127.0.0.1:{self.port}/healthz")
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kopf", *args],
                env=self.environment(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # stopped with its whole process group
                cwd=ROOT,
            )
        wait_until("the operator's liveness endpoint", self._live, timeout=60)
        return self

    def _live(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the operator exited ({self.process.returncode}):\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=15)

    def kill(self) -> None:
        """SIGKILL, as an OOM kill or a node loss would: no clean-up handler runs."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        text = "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())


@pytest.fixture(scope="module")
def operator_kubeconfig(plane: ControlPlane, release: Release, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Credentials of the chart's operator ServiceAccount (from the defaults release), nothing more."""
    path = tmp_path_factory.mktemp("operator-sa") / "kubeconfig"
    return plane.service_account_kubeconfig(release.namespace, release.operator_service_account, path)


@pytest.fixture(scope="module")
def local_operator(
    operator_kubeconfig: Path, operator_redis: OperatorRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalOperator]:
    operator = LocalOperator(operator_kubeconfig, operator_redis, tmp_path_factory.mktemp("operator"))
    try:
        yield operator.start()
    finally:
        operator.stop()

"""The `helm test` hook's script, run for real against local stand-ins of the chat Service.

The script is taken from the rendered test Pod (what the cluster runs). Each stand-in is an HTTP server
that answers like the chat service with the echo model; one rotates between "pods" per connection like a
Service without affinity, one sticks to a pod, one forgets the history.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.deploy.conftest import ALL_VALUES, CI_VALUES, pod_spec, render


class FakeChatService(ThreadingHTTPServer):
    def __init__(self, pods: list[str], remember: bool = True, api_key: str | None = None) -> None:
        super().__init__(("127.0.0.1", 0), ChatHandler)
        self.pods, self.remember, self.api_key = pods, remember, api_key
        self.connections = 0
        self.previous: dict[str, str] = {}
        self.deleted: list[str] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ChatHandler(BaseHTTPRequestHandler):
    server: FakeChatService
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        with self.server.lock:  # a new connection goes to the next pod, as kube-proxy would send it
            self.pod = self.server.pods[self.server.connections % len(self.server.pods)]
            self.server.connections += 1

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def reply(self, status: int, body: dict[str, Any] | None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Served-By", f"{self.pod}:7")
        self.end_headers()
        self.wfile.write(data)

    def authorised(self) -> bool:
        if self.server.api_key and self.headers.get("Authorization") != f"Bearer {self.server.api_key}":
            self.reply(401, {"error": {"code": "unauthorized", "message": "bad key"}})
            return False
        return True

    def do_POST(self) -> None:
        if not self.authorised():
            return
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        session, message = request["session_id"], request["message"]
        previous = self.server.previous.get(session) if self.server.remember else None
        self.server.previous[session] = message
        text = f'You said before: "{previous}".' if previous else "This is our first exchange."
        self.reply(
            200,
            {
                "session_id": session,
                "turn_id": "t",
                "reply": text,
                "served_by": f"{self.pod}:7",
                "history": {"cache": "miss", "messages": 0},
            },
        )

    def do_DELETE(self) -> None:
        if self.authorised():
            self.server.deleted.append(self.path)
            self.reply(204, None)


def hook_script_and_env(values: Any = None, set_json: tuple[str, ...] = ()) -> tuple[str, dict[str, Any]]:
    rendered = render(*(values or ()), set_json=set_json)
    (pod,) = rendered.all("Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod_spec(pod)["containers"]
    assert container["command"] == ["python", "-c"]
    return container["args"][0], {item["name"]: item for item in container["env"]}


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[FakeChatService] = []

    def start(**kwargs: Any) -> FakeChatService:
        server = FakeChatService(**kwargs)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def run_hook(url: str, env: dict[str, Any], api_key: str = "", **overrides: str) -> subprocess.CompletedProcess[str]:
    script, _ = hook_script_and_env()
    environment = {
        "ENGRAM_TEST_URL": url,
        "ENGRAM_TEST_TURNS": env["ENGRAM_TEST_TURNS"]["value"],
        "ENGRAM_TEST_MIN_PODS": env["ENGRAM_TEST_MIN_PODS"]["value"],
        "ENGRAM_TEST_AUTH": env["ENGRAM_TEST_AUTH"]["value"],
        "ENGRAM_TEST_CHECK_RECALL": env["ENGRAM_TEST_CHECK_RECALL"]["value"],
        "ENGRAM_API_KEY": api_key,
        **overrides,
    }
    return subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=60, check=False
    )


def test_hook_passes_when_turns_rotate_over_pods_and_recall_the_previous_one(serve: Any) -> None:
    server = serve(pods=["engram-chat-a", "engram-chat-b", "engram-chat-c"], api_key="k1")
    _, env = hook_script_and_env()
    result = run_hook(server.url, env, api_key="k1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS: 12 turns" in result.stdout and "served by 3 pods" in result.stdout
    assert server.connections >= 12, "the hook reused connections"
    assert len(server.deleted) == 1 and server.deleted[0].startswith("/v1/sessions/helm-test-")


def test_hook_fails_when_one_pod_serves_everything(serve: Any) -> None:
    server = serve(pods=["engram-chat-a"], api_key="k1")
    _, env = hook_script_and_env()
    result = run_hook(server.url, env, api_key="k1")
    assert result.returncode == 1
    assert "only 1 pod(s) answered, expected at least 2" in result.stdout


def test_hook_fails_when_a_turn_forgets_the_previous_one(serve: Any) -> None:
    server = serve(pods=["engram-chat-a", "engram-chat-b"], remember=False, api_key="k1")
    _, env = hook_script_and_env()
    result = run_hook(server.url, env, api_key="k1")
    assert result.returncode == 1
    assert "did not recall the previous user message" in result.stdout


def test_hook_fails_clearly_without_an_api_key(serve: Any) -> None:
    server = serve(pods=["engram-chat-a", "engram-chat-b"], api_key="k1")
    _, env = hook_script_and_env()
    result = run_hook(server.url, env)
    assert result.returncode == 1
    assert "no API key was given" in result.stdout


def test_hook_reads_the_sample_tenants_key_and_targets_the_chat_service() -> None:
    kind_values = ALL_VALUES[-1]
    _, env = hook_script_and_env((kind_values,))
    assert env["ENGRAM_TEST_URL"]["value"] == "http://engram-chat.engram.svc:80"
    assert env["ENGRAM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "demo-engram", "key": "api-key"}
    assert env["ENGRAM_TEST_MIN_PODS"]["value"] == "2"
    external = next(path for path in CI_VALUES if path.name == "external-redis-values.yaml")
    _, env = hook_script_and_env((external,))
    assert env["ENGRAM_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "ci-tenant-engram"
    assert env["ENGRAM_TEST_CHECK_RECALL"]["value"] == "false"  # a real model does not quote verbatim


def test_hook_with_one_replica_expects_one_pod_and_without_auth_sends_no_key() -> None:
    _, env = hook_script_and_env(set_json=("chat.replicaCount=1", 'config.auth="disabled"'))
    assert env["ENGRAM_TEST_MIN_PODS"]["value"] == "1"
    assert "ENGRAM_API_KEY" not in env

"""The echo model's replies, and configuration errors reported before the service starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from llama_index.core.base.llms.types import ChatMessage, MessageRole

from engram.echo import echo_reply
from engram.llama_index import EchoLLM
from engram.policy import POLICY_FIELDS, PolicyField
from engram.server.auth import bearer_token
from engram.server.cli import load_settings
from engram.server.errors import Unauthorized
from engram.settings import Settings
from tests.server.support import REPO, service_env


def msg(role: str, content: str) -> ChatMessage:
    return ChatMessage(role=MessageRole(role), content=content)


def test_echo_quotes_the_previous_user_message_and_counts_earlier_messages() -> None:
    history = [msg("system", "be nice"), msg("user", "one"), msg("assistant", "ok"), msg("user", "two")]
    assert echo_reply(history) == 'You said before: "one". I was given 2 earlier messages.'
    assert echo_reply([msg("user", "hi")]) == "This is the start of our conversation. I was given 0 earlier messages."
    assert echo_reply([msg("assistant", "x"), msg("user", "y")]).endswith("I was given 1 earlier message.")


def test_echo_reply_is_cut_to_the_size_limit_with_a_marker() -> None:
    long = "é" * 40_000
    reply = echo_reply([msg("user", long), msg("assistant", "ok"), msg("user", "and?")], max_reply_bytes=1024)
    assert len(reply.encode("utf-8")) <= 1024
    assert "more bytes]" in reply and reply.endswith("I was given 2 earlier messages.")


async def test_echo_llm_streams_the_same_text_it_answers() -> None:
    llm = EchoLLM()
    messages = [msg("user", "first words"), msg("assistant", "ok"), msg("user", "next")]
    whole = (await llm.achat(messages)).message.content
    pieces = [r.delta async for r in await llm.astream_chat(messages)]
    assert "".join(p or "" for p in pieces) == whole and len(pieces) > 3


@pytest.mark.parametrize(
    ("header", "token"), [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Bearer egk_t.x", "egk_t.x")]
)
def test_bearer_token_is_read_from_the_authorization_header(header: str, token: str) -> None:
    assert bearer_token(header) == token


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer", "abc"])
def test_missing_or_other_authorization_is_refused(header: str | None) -> None:
    with pytest.raises(Unauthorized):
        bearer_token(header)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"ENGRAM_TOKEN_LIMIT": "lots"}, "ENGRAM_TOKEN_LIMIT: Input should be a valid integer"),
        ({"ENGRAM_AUTH": "sometimes"}, "ENGRAM_AUTH: Input should be 'required' or 'disabled'"),
        ({"ENGRAM_LLM": "openai-like"}, "ENGRAM_LLM=openai-like needs ENGRAM_LLM_BASE_URL and ENGRAM_LLM_MODEL"),
        ({"ENGRAM_NAMESPACE": "Bad Space"}, "ENGRAM_NAMESPACE"),
        (
            {"ENGRAM_REDIS_MODE": "cluster", "ENGRAM_REDIS_SENTINELS": "s0:26379"},
            "ENGRAM_REDIS_SENTINELS is set but ENGRAM_REDIS_MODE is cluster",
        ),
        (
            {"ENGRAM_REDIS_MODE": "cluster", "ENGRAM_REDIS_URL": "unix:///run/redis.sock"},
            "ENGRAM_REDIS_MODE=cluster needs ENGRAM_REDIS_URL=redis://<seed host>:<port>",
        ),
        ({"ENGRAM_REDIS_MODE": "mesh"}, "ENGRAM_REDIS_MODE: Input should be 'standalone', 'sentinel' or 'cluster'"),
        ({"ENGRAM_REDIS_MODE": "sentinel"}, "ENGRAM_REDIS_MODE=sentinel needs ENGRAM_REDIS_SENTINELS"),
        (
            {"ENGRAM_REDIS_MODE": "sentinel", "ENGRAM_REDIS_SENTINELS": "s0:26379,s1"},
            "ENGRAM_REDIS_SENTINELS: Value error, 's1' is not host:port",
        ),
        (
            {"ENGRAM_REDIS_MODE": "sentinel", "ENGRAM_REDIS_SENTINELS": "s0:263790"},
            "ENGRAM_REDIS_SENTINELS: Value error, 's0:263790' is not host:port",
        ),
        ({"ENGRAM_REDIS_SENTINELS": "s0:26379"}, "ENGRAM_REDIS_SENTINELS is set but ENGRAM_REDIS_MODE is standalone"),
        (
            {"ENGRAM_COMMIT_DURABILITY": "eventually"},
            "ENGRAM_COMMIT_DURABILITY: Input should be 'local' or 'replicated'",
        ),
        (
            {"ENGRAM_COMMIT_DURABILITY": "replicated", "ENGRAM_COMMIT_REPLICA_TIMEOUT_MS": "6000"},
            "ENGRAM_COMMIT_REPLICA_TIMEOUT_MS (6000) must be below ENGRAM_REDIS_SOCKET_TIMEOUT",
        ),
    ],
)
def test_invalid_configuration_fails_at_start_with_a_clear_message(env: dict[str, str], expected: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "engram.server", "serve", "--port", "1"],
        env=service_env("redis://127.0.0.1:1/0", **env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2
    assert "invalid configuration" in run.stderr and expected in run.stderr
    assert "Traceback" not in run.stderr


SETTINGS_OUT_OF_BOUNDS = [
    pytest.param(field, value, bound, id=f"{field.env_name}={value}")
    for field in POLICY_FIELDS
    for value, bound in (
        (field.minimum - 1, f"greater than or equal to {field.minimum}"),
        (field.maximum + 1, f"less than or equal to {field.maximum}"),
    )
]


@pytest.mark.parametrize(("field", "value", "bound"), SETTINGS_OUT_OF_BOUNDS)
def test_settings_refuse_a_policy_default_out_of_bounds_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], field: PolicyField, value: int, bound: str
) -> None:
    for name in [name for name in os.environ if name.startswith("ENGRAM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv(field.env_name, str(value))
    with pytest.raises(SystemExit) as exited:
        load_settings()
    assert exited.value.code == 2
    assert f"{field.env_name}: Input should be {bound} (got '{value}')" in capsys.readouterr().err


def test_settings_defaults_are_the_policy_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("ENGRAM_")]:
        monkeypatch.delenv(name)
    settings = Settings()
    assert {f.name: getattr(settings, f.name) for f in POLICY_FIELDS} == {f.name: f.default for f in POLICY_FIELDS}

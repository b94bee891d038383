"""``bench/record.py`` in a real temporary git repository: a clean tree is recorded with its commit;
uncommitted changes to tracked files (staged or not) are refused with the changed paths and nothing
is written; ``--allow-dirty`` records and says so in the file; untracked files do not count."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.paths import ROOT

BENCH = "import sys; print('RESULT x=1.5'); sys.exit(3)"


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository holding a copy of bench/record.py and one tracked file, committed."""
    (tmp_path / "bench").mkdir()
    shutil.copy(ROOT / "bench" / "record.py", tmp_path / "bench" / "record.py")
    (tmp_path / "tracked.txt").write_text("one\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "bench/record.py", "tracked.txt")
    _git(tmp_path, "commit", "-q", "-m", "start")
    return tmp_path


def _record(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "bench/record.py", *args, "--", sys.executable, "-c", BENCH],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )


def _results(repo: Path) -> list[Path]:
    return sorted((repo / "bench" / "results").glob("*.txt")) if (repo / "bench" / "results").exists() else []


def test_clean_tree_is_recorded_with_its_commit(repo: Path) -> None:
    (repo / "untracked.txt").write_text("not part of any commit\n")  # untracked: does not count
    done = _record(repo, "demo")
    assert done.returncode == 3, done.stderr  # the benchmark's own exit status
    [out] = _results(repo)
    text = out.read_text()
    head = _git(repo, "rev-parse", "HEAD")
    assert f"# commit: {head}\n" in text
    assert "RESULT x=1.5" in text and "# exit status: 3" in text


@pytest.mark.parametrize("stage", [False, True], ids=["unstaged", "staged"])
def test_uncommitted_tracked_change_is_refused(repo: Path, stage: bool) -> None:
    (repo / "tracked.txt").write_text("two\n")
    if stage:
        _git(repo, "add", "tracked.txt")
    done = _record(repo, "demo")
    assert done.returncode == 2
    assert "refusing to record from a tree with uncommitted changes" in done.stderr
    assert "tracked.txt" in done.stderr and "--allow-dirty" in done.stderr
    assert _results(repo) == []  # nothing written


def test_allow_dirty_records_and_says_so(repo: Path) -> None:
    (repo / "tracked.txt").write_text("two\n")
    done = _record(repo, "--allow-dirty", "demo")
    assert done.returncode == 3, done.stderr
    [out] = _results(repo)
    head = _git(repo, "rev-parse", "HEAD")
    commit = next(line for line in out.read_text().splitlines() if line.startswith("# commit:"))
    assert commit == f"# commit: {head} (with uncommitted changes, recorded with --allow-dirty: tracked.txt)"


def test_no_commit_to_name_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bench").mkdir()
    shutil.copy(ROOT / "bench" / "record.py", tmp_path / "bench" / "record.py")
    _git(tmp_path, "init", "-q")  # a repository without a commit
    done = _record(tmp_path, "demo")
    assert done.returncode == 2
    assert "no commit to name" in done.stderr
    assert _results(tmp_path) == []


def test_command_is_required(repo: Path) -> None:
    done = subprocess.run(
        [sys.executable, "bench/record.py", "demo"], cwd=repo, capture_output=True, text=True, check=False
    )
    assert done.returncode == 2 and "after --" in done.stderr

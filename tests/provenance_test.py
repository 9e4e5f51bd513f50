"""Tests of cdjax.provenance: the commit, machine and library versions that results files record."""
import os
import platform
import subprocess

import jax

from cdjax import provenance


def test_git_commit_names_the_checkout_and_its_changes(tmp_path, monkeypatch):
  assert provenance.git_commit() != "unknown"   # the code under test is a checkout
  repo = tmp_path / "repo"
  repo.mkdir()
  git = lambda *args: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                                     cwd=repo, check=True, capture_output=True, text=True).stdout
  git("init", "-q")
  (repo / "pkg").mkdir()
  (repo / "experiments" / "results").mkdir(parents=True)
  for name in ("a.py", "pkg/b.py", "experiments/results/bench.json"):
    (repo / name).write_text("x = 1\n")
  git("add", ".")
  git("commit", "-q", "-m", "first")
  head = git("rev-parse", "--short", "HEAD").strip()
  (repo / "untracked.txt").write_text("not code\n")
  assert provenance.git_commit(str(repo)) == head   # untracked files are not changes
  (repo / "experiments/results/bench.json").write_text("x = 2\n")
  assert provenance.git_commit(str(repo)) == head   # nor results files the scripts rewrite
  (repo / "a.py").write_text("x = 2\n")   # a change outside the package's own folder counts
  assert provenance.git_commit(str(repo / "pkg")) == head + "+changes"
  outside = tmp_path / "outside"
  outside.mkdir()
  monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
  assert provenance.git_commit(str(outside)) == "unknown"


def test_machine_names_cores_and_memory():
  text = provenance.machine()
  assert f"{os.cpu_count()} cores" in text and " GiB, " in text


def test_software_names_the_running_versions_and_leaves_out_what_is_not_installed():
  text = provenance.software(("jax", "no-such-package-cdjax"))
  assert text == f"Python {platform.python_version()}; jax {jax.__version__}"

"""Tests of cdjax.provenance: the commit, machine and library versions that results files record."""
import os
import platform
import subprocess
import types

import jax
import pytest

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
  assert provenance.git_commit(str(repo / "pkg")) == head   # from the package's folder as well
  (repo / "a.py").write_text("x = 2\n")   # a change outside the package's own folder counts
  assert provenance.git_commit(str(repo / "pkg")) == head + "+changes"
  outside = tmp_path / "outside"
  outside.mkdir()
  monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
  assert provenance.git_commit(str(outside)) == "unknown"


def test_machine_names_cores_and_memory():
  text = provenance.machine()
  assert f"{os.cpu_count()} cores" in text and " GiB, " in text
  if os.path.exists("/proc/meminfo"):   # the kernel's total, in kB: the same count of pages
    with open("/proc/meminfo") as f:
      kb = next(int(l.split()[1]) for l in f if l.startswith("MemTotal:"))
    assert f", {kb / 2**20:.0f} GiB, " in text


@pytest.mark.parametrize("flags, isa", [("fpu sse2 avx2 avx512f amx_tile", "AVX-512 + AMX"),
                                        ("fpu sse2 avx avx2", "AVX2"), ("fpu sse2", "SSE")])
def test_machine_names_the_cpu_model_and_its_widest_vector_isa(monkeypatch, flags, isa):
  info = {"model name": "AMD EPYC 9554", "cpu family": "25", "model": "17", "flags": flags}
  monkeypatch.setattr(provenance, "cpuinfo", lambda: info)
  assert provenance.machine().startswith(
      f"AMD EPYC 9554 (family 25 model 17, {isa}), {os.cpu_count()} cores, ")
  del info["model"]   # no family / model numbers without both
  assert provenance.machine().startswith(f"AMD EPYC 9554 ({isa}), ")


def test_machine_names_the_accelerators_off_the_cpu(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  h100 = types.SimpleNamespace(device_kind="NVIDIA H100")
  monkeypatch.setattr(jax, "devices", lambda: [h100] * 2)
  text = provenance.machine()
  host = text.split("; host: ")[1]
  assert text == f"2 x NVIDIA H100 (gpu); host: {host}" and f"{os.cpu_count()} cores" in host


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="no /proc/cpuinfo")
def test_cpuinfo_fields_are_stripped():
  info = provenance.cpuinfo()
  assert "processor" in info and info["processor"].isdigit()
  assert all(k == k.strip() and v == v.strip() for k, v in info.items())


def test_software_names_the_running_versions_and_leaves_out_what_is_not_installed():
  text = provenance.software(("jax", "no-such-package-cdjax"))
  assert text == f"Python {platform.python_version()}; jax {jax.__version__}"

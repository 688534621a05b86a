"""Checks that compile the real kernels for an H100 (sm_90) on this CPU, each in a process without the
interpreter (``kernels.offline`` stands in for the CUDA driver)."""

import ctypes.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def offline(*command: str, **env: str) -> subprocess.CompletedProcess:
    """``python COMMAND...`` from the repository root, without ``TRITON_INTERPRET``, with ``env`` added."""
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *command], cwd=ROOT, env={**environment, **env}, capture_output=True,
                          text=True, timeout=240)


def run_offline(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """One of this folder's check scripts, which must succeed."""
    done = offline(str(ROOT / "tests" / "kernels" / script), *args, **env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def test_every_kernel_compiles_for_sm90():
    """The interpreter skips the compiler: build every launch's real kernel for an H100, no GPU needed."""
    run_offline("kernel_compile_check.py")


def test_kernels_compile_for_programmatic_dependent_launch():
    """``MAAS_PDL=on``: the kernels a MiniLM forward launches come out built to overlap the kernel before them."""
    done = run_offline("kernel_compile_check.py", "--pdl")
    assert "11 kernels compiled for programmatic dependent launch, 0 failure(s)" in done.stdout, done.stdout


def test_configs_precompile_in_parallel_under_the_keys_timing_looks_up():
    """The autotuner's precompile through Triton's real JIT: see ``autotune_check.py`` for what it checks."""
    done = run_offline("autotune_check.py")
    assert [line[:4] for line in done.stdout.splitlines()] == ["ok  "] * 28, done.stdout


def test_worker_processes_do_not_run_the_callers_script_again():
    """A script without a main guard compiles ahead in worker processes once: its line printed once, by itself,
    every binary compiled in a worker."""
    done = run_offline("unguarded_compile_check.py")
    lines = done.stdout.splitlines()
    assert len(lines) == 1, lines
    # A worker runs ``python -m kernels._compile_workers``: the package must not import that module first, or
    # it runs twice in every worker (runpy warns).
    assert "found in sys.modules" not in done.stderr, done.stderr[-2000:]
    binaries, in_processes = int(lines[0].split()[1]), int(lines[0].split()[3])
    assert binaries >= 1 and in_processes == binaries, lines


def cubins(cache: Path) -> dict[str, bytes]:
    """The binaries in a Triton cache, by path under it (the folder is the cache key)."""
    return {str(p.relative_to(cache)): p.read_bytes() for p in cache.glob("*/*.cubin")}


def test_recorded_binaries_precompile_elsewhere_into_the_same_cache_entries(tmp_path):
    """What ``maas models tune`` records, ``maas models precompile`` compiles in another process and cache: the same
    binaries under the same cache keys, which is what a GPU worker looks up; every kind of kernel launch, TMA
    descriptors included. See ``precompile_check.py``."""
    table, recorded, precompiled = tmp_path / "table.json", tmp_path / "recorded", tmp_path / "precompiled"
    done = run_offline("precompile_check.py", str(table), TRITON_CACHE_DIR=str(recorded))
    *checks, last = done.stdout.splitlines()
    assert [line[:4] for line in checks] == ["ok  "] * 7, done.stdout
    binaries = int(last.removeprefix("binaries "))
    assert binaries > 20 and len(cubins(recorded)) == binaries

    def precompile(table: Path, cache: Path) -> subprocess.CompletedProcess:
        return offline("-m", "pipeline", "models", "precompile", "--table", str(table), "--cache-dir", str(cache),
                       "--threads", "2")

    first = precompile(table, precompiled)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"compiled {binaries} binaries" in first.stdout and "0 failed" in first.stdout, first.stdout
    assert cubins(precompiled) == cubins(recorded)
    # The launchers and launch helpers link against the driver's libcuda.so.1: built where it is, else said why not.
    if ctypes.util.find_library("cuda"):
        assert "launchers: " in first.stdout and list(precompiled.glob("*/*.so")), first.stdout
    else:
        assert "launchers not built (AssertionError: libcuda.so cannot found!): workers build them" in first.stdout, \
            first.stdout
        assert not list(precompiled.glob("*/*.so"))
    again = precompile(table, precompiled)
    assert "compiled 0 binaries" in again.stdout and f"{binaries} were in the cache already" in again.stdout, \
        again.stdout

    entries = json.loads(table.read_text())
    first_three, target = entries["binaries"][:3], entries["binaries"][0]["target"]
    untargeted = json.loads(first_three[0]["specialization"])
    del untargeted["target"]  # as Tritons before 3.7 write it: the entry's target stands in, same binary
    # As recorded before the kernel gained its defaulted USE_PDL: that default stands in, same binary.
    older = json.loads(first_three[0]["specialization"])
    assert first_three[0]["kernel"] == "kernels.linear:_linear_kernel" and "USE_PDL" in older["signature"]
    position = list(older["signature"]).index("USE_PDL")
    del older["signature"]["USE_PDL"]
    kept = [(k, v) for k, v in zip(older["constant_keys"], older["constant_vals"], strict=True) if k != [position]]
    older["constant_keys"], older["constant_vals"] = [k for k, _ in kept], [v for _, v in kept]
    # Exported on a GPU machine whose Triton lies elsewhere: this install's libdevice stands in, same binary.
    moved = json.loads(first_three[0]["specialization"])
    moved["options"]["extern_libs"] = [["libdevice", "/elsewhere/triton/backends/nvidia/lib/libdevice.10.bc"]]
    gone = {"kernel": "kernels.linear:_gone", "target": target, "specialization": "{}"}
    entries["binaries"] = [first_three[0], gone, "not a binary", *first_three[1:],
                           {**first_three[0], "specialization": json.dumps(untargeted)},
                           {**first_three[0], "specialization": json.dumps(older)},
                           {**first_three[0], "specialization": json.dumps(moved)}]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(entries))
    partial = precompile(broken, tmp_path / "partial")
    assert partial.returncode == 1, partial.stdout + partial.stderr
    assert "compiled 3 binaries" in partial.stdout and "2 failed" in partial.stdout, partial.stdout
    failures = partial.stderr.strip().splitlines()
    assert len(failures) == 2, partial.stderr
    assert failures[0].startswith("maas: failed: binary 1 (kernels.linear:_gone): AttributeError"), failures
    assert failures[1].startswith("maas: failed: binary 2: expected {'kernel', 'target'"), failures
    assert cubins(tmp_path / "partial").items() <= cubins(recorded).items()


@pytest.mark.parametrize("table", sorted((ROOT / "kernels" / "tuned").glob("*.json")), ids=lambda p: p.name)
def test_a_shipped_tuning_table_precompiles_here(tmp_path, table):
    """Every binary a shipped table lists compiles on this CPU, as ``maas models precompile`` does in a worker's
    image build: a table whose entries the kernels' current signatures refuse, or that names the exporting
    machine's paths, fails here rather than there."""
    done = offline("-m", "pipeline", "models", "precompile", "--table", str(table), "--cache-dir", str(tmp_path),
                   "--threads", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    listed = len(json.loads(table.read_text())["binaries"])
    assert f"compiled {listed} binaries" in done.stdout and "0 failed" in done.stdout, done.stdout

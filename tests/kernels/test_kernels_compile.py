"""Checks that compile the real kernels for an H100 (sm_90) on this CPU, each in a process without the
interpreter (``kernels.offline`` stands in for the CUDA driver)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_offline(script: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "kernels" / script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def test_every_kernel_compiles_for_sm90():
    """The interpreter skips the compiler: build every launch's real kernel for an H100, no GPU needed."""
    run_offline("kernel_compile_check.py")


def test_configs_precompile_in_parallel_under_the_keys_timing_looks_up():
    """The autotuner's precompile through Triton's real JIT: see ``autotune_check.py`` for what it checks."""
    done = run_offline("autotune_check.py")
    assert [line[:4] for line in done.stdout.splitlines()] == ["ok  "] * 27, done.stdout


def test_worker_processes_do_not_run_the_callers_script_again():
    """A script without a main guard compiles ahead in worker processes once: its line printed once, by itself,
    every binary compiled in a worker."""
    lines = run_offline("unguarded_compile_check.py").stdout.splitlines()
    assert len(lines) == 1, lines
    binaries, in_processes = int(lines[0].split()[1]), int(lines[0].split()[3])
    assert binaries >= 1 and in_processes == binaries, lines

"""A script with no ``if __name__ == "__main__"`` guard, as users write them, compiling kernels ahead in
worker processes: ``multiprocessing`` workers would run this script again, each of them; the subprocess
workers of ``kernels._compile_workers`` must not. Must run *without* ``TRITON_INTERPRET``. Prints one line."""

import os
import tempfile

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="unguarded-check-")
os.environ["MAAS_COMPILE_WORKERS"] = "processes"

import shutil

import torch

from kernels import compile_only
from kernels.linear import linear_triton
from kernels.offline import compile_for

try:
    x, w = torch.zeros(8, 64, dtype=torch.bfloat16), torch.zeros(32, 64, dtype=torch.bfloat16)
    with compile_for(90), compile_only(2) as done:
        linear_triton(x, w, None, "relu")
    print(f"compiled {done.binaries} binaries, {done.in_processes} in worker processes, pid {os.getpid()}")
finally:
    shutil.rmtree(os.environ["TRITON_CACHE_DIR"], ignore_errors=True)

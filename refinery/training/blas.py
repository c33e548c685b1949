"""The fast path for MLX on a Linux CPU: an optimised BLAS in place of the reference one.

The `mlx[cpu]` wheel links netlib's *reference* BLAS (`mlx_cpu.libs/libblas-*.so.3`, ~4
GFLOP/s here); float32 matmuls — all of LoRA training and generation on CPU — go through it.
OpenBLAS (Debian's `libopenblas0-pthread`, which `make train` installs) or Intel's MKL (PyPI
`mkl`) export the same `cblas_*` symbols: preloaded, they answer mlx's calls instead (~190
GFLOP/s measured on this 2-core machine, ~45× faster).

A library can only be preloaded before the process starts, so the training and replay
commands re-execute themselves once with `LD_PRELOAD` set (`relaunch_env`). `REFINERY_BLAS`
names a library to use, or `none` to keep the bundled one. `probe_gflops` measures what is
active; a slow result is reported with the fix.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

#: Where an optimised BLAS with the standard cblas symbols is found, first match wins.
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    f"{sys.prefix}/lib/libmkl_rt.so.2",
)
#: Set in the re-executed process: which library was preloaded (and that it was, so no loop).
LOADED = "REFINERY_BLAS_LOADED"
#: Below this a matmul is taken for the reference BLAS (it gives ~4; OpenBLAS 80–190 here).
SLOW_GFLOPS = 20.0
#: The commands that run a model on the CPU.
MODEL_COMMANDS = ("train", "replay", "replay-eval")


def fast_blas(environ: Mapping[str, str], candidates: tuple[str, ...] = CANDIDATES) -> str | None:
    """The library to preload, or None (asked not to, or none on this machine)."""
    choice = environ.get("REFINERY_BLAS", "").strip()
    if choice.lower() == "none":
        return None
    if choice:
        return choice if Path(choice).is_file() else None
    return next((c for c in candidates if Path(c).is_file()), None)


def relaunch_env(argv: list[str], environ: Mapping[str, str], platform: str = sys.platform,
                 candidates: tuple[str, ...] = CANDIDATES) -> dict[str, str] | None:
    """The environment to re-execute `argv` with an optimised BLAS preloaded, or None when there
    is nothing to do (not Linux, not a model command, already done, or no library found)."""
    if not platform.startswith("linux") or environ.get(LOADED) is not None:
        return None
    if _command(argv) not in MODEL_COMMANDS:
        return None
    lib = fast_blas(environ, candidates)
    if lib is None:
        return None
    preload = environ.get("LD_PRELOAD", "")
    return {**environ, "LD_PRELOAD": f"{lib} {preload}".strip(), LOADED: lib}


def _command(argv: list[str]) -> str | None:
    """The command word of a refinery command line (after the global `-w DIR`, if any)."""
    args = iter(argv)
    for a in args:
        if a in ("-w", "--workspace"):
            next(args, None)
        elif not a.startswith("-"):
            return a
    return None


def relaunch_if_slow(argv: list[str]) -> None:
    """Replace this process with itself, an optimised BLAS preloaded, when there is one to use."""
    env = relaunch_env(argv, os.environ)
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)


def probe_gflops(size: int = 384, repeats: int = 4) -> float:
    """float32 matmul speed of the active BLAS, in GFLOP/s (a few milliseconds when it is fast)."""
    import mlx.core as mx

    a = mx.random.normal((size, size), key=mx.random.key(0))
    mx.eval(a @ a)
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ a)
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e9


def describe(gflops: float) -> str:
    """One line for the run's output: which BLAS, how fast, and the fix when it is slow."""
    lib = os.environ.get(LOADED)
    where = f"preloaded {lib}" if lib else "mlx's bundled BLAS"
    line = f"BLAS: {where}, {gflops:.0f} GFLOP/s"
    if sys.platform.startswith("linux") and gflops < SLOW_GFLOPS:
        line += (" — the reference BLAS: training will be ~20x slower than it needs to be; install OpenBLAS "
                 "(`sudo apt-get install libopenblas0-pthread`, which `make train` does) or `pip install mkl`, "
                 "or point REFINERY_BLAS at an optimised libblas")
    return line

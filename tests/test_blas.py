"""The optimised-BLAS fast path for training and replay on a Linux CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from refinery.training import blas


def test_model_commands_on_linux_are_relaunched_with_the_library_preloaded(tmp_path):
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"")
    env = blas.relaunch_env(["train", "run", "--workspace", "w"], {"LD_PRELOAD": "libx.so"}, "linux",
                            (str(lib),))
    assert env["LD_PRELOAD"] == f"{lib} libx.so" and env[blas.LOADED] == str(lib)
    assert blas.relaunch_env(["-w", "w", "replay", "--task", "x"], {}, "linux", (str(lib),))[blas.LOADED] == str(lib)


def test_nothing_is_relaunched_when_it_would_not_help_or_is_done(tmp_path):
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"")
    found = (str(lib),)
    assert blas.relaunch_env(["run-all"], {}, "linux", found) is None  # no model runs
    assert blas.relaunch_env(["train", "run"], {}, "darwin", found) is None  # Accelerate on macOS
    assert blas.relaunch_env(["train", "run"], {blas.LOADED: str(lib)}, "linux", found) is None  # no loop
    assert blas.relaunch_env(["train", "run"], {"REFINERY_BLAS": "none"}, "linux", found) is None
    assert blas.relaunch_env(["train", "run"], {}, "linux", (str(tmp_path / "missing.so"),)) is None


def test_refinery_blas_names_the_library(tmp_path):
    mine = tmp_path / "libmkl_rt.so.2"
    mine.write_bytes(b"")
    assert blas.fast_blas({"REFINERY_BLAS": str(mine)}, ()) == str(mine)
    assert blas.fast_blas({"REFINERY_BLAS": str(tmp_path / "nope.so")}, (str(mine),)) is None


def test_a_slow_blas_is_reported_with_the_fix(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv(blas.LOADED, raising=False)
    line = blas.describe(4.2)
    assert line.startswith("BLAS: mlx's bundled BLAS, 4 GFLOP/s") and "libopenblas0-pthread" in line
    monkeypatch.setenv(blas.LOADED, "/usr/lib/x86_64-linux-gnu/libopenblas.so.0")
    assert blas.describe(190.0) == "BLAS: preloaded /usr/lib/x86_64-linux-gnu/libopenblas.so.0, 190 GFLOP/s"


@pytest.mark.skipif(not (sys.platform.startswith("linux") and blas.fast_blas(os.environ)),
                    reason="no optimised BLAS on this machine")
def test_the_preloaded_blas_is_what_mlx_uses():
    pytest.importorskip("mlx.core")
    code = ("import os; from refinery.training import blas; "
            "print(os.environ.get(blas.LOADED, '-'), round(blas.probe_gflops()))")
    slow = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "REFINERY_BLAS": "none"}, check=True)
    env = blas.relaunch_env(["train"], os.environ)
    fast = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    lib, gflops = fast.stdout.split()
    assert lib == blas.fast_blas(os.environ) and float(gflops) > 2 * float(slow.stdout.split()[1])

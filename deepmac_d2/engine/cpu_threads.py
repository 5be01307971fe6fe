"""How this process's OpenMP threads wait for work, for logs and the speed table.

Our scripts (train_net.py, tools/demo.py, the benchmarks) set it before torch loads,
because libgomp reads ``OMP_WAIT_POLICY`` and ``GOMP_SPINCOUNT`` once, as it loads: a
spin of 1000 (about 10 us), then sleep. libgomp's default, a 3 ms spin, made CPU training
3x slower with more threads than free cores; sleeping at once costs about 100 us per op
where idle cores must be woken (README, "Speed against the reference").
"""
import os

__all__ = ["openmp_waiting"]


def openmp_waiting(environ=os.environ) -> str:
    """The waiting settings as the environment gives them to libgomp."""
    given = [f"{k}={environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in environ]
    return " ".join(given) or "OpenMP's defaults (libgomp: spin about 3 ms, then sleep)"

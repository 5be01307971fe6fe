"""keep_freed_memory: freed large blocks are reused, not faulted in again, and settings
the environment gives (glibc's defaults, say) stay. Page faults counted in a fresh
process, since malloc settings are per process."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 64 MB tensors (over glibc's largest mmap threshold; torch's CPU allocator is malloc,
# in 4 kB pages), each written in full, freed, 6 times; the minor faults of the last 4.
# Two rounds of warm-up: with the settings, the second block still lands on fresh pages
# in about a third of fresh processes (one block's 16384 faults, then none), the heap
# settling after start-up; the steady state after it is what training steps see.
PROBE = """
import json, os, resource, sys
sys.path.insert(0, {root!r})
import torch
from deepmac_d2.engine.cpu_memory import keep_freed_memory
settings = keep_freed_memory() if sys.argv[1] == "keep" else "not called"
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    block = torch.ones(16 * 2**20); del block
before = faults()
for _ in range(4):
    block = torch.ones(16 * 2**20); del block
print(json.dumps({{"settings": settings, "faults": faults() - before}}))
"""


def probe(mode, **env):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=ROOT), mode],
                         env=dict(environ, **env), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_blocks_are_reused_only_with_the_settings():
    pages = 4 * 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")  # 4 rounds of 64 MB
    default = probe("default")
    assert default["faults"] > 0.9 * pages  # every round faults its block in again
    kept = probe("keep")
    assert kept["settings"] == "MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776"
    assert kept["faults"] < 0.01 * pages
    glibc_defaults = {"MALLOC_MMAP_MAX_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
    opted_out = probe("keep", **glibc_defaults)
    assert opted_out["settings"] == "MALLOC_MMAP_MAX_=65536 MALLOC_TRIM_THRESHOLD_=131072"
    assert opted_out["faults"] > 0.9 * pages


def test_a_threshold_past_int_max_is_never_trim_not_zero(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 1

    import ctypes
    from deepmac_d2.engine import cpu_memory

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    assert cpu_memory.keep_freed_memory({}) == \
        "MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776"
    # Only what the environment leaves unset is set.
    cpu_memory.keep_freed_memory({"MALLOC_MMAP_MAX_": "65536"})
    # 2^40 does not fit mallopt's int: -1 (never trim), not wrapped to 0.
    assert calls == [(-4, 0), (-1, -1), (-1, -1)]

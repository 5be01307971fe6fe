"""What the process-wide CPU settings do for training here, each in a process of its own.

deepmac-d2 sets none of these: they belong to the user's process (an allocator
preloaded, OpenMP's waiting policy, glibc's malloc thresholds, PyTorch's CPU launcher),
and this table says what each bought on this machine. Every row runs
``benchmarks/speed.py`` (plain layers) in a child process with its environment; a
row whose library is not installed (jemalloc, tcmalloc: ``apt-get install
libjemalloc2 libtcmalloc-minimal4``) is reported as such.

    python benchmarks/cpu_settings.py --threads 2 --repeats 5
"""
import argparse
import glob
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = ["hg52_head forward+backward", "default_head forward+backward", "demo train step"]


def preload(pattern):
    found = sorted(glob.glob(pattern))
    return found[0] if found else None


def settings():
    """(name, extra environment or None when unavailable, launcher prefix)."""
    jemalloc = preload("/usr/lib/*/libjemalloc.so.2")
    tcmalloc = preload("/usr/lib/*/libtcmalloc_minimal.so.4")
    return [
        ("defaults", {}, []),
        ("OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=1000", {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"}, []),
        ("MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2^40",
         {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "1099511627776"}, []),
        ("LD_PRELOAD=jemalloc", jemalloc and {"LD_PRELOAD": jemalloc}, []),
        ("LD_PRELOAD=tcmalloc", tcmalloc and {"LD_PRELOAD": tcmalloc}, []),
        ("python -m torch.backends.xeon.run_cpu", {}, ["-m", "torch.backends.xeon.run_cpu"]),
    ]


def run(env, launcher, args):
    command = [sys.executable, *launcher, os.path.join(HERE, "speed.py"), "--variants", "plain", "--json",
               "--threads", str(args.threads), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
               "--cases", ",".join(CASES)]
    res = subprocess.run(command, env=dict(os.environ, **env), capture_output=True, text=True)
    if res.returncode != 0:
        return f"failed: {res.stderr.strip().splitlines()[-1][:100] if res.stderr.strip() else res.returncode}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    load = os.getloadavg()[0]
    rows = []
    for name, env, launcher in settings():
        result = "not installed" if env is None else run(env, launcher, args)
        rows.append((name, result))
        print(f"[cpu-settings] {name}: done", file=sys.stderr, flush=True)
    print(f"ms per call, median wall (median process CPU) of {args.repeats} runs after {args.warmup} warm-up, "
          f"{args.threads} threads, one process per row; load average {load:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after ({os.cpu_count()} CPUs)\n")
    print("| setting | " + " | ".join(CASES) + " |")
    print("|---|" + "---|" * len(CASES))
    for name, result in rows:
        if isinstance(result, str):
            print(f"| {name} | " + " | ".join([result] * len(CASES)) + " |")
            continue
        cells = []
        for case in CASES:
            wall, cpu = zip(*result[case]["plain"])
            cells.append(f"{1e3 * sorted(wall)[len(wall) // 2]:.0f} ({1e3 * sorted(cpu)[len(cpu) // 2]:.0f})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""A resumable grid of training runs, and the mean and spread of their results over seeds.

Each run is a separate process with its own output folder: a run's timing and results
then do not depend on what ran before it in the same process (allocator and thread-pool
state, caches warmed by an earlier model, a previous run's logging handlers), and an
interrupted grid leaves every finished run on disk. A run's folder holds ``spec.json``
(what it was asked to do) and, once finished, ``result.json``; a re-run of the grid
reuses a result whose spec is unchanged and redoes everything else. A run that fails
(a training that diverges, say) is recorded as failed and the grid goes on: one bad
cell should not cost the hour of runs after it. Its failure is reused like any result,
since the same spec fails the same way; delete its folder to try it again.
"""
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from argparse import Namespace
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import yaml

__all__ = ["GridRun", "RESULT_FILE", "SPEC_FILE", "WORKER_FILE", "aggregate", "json_safe",
           "mean_ci95", "mean_std", "run_grid", "spec_config", "t_quantile", "write_json"]

SPEC_FILE = "spec.json"
RESULT_FILE = "result.json"
# What the worker writes: its numbers; the runner adds the spec and the wall time.
WORKER_FILE = "worker_result.json"
CONSOLE_FILE = "console.txt"


@dataclass(frozen=True)
class GridRun:
    """One cell of the grid: ``name`` is its subfolder; ``spec`` (JSON-able) is what
    the worker needs, and what decides whether a stored result still applies."""

    name: str
    spec: Mapping


def json_safe(obj):
    """``obj`` with NaN and infinities as None: JSON has no NaN (Detectron2 reports NaN
    AP when there is nothing to evaluate), and strict parsers reject Python's ``NaN``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path, obj):
    """Write atomically: a grid killed mid-write leaves no half-written result to reuse."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(json_safe(obj), f, indent=2)
    os.replace(tmp, path)


def _stored_result(folder, spec):
    path = os.path.join(folder, RESULT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        result = json.load(f)
    # Compare on the JSON form: tuples come back as lists.
    return result if result["spec"] == json.loads(json.dumps(spec)) else None


def spec_config(cfg, folder: str) -> str:
    """The config text for a run's spec: ``cfg.dump()``, or the text already in
    ``folder``'s spec when that run was the same one.

    Same means: the stored text, loaded under today's defaults, dumps as ``cfg`` does. A
    config key added to the package since (with a default that changes nothing) then
    leaves finished runs reusable instead of retraining them; a changed value, or a key
    the package no longer has, does not.
    """
    from deepmac_d2.engine import load_config

    text = cfg.dump()
    try:
        with open(os.path.join(folder, SPEC_FILE)) as f:
            stored = json.load(f)["config"]
    except (OSError, KeyError, TypeError, ValueError):
        return text
    if stored == text:
        return text
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(stored)
        f.flush()
        try:
            again = load_config(Namespace(config_file=f.name, opts=[]))
        except (KeyError, ValueError, AssertionError):  # a key or value today's package rejects
            return text
    # As data: a dump's YAML anchors depend on which defaults share one list object.
    return stored if yaml.safe_load(again.dump()) == yaml.safe_load(text) else text


def _minutes(seconds):
    return f"{seconds / 60:.1f} min"


def _failure(console_path, returncode):
    """The last line a failed run printed (the exception, for a Python worker)."""
    with open(console_path) as f:
        lines = [line.strip() for line in f if line.strip()]
    return f"{lines[-1] if lines else 'no output'} (exit {returncode})"


def _outcome(result, describe):
    if result.get("failed"):
        return f"FAILED: {result['failed']}"
    return describe(result)


def run_grid(
    runs: Sequence[GridRun],
    root: str,
    worker_command: Callable[[str], List[str]],
    env: Optional[Mapping[str, str]] = None,
    describe: Callable[[Dict], str] = lambda result: "",
    log: Callable[[str], None] = print,
) -> List[Dict]:
    """Run (or reuse) every run in order; return their results, in the same order.

    ``worker_command(folder)`` is the command line of one run: it reads
    ``<folder>/spec.json`` and writes its numbers to ``<folder>/worker_result.json``;
    its output goes to ``<folder>/console.txt``. A result is ``{"spec", "wall_seconds",
    "metrics"}``, with ``metrics`` None and ``"failed"`` (the worker's last line and exit
    status) if the worker failed. After each run, one progress line: what finished,
    ``describe(result)`` or the failure,
    and the time left at the mean wall time of the runs finished so far (reused ones
    included, since their times are as good an estimate).
    """
    results, walls, start = [], [], time.perf_counter()
    for index, run in enumerate(runs, 1):
        folder = os.path.join(root, run.name)
        head = f"[grid {index}/{len(runs)}] {run.name}"
        result = _stored_result(folder, run.spec)
        if result is not None:
            retry = f"; delete {folder} to retry it" if result.get("failed") else ""
            log(f"{head}: reused ({_minutes(result['wall_seconds'])} when it ran) "
                f"{_outcome(result, describe)}{retry}")
        else:
            # A folder without a matching result is an interrupted or outdated run: restart
            # it clean (Detectron2 appends to metrics.json and would mix the two).
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            write_json(os.path.join(folder, SPEC_FILE), run.spec)
            log(f"{head}: running (log: {os.path.join(folder, CONSOLE_FILE)})")
            began = time.perf_counter()
            console_path = os.path.join(folder, CONSOLE_FILE)
            with open(console_path, "w") as console:
                proc = subprocess.run(worker_command(folder), stdout=console,
                                      stderr=subprocess.STDOUT, env=env)
            result = {"spec": json.loads(json.dumps(run.spec)),
                      "wall_seconds": time.perf_counter() - began, "metrics": None}
            if proc.returncode == 0:
                with open(os.path.join(folder, WORKER_FILE)) as f:
                    result["metrics"] = json.load(f)
            else:
                result["failed"] = _failure(console_path, proc.returncode)
            write_json(os.path.join(folder, RESULT_FILE), result)
            verb = "failed after" if result.get("failed") else "done in"
            log(f"{head}: {verb} {_minutes(result['wall_seconds'])} "
                f"{_outcome(result, describe)}")
        results.append(result)
        walls.append(result["wall_seconds"])
        left = len(runs) - index
        log(f"[grid] {index}/{len(runs)} finished, {_minutes(time.perf_counter() - start)} "
            f"elapsed; ETA {_minutes(left * float(np.mean(walls)))} for {left} more")
    return results


def mean_std(values: Sequence[float]):
    """Mean and sample standard deviation (n - 1) of one metric over seeds.

    A NaN value (a run with nothing to evaluate) makes both NaN rather than being
    skipped: a mean over the other seeds would hide that a run failed. The std of a
    single value is NaN: one seed says nothing about the spread.
    """
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean()) if v.size else float("nan")
    std = float(v.std(ddof=1)) if v.size > 1 else float("nan")
    return mean, std


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile, by bisection on its CDF (the density integrated with
    Simpson's rule): no SciPy in the environment, and a table would cap the df."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x):  # P(T <= x) for x >= 0
        t = np.linspace(0.0, x, 2001)
        f = np.exp(log_norm - (df + 1) / 2 * np.log1p(t * t / df))
        h = x / 2000
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_ci95(values_by_unit: Sequence[Sequence[float]]):
    """Mean and 95% interval of a metric measured ``values_by_unit[i][j]``: replicate j
    within independent unit i (e.g. head seeds trained on detector seed i).

    The replicates of one unit share that unit's draw, so they are not independent:
    the interval is Student-t on the unit means (df = units - 1), which covers both the
    between-unit and the within-unit noise (a balanced nested design's standard error).
    Returns ``(mean, (low, high))``; NaN bounds with fewer than 2 units.
    """
    unit_means = np.array([np.mean(v) for v in values_by_unit], dtype=np.float64)
    mean = float(unit_means.mean())
    if len(unit_means) < 2:
        return mean, (float("nan"), float("nan"))
    half = t_quantile(0.975, len(unit_means) - 1) * unit_means.std(ddof=1) / math.sqrt(len(unit_means))
    return mean, (mean - half, mean + half)


def aggregate(rows: Sequence[Mapping], keys: Sequence[str], metrics: Sequence[str]) -> List[Dict]:
    """Group ``rows`` by the values of ``keys`` (first-seen order) and reduce each metric.

    Returns one dict per group: the key values, ``"seeds"`` (rows in the group) and, per
    metric, ``{"mean": ..., "std": ..., "values": [...]}``.
    """
    groups: Dict[tuple, List[Mapping]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for key, members in groups.items():
        entry = dict(zip(keys, key), seeds=len(members))
        for m in metrics:
            values = [float("nan") if r[m] is None else float(r[m]) for r in members]
            mean, std = mean_std(values)
            entry[m] = {"mean": mean, "std": std, "values": values}
        out.append(entry)
    return out

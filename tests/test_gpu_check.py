"""benchmarks/gpu_check.py end to end on CPU (--quick), so that its first GPU run is not its first run."""
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")


@pytest.mark.slow
def test_gpu_check_runs_every_row_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.md"
    res = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--quick", "--output", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = out.read_text()
    assert table in res.stdout
    rows = [line.split(" | ") for line in table.strip().splitlines()]
    assert rows[0][0].startswith("| CPU") and rows[1] == ["|---|---|---|"]
    assert all(len(r) == 3 and "FAILED" not in r[1] for r in rows[2:])
    what = [r[0].strip("| ") for r in rows[2:]]
    assert what == (["CUDA-only tests"] + ["training"] * 4 + ["mask head fwd+bwd"] * 3
                    + ["masks for 10 boxes"] * 2 + ["head study"])
    assert "skipped" in rows[2][2]  # no CUDA here: pytest collected and skipped them
    training = {r[1]: r[2] for r in rows[3:7]}
    assert {k.split(",")[0] for k in training} == {"voc_r50_hg52", "mask_rcnn_R_50_FPN_3x (Detectron2)"}
    assert sum("AMP bf16" in k for k in training) == 2
    assert all(float(re.match(r"([\d.]+) images/s", v).group(1)) > 0 for v in training.values())
    assert re.match(r"[1-9]\d* head runs", rows[-1][2])


def test_gpu_check_without_cuda_says_how_to_run_it_on_cpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_check

    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cuda"])
    assert "sees no CUDA device; use --device cpu --quick" in capsys.readouterr().err

"""`make demo`'s script, end to end on a few images and 2 iterations (no quality check:
the numbers it prints at full size are in the README, with the command)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "demo.py")
METRICS = (
    "novel_mask_AP", "seen_mask_AP", "box_AP",
    "untrained_head_novel_mask_AP", "untrained_head_seen_mask_AP",
    "novel_mask_AP50", "untrained_head_novel_mask_AP50",
)


@pytest.mark.slow
def test_demo_writes_summary_and_pictures(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable, DEMO, "--data-root", str(tmp_path / "data"), "--num-train", "6",
        "--num-val", "3", "--output-dir", str(out), "--pictures", "2",
        "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    for key in METRICS:
        # null where a 2-iteration model predicts nothing; a percentage otherwise.
        assert summary[key] is None or 0.0 <= summary[key] <= 100.0, (key, summary[key])
    assert summary["iterations"] == 2 and summary["images_per_batch"] == 2
    assert (out / "inference_untrained_head").is_dir(), "the baseline evaluation wrote elsewhere"

    pictures = summary["pictures"]
    assert len(pictures) == 3 and pictures[-1] == str(out / "novel_masks.png")
    rows = [np.asarray(Image.open(p).convert("RGB")) for p in pictures[:2]]
    grid = np.asarray(Image.open(pictures[-1]).convert("RGB"))
    for row in rows:
        # ground truth | trained head | untrained head, each a 128-pixel image drawn at x3.
        assert row.shape[1] == 3 * 3 * 128
    assert grid.shape[1] == rows[0].shape[1] and grid.shape[0] > rows[0].shape[0]

    # Progress and the table on the terminal; the config and model dumps only in log.txt.
    assert "iter: 1" in res.stdout and "mask AP, novel classes" in res.stdout
    assert "Running with full config" not in res.stdout
    assert "Running with full config" in (out / "log.txt").read_text()

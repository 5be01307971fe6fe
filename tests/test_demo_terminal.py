"""What `make demo` shows on the terminal: its steps, progress and table; known-harmless
third-party warnings and pycocotools' prints in log.txt only, any other warning on screen."""
import contextlib
import importlib.util
import logging
import os
import subprocess
import sys
import warnings

import pytest

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "demo.py")


def load_demo():
    spec = importlib.util.spec_from_file_location("demo_script", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_demo_terminal_shows_progress_and_keeps_harmless_warnings_in_the_log(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run([
        sys.executable, DEMO, "--data-root", str(tmp_path / "data"), "--num-train", "6", "--num-val", "3",
        "--output-dir", str(out), "--pictures", "1",
        "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
    ], capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    screen = res.stdout + res.stderr
    log = (out / "log.txt").read_text()
    # These three are what Detectron2 v0.6 on this torch raises in a demo run.
    for text in ("`torch.jit.script` is deprecated", "The given NumPy array is not writable",
                 "torch.meshgrid: in an upcoming release", "No CUDA runtime is found"):
        assert text not in screen, text
        assert text in log, text
    assert "Warning" not in res.stderr, res.stderr[-2000:]
    for text in ("[demo] training 2 iterations", "iter: 1", "Start inference on 3 batches",
                 "[demo] drawing", "mask AP, novel classes"):
        assert text in res.stdout, text


def test_only_the_known_warnings_leave_the_terminal(capsys):
    demo = load_demo()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    demo.log.addHandler(handler)
    demo.log.setLevel(logging.INFO)  # as under setup_logger's "detectron2" logger in the demo
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    cpp_filters = list(cpp_logger.filters)
    try:
        with warnings.catch_warnings():  # restores showwarning and the filters
            warnings.simplefilter("always")
            shown = []  # what reaches the terminal: the showwarning route_warnings() finds
            warnings.showwarning = lambda *a, **k: shown.append(warnings.formatwarning(*a[:4]))
            demo.route_warnings()
            meshgrid = "torch.meshgrid: in an upcoming release, it will be required to pass the indexing argument."
            warnings.warn_explicit(meshgrid, UserWarning, "/venv/site-packages/torch/functional.py", 504)
            # The same words from another module, and another warning: both stay on screen.
            warnings.warn_explicit(meshgrid, UserWarning, "/home/me/my_module.py", 3)
            warnings.warn_explicit("a new problem", RuntimeWarning, "/venv/site-packages/torch/functional.py", 9)
            with contextlib.redirect_stdout(demo.LinesToLog()):
                print(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.123")
    finally:
        demo.log.removeHandler(handler)
        demo.log.setLevel(logging.NOTSET)
        cpp_logger.filters[:] = cpp_filters
    shown = "".join(shown)
    assert "my_module.py:3: UserWarning: torch.meshgrid" in shown
    assert "functional.py:9: RuntimeWarning: a new problem" in shown
    assert "functional.py:504" not in shown and "Average Precision" not in capsys.readouterr().out
    logged = [r.getMessage() for r in records]
    assert any("functional.py:504: UserWarning: torch.meshgrid" in m for m in logged), logged
    assert any(m.startswith(" Average Precision") and m.endswith("= 0.123") for m in logged), logged
    assert not any("my_module" in m or "a new problem" in m for m in logged)

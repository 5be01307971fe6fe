"""What the plugin's own scripts (the demo, the benchmarks) show on the terminal.

Detectron2's ``default_setup`` prints the environment, the config and the whole
model; a person running ``make demo`` wants the progress lines with their ETA
and any warning. Everything still goes to ``<output>/log.txt``.
"""
import argparse
import contextlib
import io
import logging
import sys

from deepmac_d2.engine import setup

# The loggers whose lines stay on the terminal: progress with ETA from training and
# inference, and the training speed; anything at WARNING or above from any logger.
TERMINAL_LOGGERS = (
    "detectron2.utils.events", "detectron2.engine.hooks", "detectron2.evaluation.evaluator",
)


def quiet_setup(args):
    """``setup`` with Detectron2's environment, config and model dumps kept in log.txt only.

    ``args`` needs ``config_file`` and ``opts``. Detectron2's terminal handler is
    created inside ``setup`` (bound to the stdout of the moment, here a sink); it is
    then pointed back at the terminal with a filter.
    """
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        cfg = setup(argparse.Namespace(config_file=args.config_file, opts=args.opts, accelerator=None))
    for h in logging.getLogger("detectron2").handlers:
        if getattr(h, "stream", None) is sink:
            h.setStream(sys.stdout)
            h.addFilter(_on_terminal)
    return cfg


def _on_terminal(record):
    return record.levelno >= logging.WARNING or record.name.startswith(TERMINAL_LOGGERS)


def metric(results, key, name="AP"):
    """``results[key][name]`` of Detectron2's evaluation results; NaN where the
    evaluator had no prediction to report it for."""
    return results.get(key, {}).get(name, float("nan"))

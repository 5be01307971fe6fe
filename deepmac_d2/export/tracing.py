"""Tracing the serving modules into TorchScript and ONNX files, with Detectron2's
``TracingAdapter`` (its ``len`` patch keeps box counts dynamic in the graph).

Scripting (Detectron2's ``scripting_with_instances``) is no option here: it needs a
scriptable model, and ``DeepMaskHead`` (which recurses on a lone training ROI) is not.
"""
import os
import sys
import types
import warnings

import torch
from torch import nn

import detectron2

__all__ = ["ONNX_OPSET", "trace", "export_torchscript", "export_onnx"]

# GridSample (the mask paste) and RoiAlign with half-pixel centres (Detectron2's aligned
# ROIAlign) need opset 16.
ONNX_OPSET = 17


def _import_tracing_adapter():
    """``detectron2.export.TracingAdapter``, also from Detectron2 v0.6 without Caffe2.

    v0.6's ``detectron2/export/__init__.py`` imports its Caffe2 exporter unconditionally,
    and torch 2 ships no ``caffe2``; Detectron2 main makes that import optional. On v0.6
    the package is set up as main's ``__init__`` does without Caffe2: ``TracingAdapter``,
    ``scripting_with_instances`` and ``dump_torchscript_IR``, from modules that need no
    Caffe2 (so ``from detectron2.export import TracingAdapter`` works elsewhere too).
    """
    try:
        from detectron2.export import TracingAdapter
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("caffe2"):
            raise
        package = types.ModuleType("detectron2.export")
        package.__path__ = [os.path.join(os.path.dirname(detectron2.__file__), "export")]
        sys.modules["detectron2.export"] = package
        from detectron2.export.flatten import TracingAdapter
        from detectron2.export.torchscript import dump_torchscript_IR, scripting_with_instances

        package.TracingAdapter = TracingAdapter
        package.scripting_with_instances = scripting_with_instances
        package.dump_torchscript_IR = dump_torchscript_IR
    return TracingAdapter


TracingAdapter = _import_tracing_adapter()


def _adapter(module: nn.Module, inputs):
    # eval(): a new adapter is in training mode, and torch.onnx.export restores the mode
    # it found, which would switch the model to training after the export.
    return TracingAdapter(module, tuple(inputs)).eval()


def trace(module: nn.Module, inputs):
    """Trace ``module`` on example ``inputs`` (a tuple of tensors). Any example does: the
    graph keeps image sizes and box counts dynamic (tests/test_export.py checks it)."""
    adapter = _adapter(module, inputs)
    with torch.no_grad(), warnings.catch_warnings():
        # Detectron2's shape asserts and constant branches warn when traced; expected.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)


def export_torchscript(module: nn.Module, inputs, path: str):
    """Trace ``module`` and save it; its parameters are saved without ``requires_grad``,
    so that the loaded graph's outputs are plain tensors (``.numpy()`` works)."""
    traced = trace(module, inputs)
    for p in traced.parameters():
        p.requires_grad_(False)
    traced.save(path)
    return traced


def export_onnx(module: nn.Module, inputs, path: str, input_names, output_names, dynamic_axes):
    """Trace ``module`` into an ONNX file with torch's TorchScript-based exporter
    (``dynamo=False``): the same trace as the TorchScript file, with dynamic axes. (The
    torch.export-based exporter, torch's default since 2.9, was not tried on Detectron2's
    data-dependent inference code.)"""
    adapter = _adapter(module, inputs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based")
        torch.onnx.export(adapter, adapter.flattened_inputs, path, dynamo=False,
                          opset_version=ONNX_OPSET, input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=dynamic_axes)

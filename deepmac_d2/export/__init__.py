"""Export for serving: a DeepMAC Mask R-CNN as TorchScript or ONNX files that run with
torch + torchvision, or onnxruntime, without Detectron2 or deepmac_d2.

Both graphs take a uint8 H x W x 3 image of any size, in ``INPUT.FORMAT`` channel order,
resize it inside as Detectron2 does (to Pillow's bytes), and answer at the image's size:

* :class:`DetectorExport`: image -> boxes, scores, classes, masks;
* :class:`BoxMaskExport`: image + boxes -> mask probabilities, the TF reference's
  ``image_and_boxes_tensor`` signature (``BoxMaskPredictor`` as a graph).

``tools/export_model.py`` writes the files; the README's "Export for serving" tells what
a serving machine needs. May import ``modeling`` (the BatchNorm folding).
"""
from .models import BoxMaskExport, DetectorExport
from .resize import resize_shortest_edge
from .tracing import ONNX_OPSET, export_onnx, export_torchscript, trace

__all__ = ["BoxMaskExport", "DetectorExport", "resize_shortest_edge", "ONNX_OPSET",
           "export_onnx", "export_torchscript", "trace"]

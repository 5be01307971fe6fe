"""deepmac-d2: DeepMAC's deep mask heads for Detectron2's Mask R-CNN.

``import deepmac_d2`` is the whole integration: it registers the mask heads,
the ROI heads and the datasets in Detectron2's registries and catalogs.

The subpackages, bottom up: ``compat`` (what a Detectron2 install may lack), ``data``,
``modeling`` (the core: heads, ROI heads, weak losses, fusion), ``evaluation``,
``export``, ``tf_port`` (the TF reference's networks, on top of ``modeling``) and
``engine`` (training, on top of the rest). Each imports only those below it.
``box_masks`` (masks for given boxes) sits beside ``modeling``.
"""
from .compat import install_c_fallback

# Before anything imports detectron2: its v0.6 sdist has no compiled _C.
install_c_fallback()

from .config import add_deepmac_config  # noqa: E402
from . import data, evaluation, modeling, tf_port  # noqa: E402,F401  (registration)

__version__ = "0.1.0"
__all__ = ["add_deepmac_config"]

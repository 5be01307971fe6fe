"""Mask heads (Hourglass network, DeepMaskHead) and the partially supervised ROIHeads."""

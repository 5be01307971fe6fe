"""Loading weights of the TF Model Garden reference into deepmac-d2's modules."""
from .convert import ConversionError, layers_in_call_order, load_reference_weights

__all__ = ["ConversionError", "layers_in_call_order", "load_reference_weights"]

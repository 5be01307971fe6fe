"""Weights of a TF Model Garden module into the deepmac-d2 module that ports it.

The ports build and call their layers in the reference's order (SpineNet, the
ResNet and FPN, the RPN and box heads, the hourglass, DeepMaskHead), and Keras creates a
layer's variables at its first call.
So the reference's variables in creation order, and our conv / BatchNorm layers in
the order a forward pass first runs them, pair up one to one: no table of names to
keep in sync with either code base. The pairing is checked, not assumed: every
variable is used exactly once, its kind (kernel, bias, gamma, ...) must be the one
the layer expects, and its shape must match after the layout change; anything else
raises :class:`ConversionError` naming both sides.
"""
import numpy as np
import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

__all__ = ["ConversionError", "layers_in_call_order", "load_reference_weights"]

_CONVS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
# FrozenBatchNorm2d: Detectron2's for a frozen backbone (FREEZE_AT, norm "FrozenBN"),
# the same four tensors.
_NORMS = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)


class ConversionError(ValueError):
    pass


def layers_in_call_order(module, *example_inputs):
    """The conv and BatchNorm layers of ``module`` in the order a forward pass first
    calls them (eval mode, no gradient); raises if one never runs."""
    layers = [m for m in module.modules() if isinstance(m, _CONVS + _NORMS)]
    order = []
    seen = set()

    def hook(layer, _inputs):
        if id(layer) not in seen:
            seen.add(id(layer))
            order.append(layer)

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            module(*example_inputs)
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    names = {id(m): n for n, m in module.named_modules()}
    unused = [names[id(m)] for m in layers if id(m) not in seen]
    if unused:
        raise ConversionError(f"layers that never run, so cannot be paired: {unused[:5]}")
    return [(names[id(m)], m) for m in order]


def _expected(layer):
    """(attribute, reference variable kind, TF -> torch layout) for each tensor of ``layer``."""
    if isinstance(layer, _NORMS):
        keep = lambda a: a  # noqa: E731
        return [
            ("weight", "gamma", keep), ("bias", "beta", keep),
            ("running_mean", "moving_mean", keep), ("running_var", "moving_variance", keep),
        ]
    # Conv2D kernel (kh, kw, in, out) -> (out, in, kh, kw); Conv2DTranspose kernel
    # (kh, kw, out, in) -> torch's (in, out, kh, kw): the same transpose; Dense (in, out).
    layout = (lambda a: a.T) if isinstance(layer, nn.Linear) else (lambda a: a.transpose(3, 2, 0, 1))
    tensors = [("weight", "kernel", layout)]
    if layer.bias is not None:
        tensors.append(("bias", "bias", lambda a: a))
    return tensors


def load_reference_weights(module, variables, example_inputs):
    """Copy the reference's ``variables`` into ``module``, in place.

    Args:
        module: a deepmac-d2 port (SpineNet, DeepMaskHead, HourglassNetwork, ...).
        variables: ``[(name, numpy array)]`` in the reference's creation order, e.g.
            Keras variables sorted by creation (``tools/tf_reference/parity_tf.py`` writes them so).
        example_inputs: inputs for one forward pass that fixes our layers' order.

    Returns:
        ``[(our tensor name, reference name)]``, the pairing used.
    """
    layers = layers_in_call_order(module, *example_inputs)
    pairs, i = [], 0
    for layer_name, layer in layers:
        for attr, kind, layout in _expected(layer):
            if i >= len(variables):
                raise ConversionError(
                    f"the reference has {len(variables)} variables; {layer_name}.{attr} has none left"
                )
            ref_name, array = variables[i]
            i += 1
            ref_kind = ref_name.split("/")[-1].split(":")[0]
            if ref_kind != kind:
                raise ConversionError(
                    f"{layer_name}.{attr} expects a {kind!r}, the reference's next variable is "
                    f"{ref_name!r}: the two call orders differ here"
                )
            target = getattr(layer, attr)
            value = torch.from_numpy(np.ascontiguousarray(layout(np.asarray(array))))
            if tuple(value.shape) != tuple(target.shape):
                raise ConversionError(
                    f"{layer_name}.{attr} has shape {tuple(target.shape)}, the reference's "
                    f"{ref_name!r} gives {tuple(value.shape)} (from {tuple(np.shape(array))})"
                )
            with torch.no_grad():
                target.copy_(value.to(target.dtype))
            pairs.append((f"{layer_name}.{attr}", ref_name))
    if i != len(variables):
        left = [name for name, _ in variables[i:i + 5]]
        raise ConversionError(
            f"{len(variables) - i} reference variables left unused (first: {left}): "
            "the port lacks layers the reference has"
        )
    return pairs

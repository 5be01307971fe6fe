"""The TF-reference weight converter (deepmac_d2.tf_port) on hand-built Keras-layout variables.

``make parity`` runs it on the reference's own modules (it needs .venv-tf); these
tests pin its rules without TensorFlow: Keras layouts, call order, every variable
used exactly once, kinds and shapes checked.
"""
import numpy as np
import pytest
import torch
from torch import nn

import deepmac_d2  # noqa: F401
from deepmac_d2.modeling import hourglass as hg
from deepmac_d2.tf_port import ConversionError, layers_in_call_order, load_reference_weights

# Float comparisons: make test runs these again on the AVX2 kernels.
pytestmark = pytest.mark.numeric


class Net(nn.Module):
    """Registers ``late`` first but calls it last, as our hourglass's encoder shortcut once did."""

    def __init__(self):
        super().__init__()
        self.late = nn.Conv2d(4, 2, 1, bias=False)
        self.conv = nn.Conv2d(3, 4, 1)
        self.norm = nn.BatchNorm2d(4)
        self.up = nn.ConvTranspose2d(4, 4, 2, 2)

    def forward(self, x):
        return self.late(self.up(self.norm(self.conv(x))))


def keras_variables(rng):
    """What Keras creates, in creation (= call) order, in its layouts."""
    return [
        ("conv2d/kernel:0", rng.standard_normal((1, 1, 3, 4))),  # (kh, kw, in, out)
        ("conv2d/bias:0", rng.standard_normal(4)),
        ("batch_normalization/gamma:0", rng.uniform(0.5, 1.5, 4)),
        ("batch_normalization/beta:0", rng.standard_normal(4)),
        ("batch_normalization/moving_mean:0", rng.standard_normal(4)),
        ("batch_normalization/moving_variance:0", rng.uniform(0.5, 1.5, 4)),
        ("conv2d_transpose/kernel:0", rng.standard_normal((2, 2, 4, 4))),  # (kh, kw, out, in)
        ("conv2d_transpose/bias:0", rng.standard_normal(4)),
        ("conv2d_1/kernel:0", rng.standard_normal((1, 1, 4, 2))),
    ]


def test_layouts_and_call_order_against_numpy():
    rng = np.random.default_rng(0)
    net, variables = Net().double(), keras_variables(rng)
    x = torch.from_numpy(rng.standard_normal((2, 3, 5, 5)))
    pairs = load_reference_weights(net, variables, (x,))
    assert [p[0] for p in pairs][:2] == ["conv.weight", "conv.bias"]
    assert pairs[-1] == ("late.weight", "conv2d_1/kernel:0")

    v = dict(variables)
    xn = x.numpy().transpose(0, 2, 3, 1)  # NHWC, as Keras computes
    y = xn @ v["conv2d/kernel:0"][0, 0] + v["conv2d/bias:0"]
    y = (y - v["batch_normalization/moving_mean:0"]) / np.sqrt(
        v["batch_normalization/moving_variance:0"] + net.norm.eps
    ) * v["batch_normalization/gamma:0"] + v["batch_normalization/beta:0"]
    # Transposed conv, kernel 2 stride 2: output pixel (2i + a, 2j + b) = y[i, j] @ K[a, b].T.
    k = v["conv2d_transpose/kernel:0"]
    up = np.zeros((2, 10, 10, 4))
    for a in range(2):
        for b in range(2):
            up[:, a::2, b::2] = y @ k[a, b].T
    up += v["conv2d_transpose/bias:0"]
    expected = up @ v["conv2d_1/kernel:0"][0, 0]
    with torch.no_grad():
        out = net.eval()(x).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)


def test_every_variable_used_exactly_once():
    rng = np.random.default_rng(0)
    x = torch.randn(1, 3, 4, 4).double()
    with pytest.raises(ConversionError, match="1 reference variables left unused"):
        load_reference_weights(Net().double(), keras_variables(rng) + [("extra/kernel:0", np.zeros(1))], (x,))
    with pytest.raises(ConversionError, match="has none left"):
        load_reference_weights(Net().double(), keras_variables(rng)[:-1], (x,))


def test_kind_and_shape_mismatches_name_both_sides():
    rng = np.random.default_rng(0)
    x = torch.randn(1, 3, 4, 4).double()
    swapped = keras_variables(rng)
    swapped[2], swapped[3] = swapped[3], swapped[2]
    with pytest.raises(ConversionError, match=r"norm.weight expects a 'gamma'.*batch_normalization/beta"):
        load_reference_weights(Net().double(), swapped, (x,))
    wrong = keras_variables(rng)
    wrong[0] = ("conv2d/kernel:0", np.zeros((3, 3, 3, 4)))
    with pytest.raises(ConversionError, match=r"conv.weight has shape \(4, 3, 1, 1\).*\(3, 3, 3, 4\)"):
        load_reference_weights(Net().double(), wrong, (x,))


def test_hourglass_calls_its_layers_in_the_reference_order():
    # The reference's EncoderDecoderBlock calls encoder_block1 (the shortcut) before
    # encoder_block2; the converter relies on our forward doing the same.
    net = hg.hourglass10(4, 2)
    names = [n for n, m in layers_in_call_order(net, torch.randn(2, 4, 8, 8)) if isinstance(m, nn.Conv2d)]
    level = "hourglasses.0."
    first_encoder1 = names.index(next(n for n in names if n.startswith(level + "encoder1")))
    first_encoder2 = names.index(next(n for n in names if n.startswith(level + "encoder2")))
    assert first_encoder1 < first_encoder2
    # Within a residual block: conv1, conv2, then the skip (the reference's call order).
    block = [n for n in names if n.startswith(level + "encoder2.0.")]
    assert block == [level + "encoder2.0.conv1.0", level + "encoder2.0.conv2.0", level + "encoder2.0.skip.0"]

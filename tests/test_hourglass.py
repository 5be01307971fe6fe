"""The Hourglass network against the TF Object Detection API's figures and hand-worked cases.

The figures come from building the TF reference (docs/reference/tf_mask_head_params.md):
Hourglass-52 with n = 64 on 256-channel ROI features; trainable = weights + BN gamma/beta.
"""
import math

import pytest
import torch
from torch import nn

import deepmac_d2  # noqa: F401  (installs the detectron2._C stand-in before detectron2 loads)
from deepmac_d2.modeling import hourglass as hg


def trainable(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def bn_statistics(module):
    stats = ("running_mean", "running_var")
    return sum(b.numel() for name, b in module.named_buffers() if name.endswith(stats))


def residual(c_in, c_out, skip):
    """Trainable size of a residual block: two 3x3 convs (no bias) + BN, optional 1x1 skip + BN."""
    convs = 9 * c_in * c_out + 9 * c_out * c_out + skip * c_in * c_out
    return convs + (2 + skip) * 2 * c_out


@pytest.fixture(scope="module")
def hg52():
    return hg.hourglass52(256, 64)


def test_hourglass52_parts_match_tf(hg52):
    # TF: input conv block 377,728; encoder-decoder 23,047,680; output conv block 147,712.
    assert trainable(hg52.input_block) == 377_728
    assert trainable(hg52.hourglasses[0]) == 23_047_680
    assert trainable(hg52.output_convs[0]) == 147_712
    assert trainable(hg52) == 377_728 + 23_047_680 + 147_712
    # TF non-trainable 29,440 for the head, minus the deconv BN's 2 x 64.
    assert bn_statistics(hg52) == 29_440 - 128
    # TF's 82 convolutions include the head's deconv and logits.
    assert sum(isinstance(m, nn.Conv2d) for m in hg52.modules()) == 82 - 2


def test_hourglass52_levels_match_tf(hg52):
    # TF per level (trainable): (encoder 1, encoder 2, decoder).
    tf_levels = [
        (590_848, 607_488, 590_848),
        (590_848, 1_243_008, 1_058_304),
        (1_328_640, 1_365_888, 1_328_640),
        (1_328_640, 1_365_888, 1_328_640),
        (1_328_640, 2_263_552, 2_005_120),
    ]
    level = hg52.hourglasses[0]
    for enc1, enc2, dec in tf_levels:
        parts = (level.encoder1, level.encoder2, level.decoder)
        assert tuple(map(trainable, parts)) == (enc1, enc2, dec)
        level = level.inner
    assert trainable(level) == 4_722_688  # the bottleneck


def test_ablation_variants_by_hand():
    n = 64
    full = trainable(hg.hourglass20(256, n))
    # No shortcut: hourglass20 minus its encoder-1 stacks, 1 + 2 residual blocks at 2n.
    assert trainable(hg.hourglass20_no_shortcut(256, n)) == full - 3 * residual(2 * n, 2 * n, False)
    # Uniform size: the level-0 stride-2 block (2n -> 2n) loses its 1x1 skip conv + BN.
    assert trainable(hg.hourglass20_uniform_size(256, n)) == full - (4 * n * n + 4 * n)


def test_uniform_size_keeps_resolution_everywhere():
    net = hg.hourglass20_uniform_size(8, 4).eval()
    sizes = []
    for conv in (m for m in net.modules() if isinstance(m, nn.Conv2d)):
        conv.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-2:]))
    net(torch.randn(1, 8, 6, 6))
    assert set(sizes) == {torch.Size([6, 6])}


@pytest.mark.parametrize(
    "builder", ["hourglass10", "hourglass20", "hourglass32", "hourglass52", "hourglass100",
                "hourglass20_uniform_size", "hourglass20_no_shortcut"]
)
@pytest.mark.parametrize("size", [32, 14, 5])
def test_any_input_size(builder, size):
    net = getattr(hg, builder)(16, 4).eval()
    with torch.no_grad():
        outputs = net(torch.randn(2, 16, size, size + 3))
    assert len(outputs) == 1
    assert outputs[0].shape == (2, 8, size, size + 3)


def test_hourglass104_two_stacks_stride_4():
    with torch.device("meta"):
        net = hg.hourglass104()
        outputs = net(torch.empty(2, 3, 128, 96))
    assert [o.shape for o in outputs] == [(2, 256, 32, 24)] * 2
    assert len(net.inter_residuals) == 1


def test_odd_level_matches_nearest_resize_to_skip():
    # Where the reference works (even sizes) nearest x2 is exact; for odd sizes, the
    # cut equals nearest-resizing the coarse map straight to the shortcut's size.
    coarse = torch.arange(16.0).reshape(1, 1, 4, 4)
    level = hg.EncoderDecoderBlock([1, 1], [1, 1], norm="")
    level.encoder1, level.inner, level.decoder = nn.Identity(), nn.Identity(), nn.Identity()
    level.encoder2 = nn.AvgPool2d(1, stride=2)  # 7x7 -> its 4x4 even positions
    x = torch.zeros(1, 1, 7, 7)
    x[..., ::2, ::2] = coarse
    expected = nn.functional.interpolate(coarse, size=(7, 7), mode="nearest")
    assert torch.equal(level(x) - x, expected)


def test_strided_1x1_skip_takes_even_positions():
    block = hg.ConvBlock(3, 3, kernel_size=1, stride=2, relu=False, norm="")
    with torch.no_grad():
        block[0].weight.copy_(torch.eye(3)[:, :, None, None])
    x = torch.randn(1, 3, 7, 6)
    assert torch.equal(block(x), x[..., ::2, ::2])


def test_residual_skip_only_where_needed():
    assert isinstance(hg.ResidualBlock(8, 8).skip, nn.Identity)
    assert not isinstance(hg.ResidualBlock(8, 8, stride=2).skip, nn.Identity)
    assert not isinstance(hg.ResidualBlock(8, 16).skip, nn.Identity)
    convs = [m for m in hg.ResidualBlock(8, 16).modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 and all(m.bias is None for m in convs)


def test_batchnorm_and_init_as_reference():
    net = hg.hourglass10(64, 64)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-5 and m.momentum == 0.9 for m in bns)
    for conv in (m for m in net.modules() if isinstance(m, nn.Conv2d)):
        fan_in, fan_out = conv.weight[0].numel(), conv.weight[:, 0].numel()
        bound = math.sqrt(6.0 / (fan_in + fan_out))  # glorot (xavier) uniform
        assert conv.weight.abs().max() <= bound
        if conv.weight.numel() > 10_000:
            assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


@pytest.mark.parametrize("norm", ["BN", "SyncBN", "FrozenBN", "GN", ""])
def test_gradients_reach_every_parameter(norm):
    net = hg.hourglass20(8, 32, norm=norm).train()  # n = 32: GN's 32 groups divide 2n and 3n
    net(torch.randn(3, 8, 12, 12))[-1].square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_empty_batch():
    net = hg.hourglass52(16, 4).train()
    x = torch.zeros(0, 16, 14, 14, requires_grad=True)
    out = net(x)[-1]
    assert out.shape == (0, 8, 14, 14)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_batchnorm_moving_variance_is_the_biased_batch_variance():
    """The reference's (synchronised, non-fused) BatchNorm moves towards the biased batch
    variance. At Hourglass-52's 1x1 bottleneck the batch is the ROIs: with 2 of them,
    PyTorch's unbiased variance would be twice as large."""
    net = hg.hourglass52(8, 4)
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is hg.KerasBatchNorm2d for m in norms)

    torch.manual_seed(0)
    block = hg.ConvBlock(3, 4, kernel_size=1).train()
    x = torch.randn(2, 3, 1, 1)
    y = block(x)
    z = block[0](x).detach().numpy()
    mean, var = z.mean(axis=(0, 2, 3)), z.var(axis=(0, 2, 3))  # numpy: ddof 0, biased
    bn = block[1]
    # Keras momentum 0.1: the moving average keeps 10% of its old value (0 and 1).
    torch.testing.assert_close(bn.running_mean, torch.from_numpy(0.9 * mean))
    torch.testing.assert_close(bn.running_var, torch.from_numpy(0.1 + 0.9 * var))
    # The normalisation itself is unchanged: batch statistics, biased, eps 1e-5.
    expected = (z - mean[:, None, None]) / (var[:, None, None] + 1e-5) ** 0.5
    torch.testing.assert_close(y, torch.from_numpy(expected).float().clamp(min=0), rtol=1e-4, atol=1e-5)
    y.sum().backward()  # the buffers' update leaves autograd's saved tensors alone
    assert block[0].weight.grad is not None

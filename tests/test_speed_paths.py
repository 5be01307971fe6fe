"""The CPU speed paths compute the layers' own function (README, "Speed against the reference").

- Inference of the mask heads folds each BatchNorm into its conv and runs conv, ReLU
  and the residual add as one oneDNN op (``NormFolding``, as SpineNet's): the hourglass
  blocks, the default head's convs, the deconv. The same outputs as the layers one by
  one (autograd on), up to float rounding.
- SpineNet trains channels-last on the CPU in float32: the same outputs and gradients
  as NCHW (oneDNN disabled, PyTorch's own kernels).
- DeepMaskHead's last layers on the CPU, on the deconv's output tiles (``_TransposedConv``,
  a 1x1 conv's forward and backward), give the modules' outputs and gradients, and its
  BatchNorm, ReLU and one-channel predictor in training (``_BatchNormReLULogit``, one
  BatchNorm backward) the layers' gradients and moving statistics.
"""
import pytest
import torch
from torch import nn

from detectron2.layers import ShapeSpec
from deepmac_d2.modeling import cpu_mask_logits
from deepmac_d2.modeling import hourglass as hg
from deepmac_d2.modeling.folded_conv_norm import NormFolding
from deepmac_d2.modeling.mask_head import DeepMaskHead
from deepmac_d2.modeling.spinenet import SpineNet
from deepmac_d2.modeling.spinenet import bottleneck_block


def randomise_norms(model, seed=0):
    """Moving statistics and affine parameters away from 0 / 1, so folding them matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for t, (lo, hi) in ((m.running_mean, (-1, 1)), (m.running_var, (0.5, 2)),
                                    (m.weight, (0.5, 1.5)), (m.bias, (-0.5, 0.5))):
                    t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
    return model


def mask_head(variant="hourglass20", filters=8, norm="BN"):
    head = DeepMaskHead(ShapeSpec(channels=16), num_classes=1, convnet_variant=variant,
                        num_filters=filters, norm=norm)
    return randomise_norms(head).eval()


def assert_same_function(fn, x, rtol):
    """``fn`` for inference (no autograd: the folded path) against the layers one by one
    (autograd on, eval mode)."""
    layered = fn(x)
    with torch.no_grad():
        fast = fn(x)
    with torch.inference_mode():
        fast_inference_mode = fn(x)
    scale = layered.abs().max()
    assert (fast - layered).abs().max() <= rtol * scale
    assert (fast_inference_mode - layered).abs().max() <= rtol * scale


@pytest.mark.parametrize("variant, norm", [("hourglass10", "BN"), ("hourglass20", "BN"),
                                           ("hourglass52", "BN"), ("default", "BN"), ("default", "")])
def test_head_inference_is_the_layers_function(variant, norm):
    head = mask_head(variant, norm=norm)
    for rois, size in [(3, 32), (1, 14), (2, 17)]:  # ROI counts vary; odd sizes cut the decoder
        x = torch.randn(rois, 16, size, size)
        assert_same_function(head.layers, x, rtol=1e-5)
        with torch.backends.mkldnn.flags(enabled=False):  # folded, plain F.conv2d
            assert_same_function(head.layers, x, rtol=1e-5)
    head.double()
    assert_same_function(head.layers, torch.randn(3, 16, 32, 32, dtype=torch.float64), rtol=1e-12)


def test_head_inference_folds_every_norm(monkeypatch):
    # No BatchNorm runs in inference (every one is folded into its conv); in training, all
    # (the deconv's through native_batch_norm, see cpu_mask_logits.py).
    calls = []
    for name in ("batch_norm", "native_batch_norm"):
        op = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, op=op, **k: calls.append(1) or op(*a, **k))
    for variant in ("hourglass20", "default"):
        head = mask_head(variant)
        norms = [m for m in head.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        with torch.no_grad():
            head.layers(torch.randn(2, 16, 16, 16))
        assert calls == []
        head.train().layers(torch.randn(2, 16, 16, 16))
        assert len(calls) == len(norms) > 0
        calls.clear()


def test_folded_weights_kept_across_eval_and_renewed_on_change():
    head = mask_head()
    x = torch.randn(2, 16, 16, 16)
    folding = [m for m in head.modules() if isinstance(m, NormFolding)]
    assert head in folding  # the deconv's
    with torch.no_grad():
        head.eval().layers(x)
        folded = [dict(m._folded) for m in folding]
        head.eval().layers(x)  # eval() again: nothing changed, nothing made again
        assert all(m._folded == f and all(m._folded[k] is f[k] for k in f) for m, f in zip(folding, folded))
    norm = next(m for m in head.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    with torch.no_grad():
        norm.running_mean.add_(1.0)  # in place, as training updates it
    assert_same_function(head.layers, x, rtol=1e-5)
    with torch.no_grad():
        head.deconv_norm.weight.mul_(2.0)
    assert_same_function(head.layers, x, rtol=1e-5)
    head.train()
    assert all(m._folded == {} for m in folding)


def test_hooks_see_the_reference_call_order_and_unchanged_outputs():
    # The weight converter pairs layers with the reference's by forward hooks, in call
    # order (conv1, conv2, then the projection shortcut); a hook sees the layers run.
    block = randomise_norms(hg.ResidualBlock(8, 16, stride=2)).eval()
    order, kept = [], {}
    for name in ("conv1", "conv2", "skip"):
        getattr(block, name)[0].register_forward_pre_hook(lambda m, i, name=name: order.append(name))
    block.skip.register_forward_hook(lambda m, i, out: kept.update(skip=(out, out.clone())))
    with torch.no_grad():
        block(torch.randn(2, 8, 8, 8))
    assert order == ["conv1", "conv2", "skip"]
    out, copy = kept["skip"]
    assert torch.equal(out, copy)  # not overwritten by the residual add


def _forward_backward(fn, x, model=None):
    """Outputs, gradients (of ``model``'s parameters and of ``x`` if it requires one) and
    moving statistics of one forward+backward of ``fn`` (``model`` if not given); the
    statistics then put back, so the next run starts from the same state."""
    model = model or fn
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.zero_grad(set_to_none=True)
    x.grad = None
    out = fn(x)
    out = out if isinstance(out, dict) else {"out": out}
    sum((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() for y in out.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if x.requires_grad:
        grads["input"] = x.grad.clone()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "batches" in k}
    model.load_state_dict(state)
    return out, grads, stats


def assert_close(fast, plain, rtol):
    for ours, ref in zip(fast, plain):
        for k in ref:
            assert (ours[k] - ref[k]).abs().max() <= rtol * ref[k].abs().max() + 1e-7, k


def test_spinenet_channels_last_is_the_nchw_function_with_gradients():
    # Eval mode with autograd: the layers one by one (nothing folded), channels-last
    # inside in float32 on the CPU, gradients through every conv. (Train mode of the whole
    # net is too ill-conditioned at a testable size, its 1x1 level-7 BatchNorms amplifying
    # float32 rounding to O(0.1); the block below checks train mode.)
    torch.manual_seed(0)
    model = randomise_norms(SpineNet("49S", norm="BN")).eval()
    x = torch.randn(1, 3, 128, 128)
    fast = _forward_backward(model, x)  # channels-last inside
    with torch.backends.mkldnn.flags(enabled=False):
        plain = _forward_backward(model, x)  # NCHW, PyTorch's own kernels
    assert_close(fast, plain, rtol=1e-4)
    assert all(y.is_contiguous() for y in fast[0].values())  # NCHW out, whatever inside


def test_spinenet_block_trains_channels_last_as_nchw():
    torch.manual_seed(0)
    block = randomise_norms(bottleneck_block(64, 32, projection=True, drop_rate=0.0, norm="BN")).train()
    x = torch.randn(2, 64, 20, 20)
    fast = _forward_backward(block, x.contiguous(memory_format=torch.channels_last))
    plain = _forward_backward(block, x)
    assert_close(fast, plain, rtol=1e-4)


@pytest.mark.parametrize("dtype,factor,input_grad,norm,classes", [
    (torch.float32, 2, True, "", 1), (torch.float64, 2, True, "", 1), (torch.float64, 3, True, "", 3),
    (torch.float32, 2, False, "", 1), (torch.float64, 2, True, "FrozenBN", 3),
])
def test_head_tiled_upsampling_is_the_layers_function(monkeypatch, dtype, factor, input_grad, norm, classes):
    # On the CPU the deconv, norm, ReLU and predictor run on the deconv's output tiles
    # (_TransposedConv: a 1x1 conv's forward and backward): the same logits, in place, and
    # gradients as the modules' own, for any upsampling factor, norm without batch
    # statistics and number of classes, with or without the input's gradient (the head's
    # first layer). Counted, so a case that silently ran the modules would fail.
    tiled = []
    apply = cpu_mask_logits._TransposedConv.apply
    monkeypatch.setattr(cpu_mask_logits._TransposedConv, "apply", lambda *a: tiled.append(1) or apply(*a))
    torch.manual_seed(0)
    head = DeepMaskHead(ShapeSpec(channels=16), num_classes=classes, num_filters=8, norm=norm,
                        upsample_factor=factor)
    head = randomise_norms(head).to(dtype).train()
    x = torch.randn(3, 16, 9, 5, dtype=dtype, requires_grad=input_grad)
    ours = head.layers(x)
    assert ours.grad_fn is not None and ours.shape == (3, classes, 9 * factor, 5 * factor)
    assert len(tiled) == 1
    with torch.nn.modules.module.register_module_forward_hook(lambda *args: None):
        reference = head.layers(x)  # a global hook: the modules themselves run
    assert len(tiled) == 1
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    assert (ours - reference).abs().max() <= rtol * reference.abs().max()
    weight = torch.rand(ours.shape, dtype=dtype)
    inputs = ([x] if input_grad else []) + list(head.parameters())
    for a, b in zip(torch.autograd.grad((ours * weight).sum(), inputs),
                    torch.autograd.grad((reference * weight).sum(), inputs)):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= rtol * b.abs().max()


@pytest.mark.parametrize("variant,dtype,momentum,classes", [
    ("default", torch.float64, 0.01, 1), ("default", torch.float32, 0.01, 1),
    ("hourglass10", torch.float64, None, 1), ("default", torch.float64, 0.01, 3),
])
def test_head_logits_gradients_and_statistics_are_the_layers(monkeypatch, variant, dtype, momentum, classes):
    # Training on the CPU runs the deconv's BatchNorm, the ReLU and a one-channel
    # predictor through _BatchNormReLULogit (no predictor backward: its gradients from
    # the BatchNorm backward's sums): the same outputs, input and parameter gradients,
    # moving statistics and batch count as the layers one by one; momentum None (a
    # cumulative average) included; without autograd, the same forward. With several
    # classes the layers run.
    fused = []
    apply = cpu_mask_logits._BatchNormReLULogit.apply
    monkeypatch.setattr(cpu_mask_logits._BatchNormReLULogit, "apply", lambda *a: fused.append(1) or apply(*a))
    torch.manual_seed(0)
    head = DeepMaskHead(ShapeSpec(channels=16), num_classes=classes, convnet_variant=variant,
                        num_filters=8)
    head = randomise_norms(head).to(dtype).train()
    head.deconv_norm.momentum = momentum
    head.deconv_norm.num_batches_tracked.fill_(3)
    x = torch.randn(4, 16, 14, 14, dtype=dtype)
    ours = _forward_backward(head.layers, x.requires_grad_(), head)
    assert len(fused) == (classes == 1)
    with torch.nn.modules.module.register_module_forward_hook(lambda *args: None):
        reference = _forward_backward(head.layers, x, head)  # a global hook: the layers run
    assert len(fused) == (classes == 1)
    rtol = 1e-4 if dtype == torch.float32 else 1e-12
    # The biases before a BatchNorm get zero gradients, up to rounding at the scale of the
    # other gradients: compared at that scale.
    scale = max(g.abs().max() for g in reference[1].values())
    for ours_part, reference_part in zip(ours, reference):
        for k, expected in reference_part.items():
            bound = rtol * (scale if k.endswith("bias") else expected.abs().max())
            assert (ours_part[k] - expected).abs().max() <= bound, k
    assert ours[0]["out"].shape == (4, classes, 28, 28)
    assert ours[2]["deconv_norm.num_batches_tracked"] == 4
    with torch.no_grad():  # the same forward without autograd (the parity harness's train mode)
        assert torch.equal(head.layers(x), ours[0]["out"])
    assert len(fused) == 2 * (classes == 1)


@pytest.mark.parametrize("variant", ["default", "hourglass10"])
def test_head_trains_under_cpu_autocast(variant):
    # bfloat16 autocast on the CPU: the deconv runs as the module (autocast does not cast
    # _TransposedConv's backward ops, which failed on mixed dtypes), every parameter gets
    # a finite float32 gradient pointing as float32's does.
    head = mask_head(variant).train()
    x = torch.randn(4, 16, 16, 16)
    target = torch.rand(4, 1, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = head.layers(x)
    assert low.dtype == torch.bfloat16

    def gradient(logits):
        loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(head.parameters()))])

    low_grad, full_grad = gradient(low), gradient(head.layers(x))
    assert low_grad.dtype == torch.float32 and torch.isfinite(low_grad).all()
    assert nn.functional.cosine_similarity(low_grad, full_grad, dim=0) > 0.95

"""Training on XLA devices (TPU, or PJRT's CPU device for testing) with torch-xla.

Detectron2's loop runs unchanged; what XLA needs on top of it:
- each process joins torch.distributed with torch-xla's ``xla`` backend, so
  Detectron2's ``comm`` (ranks, sampler sharding, main-process checks) and its
  DDP wrapper work as they do on GPUs;
- the step runs under bf16 autocast (the reference trains in bf16 on TPU) and
  ends with a graph cut (``torch_xla.sync``), which is when XLA executes it;
- checkpoints hold CPU tensors, so they load where torch-xla is absent, and
  only the main process writes them.
Only this module imports torch_xla; it is imported only on the XLA path.
"""
import torch
import torch.distributed as dist
import torch_xla
import torch_xla.core.xla_model as xm
import torch_xla.runtime as xr
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import SimpleTrainer


_FP32_OPS = torch.library.Library("torchvision", "IMPL")


def _nms_fp32(dets, scores, iou_threshold):
    with torch.autocast("xla", enabled=False):
        return torch.ops.torchvision.nms(dets.float(), scores.float(), iou_threshold)


def _roi_align_fp32(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    with torch.autocast("xla", enabled=False):
        out = torch.ops.torchvision.roi_align(
            input.float(), rois.float(), spatial_scale, pooled_height, pooled_width,
            sampling_ratio, aligned,
        )
    return out.to(input.dtype)


# torchvision registers fp32 casts of NMS and RoIAlign for CUDA and CPU autocast only;
# under XLA's bf16 autocast Detectron2 would hand them mixed bf16/fp32 inputs and fail.
_FP32_OPS.impl("nms", _nms_fp32, "AutocastXLA")
_FP32_OPS.impl("roi_align", _roi_align_fp32, "AutocastXLA")


def init_xla_process():
    """Join this process's XLA device to the job; return the device name for MODEL.DEVICE.

    Refuses a process that holds several devices: torch-xla then runs the training
    function once per device as threads of this process (TPU v2/v3's two cores per
    process; PJRT_DEVICE=CPU with CPU_NUM_DEVICES > 1, its only way to emulate several
    devices on a CPU), and Detectron2 keeps per-process state that threads would share:
    the torch.distributed group ``comm`` reads, the event storage, the loggers.
    """
    devices = xr.addressable_device_count()
    if devices > 1:
        raise RuntimeError(
            f"torch-xla runs the {devices} XLA devices of this process as threads of one process "
            f"(PJRT_DEVICE={xr.device_type()}), and Detectron2's trainer needs one process per "
            "device (one torch.distributed rank each), as torch-xla gives on TPU v4 and later. "
            "On a CPU, torch-xla 2.9 emulates several devices only as threads (CPU_NUM_DEVICES): "
            "unset CPU_NUM_DEVICES for one XLA process, or train several CPU processes with "
            "--accelerator cpu --num-gpus N."
        )
    if xr.world_size() > 1 and not dist.is_initialized():
        from torch_xla.distributed import xla_backend  # noqa: F401  (registers the "xla" backend)

        dist.init_process_group("xla", init_method="xla://")
    return str(torch_xla.device())


# Modules after whose forward the pending graph is executed (paths in the model, skipped
# where absent): the backbone and each head's last layer. Detectron2's step reads tensor
# values mid-way (matching, sampling, NMS, RoIAlign's CPU fallback, accuracy statistics):
# ~70 reads in a Mask R-CNN step, and each compiles and runs everything it depends on that
# is not on the device yet. Uncut, the backbone was in ~25 of those graphs (140-180 inputs
# each), the heads in ~5 each.
SYNC_AFTER = (
    "backbone",
    "proposal_generator.rpn_head",
    "roi_heads.box_predictor",
    "roi_heads.mask_head.predictor",
)


def _sync_hook(module, inputs, output):
    torch_xla.sync()


class XLASimpleTrainer(SimpleTrainer):
    """Detectron2's step under bf16 autocast, cut into XLA graphs where it pays.

    The cuts: after the modules of ``SYNC_AFTER`` (their outputs and the activations
    saved for backward become device data, computed once; in evaluation too, the hooks
    stay on the model), and at the step's end, before the metrics are read (Detectron2
    reads the losses between backward and the optimizer step, which compiled the forward
    once more per loss). The operations are unchanged: in fp32, the XLA test's model gives
    bitwise the same features, RPN outputs, proposals and mask loss cut and uncut. What
    differs is which anchors and ROIs Detectron2 samples at random (torch-xla derives
    random seeds per graph), and under bf16 a value at a cut is rounded to bf16 where a
    fused graph may have kept it in f32 (one bf16 step: total loss 4.8550 uncut, 4.8503 cut).
    """

    def __init__(self, model, data_loader, optimizer, bf16=True):
        super().__init__(model, data_loader, optimizer)
        self.bf16 = bf16
        self._pending_metrics = None
        inner = getattr(model, "module", model)  # DistributedDataParallel's wrapped model
        for path in SYNC_AFTER:
            module = inner
            for name in path.split("."):
                module = getattr(module, name, None)
            if isinstance(module, torch.nn.Module):
                module.register_forward_hook(_sync_hook)

    def run_step(self):
        with torch.autocast("xla", dtype=torch.bfloat16, enabled=self.bf16):
            super().run_step()
        torch_xla.sync()
        if self._pending_metrics is not None:
            args, kwargs = self._pending_metrics
            self._pending_metrics = None
            super()._write_metrics(*args, **kwargs)

    def _write_metrics(self, *args, **kwargs):
        # Called by Detectron2's run_step before the graph has run: written once it has.
        self._pending_metrics = (args, kwargs)


class _OnCPU:
    """Gives ``state_dict()`` of a model, optimizer or scheduler with tensors moved to CPU."""

    def __init__(self, obj):
        self.obj = obj

    def state_dict(self):
        return xm._maybe_convert_to_cpu(self.obj.state_dict())


class XLACheckpointer(DetectionCheckpointer):
    """A DetectionCheckpointer that writes CPU tensors, from the main process only."""

    def save(self, name, **kwargs):
        model, checkpointables = self.model, self.checkpointables
        self.model = _OnCPU(model)
        self.checkpointables = {k: _OnCPU(v) for k, v in checkpointables.items()}
        try:
            super().save(name, **kwargs)
        finally:
            self.model, self.checkpointables = model, checkpointables

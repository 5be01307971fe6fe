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
    """Join this process's XLA device to the job; return the device name for MODEL.DEVICE."""
    if xr.world_size() > 1 and not dist.is_initialized():
        from torch_xla.distributed import xla_backend  # noqa: F401  (registers the "xla" backend)

        dist.init_process_group("xla", init_method="xla://")
    return str(torch_xla.device())


class XLASimpleTrainer(SimpleTrainer):
    """Detectron2's step under bf16 autocast, cut into an XLA graph at its end."""

    def __init__(self, model, data_loader, optimizer, bf16=True):
        super().__init__(model, data_loader, optimizer)
        self.bf16 = bf16

    def run_step(self):
        with torch.autocast("xla", dtype=torch.bfloat16, enabled=self.bf16):
            super().run_step()
        torch_xla.sync()


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

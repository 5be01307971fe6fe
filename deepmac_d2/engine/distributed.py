"""Several training processes: one per GPU (NCCL), or N on CPU (gloo), on one or more machines.

Detectron2's ``launch`` starts the processes, joins them into a process group and creates
the per-machine group that ``comm.get_local_rank()`` reads. Since its PR #4720 it uses gloo
when CUDA is absent; v0.6 asserts CUDA. :func:`launch_processes` calls Detectron2's
``launch`` for CUDA and, where it serves, for CPU; otherwise (v0.6, or ``--accelerator cpu``
on a machine with GPUs, where main's would choose NCCL) it runs :func:`_gloo_worker`, the
same steps with gloo. Either way ``torch.multiprocessing`` ends every process of the
machine as soon as one raises, and re-raises its error: a failed rank leaves none of
its machine waiting in a collective (other machines' processes fail at ``--dist-timeout``).

What else CPU and XLA processes need, each used where Detectron2 builds the part:
:func:`ddp_without_device_ids` for the trainer's ``DistributedDataParallel`` (with
:func:`check_sync_bn` on the model it wraps), :func:`log_batch_share` on the train loader.
"""
import contextlib
import datetime
import logging
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import defaults as detectron2_defaults
from detectron2.engine import launch
from detectron2.utils import comm

logger = logging.getLogger("detectron2.deepmac_d2.engine")

# Detectron2's names for norms that map to torch.nn.SyncBatchNorm (detectron2.layers.get_norm).
TORCH_SYNC_BN = ("SyncBN", "nnSyncBN")
# Synchronises through torch.distributed, so through gloo too; "_N" weighs each process
# by its batch and takes a process with none (a mask head whose images hold no mask).
CPU_SYNC_BN = "naiveSyncBN_N"


def check_process_request(args, accelerator):
    """Refuse process counts that cannot run, before any process starts.

    A CUDA job with more processes per machine than GPUs would otherwise fail in
    Detectron2's worker, after the others have started and wait for it; on XLA,
    ``torch_xla.launch`` starts one process per device by itself.
    """
    if accelerator == "cuda" and args.num_gpus > torch.cuda.device_count():
        raise ValueError(
            f"--num-gpus {args.num_gpus} asks for {args.num_gpus} processes per machine, one per GPU, "
            f"but torch sees {torch.cuda.device_count()} CUDA device(s) here: use --num-gpus "
            f"{torch.cuda.device_count()} or fewer (or --accelerator cpu for CPU processes)."
        )
    if accelerator == "xla" and (args.num_gpus > 1 or args.num_machines > 1):
        raise ValueError(
            f"--num-gpus {args.num_gpus} / --num-machines {args.num_machines} do not apply to "
            "--accelerator xla: torch_xla.launch starts one process per XLA device it finds. Choose "
            "the devices the torch-xla way: PJRT_DEVICE=TPU (all chips of the host; TPU_VISIBLE_CHIPS "
            "and TPU_PROCESS_BOUNDS restrict them), and on a TPU pod run the same command on every "
            "host. Leave --num-gpus at 1."
        )
    if args.num_gpus < 1 or args.num_machines < 1 or not 0 <= args.machine_rank < args.num_machines:
        raise ValueError(
            f"--num-gpus {args.num_gpus}, --num-machines {args.num_machines}, --machine-rank "
            f"{args.machine_rank}: need at least one process and one machine, and a machine rank "
            f"in 0..{args.num_machines - 1}."
        )


def launch_processes(main_func, args, accelerator):
    """Run ``main_func(args)`` in ``--num-gpus`` processes on each of ``--num-machines``.

    ``args.dist_timeout`` (seconds) bounds how long a process waits to join the group
    (an unreachable ``--dist-url``) and then any collective.
    """
    check_process_request(args, accelerator)
    timeout = datetime.timedelta(seconds=args.dist_timeout)
    if accelerator == "cuda" or _detectron2_launch_runs_on_cpu():
        launch(main_func, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,), timeout=timeout)
        return
    world_size = args.num_machines * args.num_gpus
    if world_size == 1:
        main_func(args)
        return
    dist_url = args.dist_url
    if dist_url == "auto":
        if args.num_machines > 1:
            raise ValueError("--dist-url auto picks a free port on this machine: give machine 0's "
                             "tcp://HOST:PORT on every machine of a multi-machine job.")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    mp.start_processes(
        _gloo_worker, nprocs=args.num_gpus, start_method="spawn", daemon=False,
        args=(main_func, world_size, args.num_gpus, args.machine_rank, dist_url, args, timeout),
    )


def _detectron2_launch_runs_on_cpu():
    """Detectron2's ``launch`` uses gloo here: CUDA is absent and it knows CPU machines.

    ``comm.create_local_process_group`` came after CPU support in Detectron2's history
    (PR #4720, then "provide {create,get}_local_process_group"), so where it exists,
    ``launch`` falls back to gloo without CUDA; v0.6 has neither.
    """
    return not torch.cuda.is_available() and hasattr(comm, "create_local_process_group")


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _gloo_worker(local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args, timeout):
    """Detectron2's ``_distributed_worker`` for CPU processes: gloo, no CUDA device to set.

    Mirrored because v0.6's asserts CUDA and main's picks NCCL whenever a GPU is
    present; the steps and their order are main's.
    """
    rank = machine_rank * num_per_machine + local_rank
    try:
        dist.init_process_group("gloo", init_method=dist_url, world_size=world_size, rank=rank,
                                timeout=timeout)
    except Exception as e:
        raise RuntimeError(
            f"process {rank} of {world_size} could not join the process group at --dist-url "
            f"{dist_url} within --dist-timeout {timeout.total_seconds():g} s: check that machine 0 "
            f"runs the same command with --machine-rank 0 and that this machine reaches that "
            f"address and port ({type(e).__name__}: {e})"
        ) from e
    create_local_process_group(num_per_machine)
    comm.synchronize()
    main_func(args)


def create_local_process_group(num_per_machine):
    """``comm.create_local_process_group`` where Detectron2 has it; v0.6's ``launch`` steps otherwise.

    ``comm.get_local_rank()`` and ``get_local_size()`` read this group; v0.6 sets its
    module variable inside ``launch``, which is the only way it offers.
    """
    if hasattr(comm, "create_local_process_group"):
        comm.create_local_process_group(num_per_machine)
        return
    machine_rank = dist.get_rank() // num_per_machine
    for i in range(dist.get_world_size() // num_per_machine):
        group = dist.new_group(list(range(i * num_per_machine, (i + 1) * num_per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


@contextlib.contextmanager
def ddp_without_device_ids(cfg):
    """While Detectron2's ``DefaultTrainer`` is built, wrap CPU/XLA models with ``device_ids=None``.

    ``DefaultTrainer.__init__`` calls ``create_ddp_model(model, broadcast_buffers=False)``,
    which fills in ``device_ids=[comm.get_local_rank()]``; PyTorch rejects device ids for
    a CPU module (the error of Detectron2 issue #5146) and an XLA process has one device,
    its default. Detectron2 offers no setting or hook for it, so the module-level name
    that ``DefaultTrainer.__init__`` looks up is pointed at ``create_ddp_model`` with
    ``device_ids=None`` for the constructor's duration and restored after; the model is
    checked by :func:`check_sync_bn` first. CUDA, and one process (no DDP), are left alone.
    """
    if cfg.MODEL.DEVICE.startswith("cuda") or comm.get_world_size() == 1:
        yield
        return
    original = detectron2_defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        check_sync_bn(cfg, model)
        return original(model, device_ids=None, **kwargs)

    detectron2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        detectron2_defaults.create_ddp_model = original


def check_sync_bn(cfg, model):
    """Refuse ``torch.nn.SyncBatchNorm`` layers in CPU/XLA training, naming the config keys.

    Detectron2's ``SyncBN`` is ``torch.nn.SyncBatchNorm``, which PyTorch's DDP refuses
    in a CPU module ("SyncBatchNorm layers only work with GPU modules", with no word of
    the config). Alone, a process has no DDP and our layers build plain BatchNorm, so one
    CPU process trains these configs; evaluation never synchronises. The layers are
    looked up in the model, since the config holds ``SyncBN`` defaults for parts a config
    may not build (``MODEL.SPINENET.NORM``, ``MODEL.RPN.NORM``); the error names every key
    set to it.
    """
    layers = [name for name, m in model.named_modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    if not layers:
        return
    keys = [k for k, v in _leaves(cfg) if isinstance(v, str) and v in TORCH_SYNC_BN]
    raise ValueError(
        f"The model has {len(layers)} torch.nn.SyncBatchNorm layers ({', '.join(layers[:3])}, ...), "
        f"which train on GPUs only, and this job has {comm.get_world_size()} {cfg.MODEL.DEVICE} "
        f"processes. They come from 'SyncBN' in {', '.join(keys)}: set "
        f"{' '.join(f'{k} {CPU_SYNC_BN}' for k in keys)} (Detectron2's NaiveSyncBatchNorm, "
        "synchronised through torch.distributed, so through gloo; '_N' weighs each process by "
        "its batch and takes a process whose batch is empty), or train in one process."
    )


def _leaves(node, prefix=""):
    for key, value in node.items():
        if hasattr(value, "items"):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def log_batch_share(data_loader, total_batch_size):
    """Log, in every process, how many images its first training batch holds.

    Detectron2 gives each process ``SOLVER.IMS_PER_BATCH / world size`` images and logs
    none of it; this line, from the loader's own output, shows the split.
    """
    for i, batch in enumerate(data_loader):
        if i == 0:
            logger.info("Process %d of %d: %d images per step, of SOLVER.IMS_PER_BATCH %d",
                        comm.get_rank(), comm.get_world_size(), len(batch), total_batch_size)
        yield batch

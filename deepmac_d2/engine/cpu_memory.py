"""A glibc malloc that keeps freed memory for reuse: CPU training and the speed table.

glibc hands every freed block above its mmap threshold (at most 32 MB) back to the
kernel, so each CPU training step page-faults and zeroes its large activations again
(Hourglass-52 at 64 ROIs: 0.5 M faults and 0.8 s of system time per forward+backward,
a fifth of the step). TF's oneDNN CPU allocator keeps such blocks in a pool, as
PyTorch's CUDA allocator does on GPUs; with ``MALLOC_SETTINGS`` glibc does too. The
price: the process does not give memory back after its peak, which a training process
would soon need again anyway.
"""
import ctypes
import os

MALLOC_SETTINGS = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2 ** 40)}

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's malloc.h


def keep_freed_memory(environ=os.environ) -> str:
    """Set this process's glibc malloc as ``MALLOC_SETTINGS``, except for a variable
    ``environ`` sets: glibc read that one when the process started, and it stays
    (``MALLOC_MMAP_MAX_=65536 MALLOC_TRIM_THRESHOLD_=131072`` are glibc's defaults).
    Returns the settings in force, for logs and tables."""
    settings = {k: environ.get(k, ours) for k, ours in MALLOC_SETTINGS.items()}
    in_force = " ".join(f"{k}={v}" for k, v in settings.items())
    unset = [k for k in MALLOC_SETTINGS if k not in environ]
    if not unset:
        return in_force
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "glibc malloc defaults (no glibc)"
    # mallopt takes a C int: -1 is read as SIZE_MAX (never trim); 2^40 as given would
    # wrap to 0, a trim on every free.
    values = {"MALLOC_MMAP_MAX_": (_M_MMAP_MAX, int(MALLOC_SETTINGS["MALLOC_MMAP_MAX_"])),
              "MALLOC_TRIM_THRESHOLD_": (_M_TRIM_THRESHOLD, -1)}
    if not all(mallopt(*values[k]) for k in unset):
        return "glibc malloc defaults (mallopt refused)"
    return in_force

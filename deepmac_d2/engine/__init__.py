"""Trainer and the accelerator-aware launcher (CUDA / CPU / XLA-TPU)."""

# One command per job; each sets up what it needs first (idempotent, instant when done).
PY ?= python3
VENV := .venv/bin/python
VENV_XLA := .venv-xla/bin/python

.PHONY: setup setup-xla setup-tf test test-main test-xla demo parity tf-checkpoint-check clean

setup:
	$(PY) tools/setup_env.py

setup-xla:
	$(PY) tools/setup_env.py --xla

setup-tf:
	$(PY) tools/setup_env.py --tf

# The main suite; the float comparisons again on the AVX2 kernels of PyTorch and oneDNN
# (another instruction set, another rounding: a tolerance tuned to one CPU fails there);
# then the XLA smoke tests in their own environment (PJRT on CPU).
AVX2 := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2

test: setup setup-xla
	$(VENV) -m pytest -q -m "not xla" tests
	$(AVX2) $(VENV) -m pytest -q -m "numeric and not xla" tests
	PJRT_DEVICE=CPU $(VENV_XLA) -m pytest -q -m xla tests

test-main: setup
	$(VENV) -m pytest -q -m "not xla" tests

test-xla: setup-xla
	PJRT_DEVICE=CPU $(VENV_XLA) -m pytest -q -m xla tests

# The synthetic data, a CPU-sized DeepMAC model trained on the seen classes' masks, mask AP
# on the novel classes next to an untrained head's, and pictures (tools/demo.py; ~10 min).
demo: setup
	$(VENV) tools/demo.py

# Our ports (SpineNet-49..190, the reference's ResNet-50-FPN, every DeepMaskHead variant) against the TF Model Garden
# reference with the same weights, float64, eval and train mode: one table, exit 1 on a
# mismatch (tools/tf_reference/parity.py; .venv-tf runs the reference; ~10 min on 2 cores); then the
# speed table, ours vs the reference on 2 threads each (~8-15 min; tools/tf_reference/parity.py --speed-repeats 0 skips it).
parity: setup setup-tf
	$(VENV) tools/tf_reference/parity.py

# tools/convert_tf_checkpoint.py on a checkpoint and a SavedModel that the reference writes
# here (random weights), for a SpineNet and a ResNet-FPN model: our masks for given boxes
# against its image_and_boxes_tensor output, the ResNet-FPN model's converted RPN and box
# heads against its own, and the errors for checkpoints that do not fit
# (tools/tf_reference/tf_checkpoint_check.py; ~20-25 min on 2 shared cores).
tf-checkpoint-check: setup setup-tf
	$(VENV) tools/tf_reference/tf_checkpoint_check.py

clean:
	rm -rf .venv .venv-xla .venv-tf .deps output

# One command per job; each sets up what it needs first (idempotent, instant when done).
PY ?= python3
VENV := .venv/bin/python
VENV_XLA := .venv-xla/bin/python

.PHONY: setup setup-xla test test-main test-xla demo clean

setup:
	$(PY) tools/setup_env.py

setup-xla:
	$(PY) tools/setup_env.py --xla

# The main suite, then the XLA smoke tests in their own environment (PJRT on CPU).
test: setup setup-xla
	$(VENV) -m pytest -q -m "not xla" tests
	PJRT_DEVICE=CPU $(VENV_XLA) -m pytest -q -m xla tests

test-main: setup
	$(VENV) -m pytest -q -m "not xla" tests

test-xla: setup-xla
	PJRT_DEVICE=CPU $(VENV_XLA) -m pytest -q -m xla tests

# The synthetic data, a CPU-sized DeepMAC model trained on the seen classes' masks, mask AP
# on the novel classes next to an untrained head's, and pictures (tools/demo.py; ~10 min).
demo: setup
	$(VENV) tools/demo.py

clean:
	rm -rf .venv .venv-xla .deps output

"""The machinery the benchmarks and ``tools/demo.py`` share, outside the plugin.

A frozen detector whose cached features train many mask heads (``frozen_detector``, and
``frozen_weak_training`` for the weak losses, which also read the images), a resumable
grid of runs with means and 95% intervals over seeds (``grid``), and a quiet terminal
(``console``). It may import ``deepmac_d2``, Detectron2 and the scientific stack; nothing
in ``deepmac_d2`` imports it.
"""

"""setup() warns when a ResNet would train from random weights with FrozenBN (Detectron2's default)."""
import os
from argparse import Namespace

from deepmac_d2.engine import setup

WARNING = "trains from random weights"
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo_synthetic_hg20.yaml")


def setup_log(tmp_path, name, *opts, eval_only=False):
    """log.txt of a setup() of the demo config with ``opts``, read right after it."""
    out = str(tmp_path / name)
    args = Namespace(config_file=CONFIG, opts=["OUTPUT_DIR", out, *opts], eval_only=eval_only, accelerator="cpu")
    setup(args, check_datasets=False)
    with open(os.path.join(out, "log.txt")) as f:
        return f.read()


def test_frozen_bn_from_scratch_warns_with_the_keys_and_their_fix(tmp_path):
    # Handlers of earlier setups stay attached and write on: the quiet cases come first.
    frozen = ["MODEL.RESNETS.NORM", "FrozenBN", "MODEL.BACKBONE.FREEZE_AT", "2"]
    quiet = {
        "demo": [],  # BN and FREEZE_AT 0, as the demo config trains from scratch
        "pretrained": frozen + ["MODEL.WEIGHTS", "backbone.pkl"],  # setup loads no weights
        "spinenet": frozen + ["MODEL.BACKBONE.NAME", "build_spinenet_backbone"],  # no ResNet
    }
    for name, opts in quiet.items():
        assert WARNING not in setup_log(tmp_path, name, *opts), name
    assert WARNING not in setup_log(tmp_path, "eval", *frozen, eval_only=True)

    log = setup_log(tmp_path, "frozen", *frozen)
    line = next(line for line in log.splitlines() if WARNING in line)
    assert "WARNING" in line
    for part in ("MODEL.WEIGHTS is empty", "MODEL.RESNETS.NORM is 'FrozenBN'", "MODEL.BACKBONE.FREEZE_AT is 2",
                 "MODEL.RESNETS.NORM 'GN'", "'BN'", "MODEL.BACKBONE.FREEZE_AT 0"):
        assert part in line, part

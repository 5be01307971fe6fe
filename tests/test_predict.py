"""tools/predict.py on a model trained here (train_net.py, a few iterations on synthetic data)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image
from test_train_net import CONFIG, ROOT, tiny_opts

from deepmac_d2.data.synthetic import SyntheticConfig, prepare_synthetic

PREDICT = os.path.join(ROOT, "tools", "predict.py")


def run(args, env, timeout=300):
    return subprocess.run([sys.executable] + args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(output folder of a 4-iteration training, its environment, the synthetic data root)."""
    root = tmp_path_factory.mktemp("predict")
    data = str(root / "synthetic")
    prepare_synthetic(data, num_train=4, num_val=3, cfg=SyntheticConfig(image_size=64))
    env = dict(os.environ, DEEPMAC_SYNTHETIC_ROOT=data, OMP_NUM_THREADS="1")
    out = str(root / "train")
    res = run([os.path.join(ROOT, "train_net.py"), "--config-file", CONFIG] + tiny_opts(out, 4, 100), env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out, env, data


@pytest.mark.slow
def test_predict_writes_pictures_and_coco_results_and_skips_unreadable_images(trained, tmp_path):
    out, env, data = trained
    images = tmp_path / "images"
    images.mkdir()
    for name in ("000000.png", "000001.png"):
        shutil.copy(os.path.join(data, "val", name), images / name)
    (images / "broken.png").write_bytes(b"not an image")
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(os.path.join(data, "val", "000002.png"), other / "000002.png")
    result_dir = tmp_path / "predictions"
    res = run([
        PREDICT, "--config-file", os.path.join(out, "config.yaml"),
        # Overrides before --input, as the usage line has them; every detection kept.
        "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"), "DATASETS.TEST", '("synthetic_val",)',
        "--input", str(images), str(other / "*.png"), "--output", str(result_dir), "--confidence-threshold", "0",
    ], env)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    assert f"Cannot read {images / 'broken.png'}" in log and "skipped it" in log
    assert "Predicted 1/4 images." in log and "ETA=" in log  # Detectron2-style progress
    assert "Done: 3 of 4 images" in log

    read = [images / "000000.png", images / "000001.png", other / "000002.png"]
    for path in read:
        picture = np.asarray(Image.open(result_dir / path.name).convert("RGB"))
        image = np.asarray(Image.open(path).convert("RGB"))
        assert picture.shape == image.shape
        assert np.abs(picture.astype(int) - image).mean() > 1, "nothing drawn on the picture"
    assert not (result_dir / "broken.png").exists()

    results = json.loads((result_dir / "coco_results.json").read_text())
    # image_id: the position in the input order, the folder's images sorted (broken.png is 3).
    by_image = {r["image_id"]: r["file_name"] for r in results}
    assert by_image == {1: str(images / "000000.png"), 2: str(images / "000001.png"), 4: str(other / "000002.png")}
    # Category ids are the json's (1..14), not Detectron2's contiguous 0..13.
    with open(os.path.join(data, "annotations", "val.json")) as f:
        json_ids = {c["id"] for c in json.load(f)["categories"]}
    assert {r["category_id"] for r in results} <= json_ids and len({r["category_id"] for r in results}) > 1
    for r in results:
        x, y, w, h = r["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 64.01 and y + h <= 64.01 and 0 <= r["score"] <= 1
        assert mask_util.decode(r["segmentation"]).shape == (64, 64)


@pytest.mark.slow
def test_predict_names_an_input_that_matches_nothing(tmp_path, trained):
    out, env, _ = trained
    missing = str(tmp_path / "nowhere" / "*.jpg")
    res = run([PREDICT, "--config-file", os.path.join(out, "config.yaml"), "--input", missing,
               "--output", str(tmp_path / "p")], env)
    assert res.returncode != 0 and f"--input {missing}: no such image" in res.stderr

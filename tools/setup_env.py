#!/usr/bin/env python3
"""Set up deepmac-d2's environments from scratch, idempotently (standard library only).

    python tools/setup_env.py            # .venv:     torch 2.14.1, Detectron2, the project
    python tools/setup_env.py --xla      # .venv-xla: torch 2.9.0 + torch-xla 2.9.0, Detectron2, the project
    python tools/setup_env.py --tf       # .venv-tf:  the TF Model Garden reference (make parity)

Detectron2 is not on PyPI, so it comes from one of two routes, picked by the
environment variable D2_SOURCE:

    git    its official repository (compiled ops, current fixes); needs GitHub.
    sdist  the PyPI sdist pb1-detectron2==0.6 (v0.6's Python sources, no C++),
           checked against its sha256, installed without compiling, with the pins
           v0.6 needs; the missing ``detectron2._C`` comes from deepmac_d2.compat.
    auto   (default) git when GitHub answers within a few seconds, else sdist.
    skip   keep the Detectron2 already installed in the environment.

Each finished environment holds a stamp of what built it; a run whose inputs
match the stamp returns at once. Anything interrupted half way has no stamp
and is simply redone: every step below is safe to repeat.
"""
import argparse
import hashlib
import html.parser
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEPS = ROOT / ".deps"

ENVS = {
    "main": {
        "dir": ROOT / ".venv",
        "torch": ["torch==2.14.1", "torchvision==0.29.1"],
        "extras": "dev",
    },
    "xla": {
        "dir": ROOT / ".venv-xla",
        "torch": ["torch==2.9.0", "torchvision==0.24.0", "torch-xla==2.9.0"],
        "extras": "dev,xla",
    },
}
D2_GIT = "https://github.com/facebookresearch/detectron2.git"
D2_SDIST = "pb1-detectron2"
D2_SDIST_VERSION = "0.6"
D2_SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
# Detectron2 v0.6 breaks with newer releases of these (see README, Troubleshooting).
D2_SDIST_PINS = ["Pillow<10", "numpy<1.24", "setuptools<81", "omegaconf>=2.1,<2.4"]
# Runtime dependencies of Detectron2 v0.6 (its setup.py's list, minus the
# formatter and caffe2-only packages it does not need at run time).
D2_SDIST_REQUIRES = [
    "matplotlib", "pycocotools>=2.0.2", "termcolor>=1.1", "yacs>=0.1.8", "tabulate",
    "cloudpickle", "tqdm>4.29.0", "tensorboard", "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10", "hydra-core>=1.1",
]
C_FALLBACK_PTH = "deepmac_d2_detectron2_c_fallback.pth"


class SetupError(RuntimeError):
    pass


def say(msg):
    print(f"[setup] {msg}", flush=True)


def run(cmd, **kw):
    say("$ " + " ".join(str(c) for c in cmd))
    res = subprocess.run([str(c) for c in cmd], **kw)
    if res.returncode != 0:
        raise SetupError(f"command failed (exit {res.returncode}): {' '.join(map(str, cmd))}")
    return res


def index_url():
    """The package index pip would use: PIP_INDEX_URL, pip's config, or PyPI."""
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        res = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", "global.index-url"],
            capture_output=True, text=True,
        )
        url = res.stdout.strip() if res.returncode == 0 else ""
    return (url or "https://pypi.org/simple").rstrip("/")


def check_index(timeout=20):
    url = index_url() + "/pip/"
    try:
        urllib.request.urlopen(url, timeout=timeout).read(1)
    except Exception as e:  # noqa: BLE001 - any failure means the same to the user
        raise SetupError(
            f"the package index {index_url()} is not reachable ({e}). Set-up needs it for "
            "torch, Detectron2's dependencies and the project's; set PIP_INDEX_URL to a "
            "reachable index or mirror and run the same command again."
        ) from None


def github_reachable(timeout=4.0):
    try:
        socket.create_connection(("github.com", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def choose_d2_route():
    route = os.environ.get("D2_SOURCE", "auto").lower()
    if route not in ("auto", "git", "sdist", "skip"):
        raise SetupError(f"D2_SOURCE={route!r} is not a route; use auto, git, sdist or skip.")
    if route == "auto":
        route = "git" if github_reachable() else "sdist"
        say(f"D2_SOURCE=auto: GitHub is {'reachable' if route == 'git' else 'not reachable'}, "
            f"taking the {route} route")
    else:
        say(f"D2_SOURCE={route}")
    return route


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links.extend(v for k, v in attrs if k == "href")


def fetch_d2_sdist():
    """Download the Detectron2 v0.6 sdist (once), verify its sha256, return its path."""
    name = f"{D2_SDIST}-{D2_SDIST_VERSION}.tar.gz"
    target = DEPS / name
    if target.exists() and sha256(target) == D2_SDIST_SHA256:
        return target
    DEPS.mkdir(exist_ok=True)
    page = f"{index_url()}/{D2_SDIST}/"
    try:
        parser = _Links()
        parser.feed(urllib.request.urlopen(page, timeout=30).read().decode())
    except Exception as e:  # noqa: BLE001
        raise SetupError(f"cannot read {page} ({e}); check the network or PIP_INDEX_URL.") from None
    hrefs = [h for h in parser.links if name in h]
    if not hrefs:
        raise SetupError(f"{page} does not list {name}; the sdist route needs that exact file.")
    url = urllib.parse.urljoin(page, hrefs[0].split("#")[0])
    partial = target.with_suffix(".part")
    say(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(partial, "wb") as f:
            shutil.copyfileobj(r, f)
    except Exception as e:  # noqa: BLE001
        partial.unlink(missing_ok=True)
        raise SetupError(f"download of {url} failed ({e}).") from None
    got = sha256(partial)
    if got != D2_SDIST_SHA256:
        partial.unlink()
        raise SetupError(
            f"{name} from {url} has sha256 {got}, expected {D2_SDIST_SHA256}. The file was "
            "deleted and nothing was installed; check your index or mirror (PIP_INDEX_URL)."
        )
    partial.replace(target)
    return target


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


SDIST_SETUP_PY = '''\
# Written by deepmac-d2's tools/setup_env.py: Detectron2 v0.6's Python sources
# without its C++ extension (the sdist ships none); detectron2._C comes from
# deepmac_d2.compat when this package is imported.
from setuptools import find_packages, setup

PROJECTS = {{
    "detectron2.projects.point_rend": "projects/PointRend/point_rend",
    "detectron2.projects.deeplab": "projects/DeepLab/deeplab",
    "detectron2.projects.panoptic_deeplab": "projects/Panoptic-DeepLab/panoptic_deeplab",
}}
setup(
    name="detectron2",
    version="0.6",
    packages=find_packages(include=["detectron2", "detectron2.*"]) + list(PROJECTS),
    package_dir=PROJECTS,
    package_data={{"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]}},
    install_requires={requires!r},
)
'''


def prepare_d2_sdist_tree(tarball):
    """Unpack the sdist into .deps/ (fresh each time) with a setup.py that builds no C++."""
    src = DEPS / f"detectron2-{D2_SDIST_VERSION}-src"
    shutil.rmtree(src, ignore_errors=True)
    tmp = DEPS / "unpack.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp, filter="data")
    (tmp / f"{D2_SDIST}-{D2_SDIST_VERSION}").rename(src)
    shutil.rmtree(tmp)
    for stale in ("setup.cfg", "pb1_detectron2.egg-info"):
        p = src / stale
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    (src / "setup.py").write_text(SDIST_SETUP_PY.format(requires=D2_SDIST_REQUIRES))
    return src


def site_packages(venv_python):
    out = subprocess.run(
        [str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    )
    return Path(out.stdout.strip())


def stamp_inputs(env, route):
    files = [Path(__file__), ROOT / "pyproject.toml"]
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return {"env": env, "route": route, "inputs": h.hexdigest(), "python": sys.version.split()[0]}


def check_python():
    if sys.version_info[:2] != (3, 11):
        raise SetupError(f"Python 3.11 is required, this is {sys.version.split()[0]}; "
                         "run this script with python3.11.")


def setup(env, force=False):
    spec = ENVS[env]
    venv = spec["dir"]
    py = venv / "bin" / "python"
    stamp = venv / ".deepmac-setup.json"
    requested = os.environ.get("D2_SOURCE", "auto").lower()
    if stamp.exists() and py.exists() and not force:
        done = json.loads(stamp.read_text())
        if done.get("requested") == requested and done.get("inputs") == stamp_inputs(env, "")["inputs"]:
            say(f"{venv.name} is up to date (Detectron2 from the {done['route']} route); "
                "nothing to do. Use --force to redo it.")
            return
    check_python()
    t0 = time.time()
    check_index()
    route = choose_d2_route()
    # Fetch and verify Detectron2 before touching the environment, so a bad
    # download never leaves a half-built one behind.
    d2_tree = prepare_d2_sdist_tree(fetch_d2_sdist()) if route == "sdist" else None

    if not py.exists():
        run([sys.executable, "-m", "venv", venv])
    pip = [py, "-m", "pip", "--disable-pip-version-check"]
    run(pip + ["install", "--upgrade", "pip", "wheel", "setuptools<81"])
    run(pip + ["install"] + spec["torch"])
    if route == "git":
        run(pip + ["install", "--no-build-isolation", f"git+{D2_GIT}"])
    elif route == "sdist":
        run(pip + ["install", "--no-build-isolation", d2_tree] + D2_SDIST_PINS)
    # The project, editable; keep torch at the pinned versions and (sdist route) the v0.6 pins.
    constraints = DEPS / f"constraints-{env}.txt"
    DEPS.mkdir(exist_ok=True)
    constraints.write_text("\n".join(spec["torch"] + (D2_SDIST_PINS if route == "sdist" else [])) + "\n")
    run(pip + ["install", "-c", constraints, "-e", f"{ROOT}[{spec['extras']}]"])
    # detectron2._C for any import order: a .pth hook that only answers when
    # the real compiled module is absent (it stays inert next to a real one).
    hook = ROOT / "deepmac_d2" / "compat" / "c_fallback.py"
    (site_packages(py) / C_FALLBACK_PTH).write_text(
        "import importlib.util as _u; _s = _u.spec_from_file_location('_deepmac_c_fallback', "
        f"{str(hook)!r}); _m = _u.module_from_spec(_s); _s.loader.exec_module(_m); _m.install()\n"
    )
    run([py, "-c", "import detectron2.modeling, detectron2.evaluation, detectron2.engine, deepmac_d2"])
    stamp.write_text(json.dumps(dict(stamp_inputs(env, route), requested=requested)))
    say(f"{venv.name} ready in {time.time() - t0:.0f}s (Detectron2 from the {route} route)")


# The TF Model Garden reference for tools/tf_reference/parity_tf.py (make parity): TensorFlow alone,
# no torch, no Detectron2, no project. tf-models-official 2.20 pins TF 2.20, whose wheels
# the index lacks; 2.21 runs it, so it goes in without its dependencies, then the ones
# the reference's SpineNet and DeepMaskHead import.
TF_ENV = ROOT / ".venv-tf"
TF_PACKAGES = ["tensorflow-cpu==2.21.0", "tf-keras==2.21.0"]
TF_MODELS = "tf-models-official==2.20.0"
TF_MODELS_REQUIRES = [
    "pyyaml", "gin-config", "tensorflow-datasets", "scipy", "pycocotools", "Pillow",
    "opencv-python-headless", "matplotlib",
]


def setup_tf(force=False):
    py = TF_ENV / "bin" / "python"
    stamp = TF_ENV / ".deepmac-setup.json"
    inputs = hashlib.sha256(json.dumps([TF_PACKAGES, TF_MODELS, TF_MODELS_REQUIRES]).encode()).hexdigest()
    if stamp.exists() and py.exists() and not force:
        if json.loads(stamp.read_text()).get("inputs") == inputs:
            say(f"{TF_ENV.name} is up to date; nothing to do. Use --force to redo it.")
            return
    check_python()
    t0 = time.time()
    check_index()
    if not py.exists():
        run([sys.executable, "-m", "venv", TF_ENV])
    pip = [py, "-m", "pip", "--disable-pip-version-check"]
    run(pip + ["install", "--upgrade", "pip", "wheel", "setuptools<81"])
    run(pip + ["install"] + TF_PACKAGES)
    run(pip + ["install", "--no-deps", TF_MODELS])
    run(pip + ["install"] + TF_MODELS_REQUIRES)
    run([py, "-c", "import os; os.environ['TF_USE_LEGACY_KERAS'] = '1'; "
         "import official.vision.modeling.backbones.spinenet, "
         "official.projects.deepmac_maskrcnn.modeling.heads.instance_heads"])
    stamp.write_text(json.dumps({"env": "tf", "inputs": inputs, "python": sys.version.split()[0]}))
    say(f"{TF_ENV.name} ready in {time.time() - t0:.0f}s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--xla", action="store_true", help="set up .venv-xla (torch-xla) instead of .venv")
    ap.add_argument("--tf", action="store_true", help="set up .venv-tf (the TF reference, make parity)")
    ap.add_argument("--force", action="store_true", help="redo every step even if the stamp matches")
    args = ap.parse_args()
    try:
        if args.tf:
            setup_tf(force=args.force)
        else:
            setup("xla" if args.xla else "main", force=args.force)
    except SetupError as e:
        print(f"[setup] ERROR: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("[setup] interrupted; run the same command again to finish.", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()

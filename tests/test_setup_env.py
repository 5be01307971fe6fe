"""tools/setup_env.py's failure modes: they stop with a clear message and leave nothing half-made."""
import hashlib
import importlib.util
import os
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("setup_env", os.path.join(ROOT, "tools", "setup_env.py"))
setup_env = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup_env)


@pytest.fixture
def fake_index(tmp_path, monkeypatch):
    """A file:// package index serving a pb1-detectron2 sdist with the wrong contents."""
    index = tmp_path / "simple"
    page = index / "pb1-detectron2"
    page.mkdir(parents=True)
    (page / "pb1-detectron2-0.6.tar.gz").write_bytes(b"not the real sdist")
    (page / "index.html").write_text('<a href="pb1-detectron2-0.6.tar.gz#sha256=00">pb1-detectron2-0.6.tar.gz</a>')
    monkeypatch.setenv("PIP_INDEX_URL", f"file://{index}")
    monkeypatch.setattr(setup_env, "DEPS", tmp_path / "deps")
    return tmp_path


def test_wrong_sha256_stops_and_deletes_the_download(fake_index, monkeypatch):
    # urllib reads a file:// folder URL as a directory listing: point the page at index.html.
    real_urlopen = setup_env.urllib.request.urlopen
    monkeypatch.setattr(
        setup_env.urllib.request, "urlopen",
        lambda url, timeout: real_urlopen(url + "index.html" if url.endswith("/") else url, timeout=timeout),
    )
    with pytest.raises(setup_env.SetupError) as err:
        setup_env.fetch_d2_sdist()
    got = hashlib.sha256(b"not the real sdist").hexdigest()
    assert f"has sha256 {got}, expected {setup_env.D2_SDIST_SHA256}" in str(err.value)
    assert "nothing was installed" in str(err.value)
    assert not any((fake_index / "deps").iterdir())


def test_unreachable_index_stops_quickly_and_names_the_index(monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # discard port: refused at once
    start = time.time()
    with pytest.raises(setup_env.SetupError, match=r"127\.0\.0\.1:9/simple is not reachable.*PIP_INDEX_URL"):
        setup_env.check_index(timeout=5)
    assert time.time() - start < 10


def test_unknown_route_is_refused(monkeypatch):
    monkeypatch.setenv("D2_SOURCE", "conda")
    with pytest.raises(setup_env.SetupError, match="D2_SOURCE='conda'.*auto, git, sdist or skip"):
        setup_env.choose_d2_route()


def test_auto_route_gives_up_on_github_within_seconds(monkeypatch):
    monkeypatch.setenv("D2_SOURCE", "auto")
    monkeypatch.setattr(setup_env.socket, "create_connection", _refuse)
    start = time.time()
    assert setup_env.choose_d2_route() == "sdist"
    assert time.time() - start < 5


def _refuse(address, timeout):
    raise OSError("network is unreachable")

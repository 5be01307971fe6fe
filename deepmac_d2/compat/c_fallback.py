"""Serve ``detectron2._C`` from the ``detectron2_c`` folder beside this file
when the compiled module is missing.

Detectron2 v0.6 imports ``detectron2._C`` at import time in four modules, so a
stand-in must be in place before the first ``import detectron2.*``, whatever
the user imports first. The set-up script writes a ``.pth`` file that loads
this file by path and calls :func:`install` at interpreter start; importing
``deepmac_d2`` calls it too. The finder sits at the end of ``sys.meta_path``,
so a real compiled ``_C`` (found by the normal path finder first) always wins.

This file is loaded by path, outside the ``deepmac_d2`` package: importing
the package would import Detectron2 at every interpreter start, and from
inside Detectron2's own import of ``_C``. For the same reason the stand-in is
loaded as the package ``detectron2._C`` itself, with only relative imports.
"""
import importlib.util
import os
import sys

_TARGET = "detectron2._C"
_STANDIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "detectron2_c")


class FallbackFinder:
    """A meta-path finder that answers only for ``detectron2._C``."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        if fullname != _TARGET:
            return None
        return importlib.util.spec_from_file_location(
            _TARGET, os.path.join(_STANDIN, "__init__.py"), submodule_search_locations=[_STANDIN]
        )


def install():
    """Register the fallback finder once per process (safe to call again)."""
    if not any(getattr(f, "__name__", None) == "FallbackFinder" for f in sys.meta_path):
        sys.meta_path.append(FallbackFinder)


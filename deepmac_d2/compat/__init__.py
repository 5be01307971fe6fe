"""What the plugin needs from an installed Detectron2 that may lack parts.

Detectron2 v0.6 from its PyPI sdist has no compiled ``detectron2._C``;
:mod:`.c_fallback` supplies a pure-PyTorch one, only where the real one is absent.
Imported first, before anything imports Detectron2; imports nothing of the plugin.
"""
from .c_fallback import install as install_c_fallback


def using_c_fallback():
    """True when this process's ``detectron2._C`` is deepmac-d2's pure-PyTorch stand-in."""
    import detectron2._C

    return getattr(detectron2._C, "IS_DEEPMAC_FALLBACK", False)


__all__ = ["install_c_fallback", "using_c_fallback"]

"""Packed storage and the mixed-bitwidth kernels. Nothing here touches a GPU or imports Triton at import time.

This folder installs as ``bitalloc.kernels``. A Python started in the repository's root (``python -c``,
``python -m pytest``) also finds it as a top-level ``kernels``, the name of Hugging Face's package, which
transformers (5.25 on) imports: then the installed package takes the name back, below.
"""
if __name__ == "kernels":
    import importlib
    import sys
    from pathlib import Path

    _here = Path(__file__).resolve().parent.parent
    _saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    del sys.modules["kernels"]
    try:
        importlib.import_module("kernels")          # Hugging Face's, from site-packages; it replaces this module
    except ImportError:
        sys.modules.pop("kernels", None)            # not installed: nothing may take the name from this folder
        raise
    finally:
        sys.path[:] = _saved

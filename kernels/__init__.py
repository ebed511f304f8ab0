"""Triton kernels for packed training, imported as ``soulchat.kernels``.

This folder sits at the top of the repository by the user's wish, so wherever the repository root is on
``sys.path`` (``python -m ...`` run from the root puts it first) Python would also find it under the bare
name ``kernels`` — the name of Hugging Face's kernel hub package, which transformers >= 5.25 depends on and
imports. When this file is executed under that bare name it steps aside: it imports the ``kernels``
package found on the rest of ``sys.path`` and leaves that module in ``sys.modules`` (Python returns
whatever a package's ``__init__`` leaves there under its name). With none installed it leaves what Python
itself makes of a folder without ``__init__.py``: an empty namespace package with no ``__file__``, which
transformers reads as "not installed". Nothing in soulchat imports the bare name.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:  # not installed
        _spec = importlib.machinery.ModuleSpec("kernels", None, is_package=True)
        _spec.submodule_search_locations = []
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    try:
        if _spec.loader is not None:
            _spec.loader.exec_module(_module)
    except BaseException:
        del sys.modules["kernels"]
        raise

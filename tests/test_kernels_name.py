"""The top-level ``kernels/`` folder never shadows the installed package named ``kernels``.

``python -m ...`` run from the repository root puts the root first on ``sys.path``, where Python finds our
``kernels/`` folder under the bare name ``kernels``: the name of Hugging Face's kernel hub package, which
transformers >= 5.25 depends on and imports from ``transformers.modeling_utils``. Every check runs in a
fresh interpreter whose working directory is the repository root, as a user's command would.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code_or_args: str | list[str], env_extra: dict[str, str] | None = None) -> str:
    args = [sys.executable, "-c", code_or_args] if isinstance(code_or_args, str) else [sys.executable, *code_or_args]
    env = {**os.environ, **(env_extra or {})}
    env.pop("PYTHONSAFEPATH", None)  # the user's default: the working directory is on sys.path
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


@pytest.fixture
def stand_in_site(tmp_path) -> Path:
    """A site directory holding an installed distribution named ``kernels`` (a stand-in for the real one)."""
    package = tmp_path / "site" / "kernels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("STAND_IN = 'installed kernels'\n")
    (package / "layers.py").write_text("NAME = 'kernels.layers'\n")
    info = tmp_path / "site" / "kernels-0.19.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.19.1\n")
    return tmp_path / "site"


def test_kernels_bare_name_resolves_to_the_installed_package(stand_in_site):
    out = _run(
        textwrap.dedent(
            """
            import kernels, kernels.layers, soulchat.kernels.dispatch as ours
            print(kernels.STAND_IN)
            print(kernels.layers.NAME)
            print(ours.__name__, ours.triton_usable.__module__)
            """
        ),
        {"PYTHONPATH": str(stand_in_site)},
    )
    assert out.split("\n")[:3] == [
        "installed kernels",
        "kernels.layers",
        "soulchat.kernels.dispatch soulchat.kernels.dispatch",
    ]


def test_kernels_bare_name_without_an_installed_package_is_an_empty_namespace():
    """With no package named ``kernels`` elsewhere, Python's own answer for a folder without ``__init__``."""
    out = _run(
        textwrap.dedent(
            """
            import sys
            sys.path = [p for p in sys.path if "-packages" not in p]  # nothing installed is visible
            import kernels
            print(getattr(kernels, "__file__", None), list(kernels.__path__))
            try:
                import kernels.varlen_attention
            except ImportError:
                print("no kernels.varlen_attention")
            """
        )
    )
    assert out.split("\n")[:2] == ["None []", "no kernels.varlen_attention"]


def test_kernels_transformers_imports_and_train_help_from_the_repository_root():
    """The issue's failure: transformers' hub-kernel integration importing our folder from the root."""
    try:
        installed = importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    out = _run(
        textwrap.dedent(
            """
            import transformers.modeling_utils
            import soulchat.model, soulchat.train
            import kernels
            print(getattr(kernels, "__file__", None))
            """
        )
    )
    where = out.strip().splitlines()[-1]
    if installed is None:
        assert where == "None"
    else:  # the real package (transformers >= 5.25 depends on it)
        assert "-packages" in where and Path(where).parent.name == "kernels", where
        assert Path(where).resolve().parent != ROOT / "kernels"
    help_text = _run(["-m", "soulchat.train", "--help"])
    assert "--output-dir" in help_text and "--steps" in help_text

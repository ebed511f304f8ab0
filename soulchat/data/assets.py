"""The files bundled with the package (sample corpus, tiny tokenizer) and tokenizer loading.

Every other module asks here for the bundled paths and for a tokenizer, so where the assets live and how
a tokenizer directory is opened (locally, never downloading) is decided once.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any


def assets_dir() -> Path:
    """soulchat/assets/ of the installed package."""
    return Path(str(resources.files("soulchat") / "assets"))


def default_corpus_path() -> Path:
    """The sample corpus shipped with the package (soulchat/assets/sample_corpus.json)."""
    return assets_dir() / "sample_corpus.json"


def default_tokenizer_path() -> Path:
    """The tiny tokenizer shipped with the package (soulchat/assets/tokenizer/)."""
    return assets_dir() / "tokenizer"


MIN_VOCABULARY = 16  # no real tokenizer has fewer; an empty one built from nothing has 0-1


def load_tokenizer(tokenizer: Any = None, *, model: str | os.PathLike | None = None,
                   trust_remote_code: bool = False):
    """A tokenizer from an object (returned as is), a local directory, or the bundled one; never downloads.

    tokenizer: a tokenizer object, a tokenizer directory (--tokenizer) or a Hugging Face name already in
    the local cache. model: the model directory, used when ``tokenizer`` is None (--model). Both None:
    the bundled tokenizer. Errors name the flag: FileNotFoundError for a missing directory,
    NotADirectoryError for a file, ValueError when the directory holds no loadable tokenizer.
    """
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    if tokenizer is not None:
        source, what, flag = tokenizer, "tokenizer directory", "--tokenizer"
    elif model is not None:
        source, what, flag = model, "model directory", "--model"
    else:
        source, what, flag = default_tokenizer_path(), "the bundled tokenizer", "(bundled tokenizer)"
    path = Path(source).expanduser()
    from transformers import AutoTokenizer

    if path.is_file():
        raise NotADirectoryError(
            f"{what} {path} is a file: {flag} must be a directory with tokenizer.json + tokenizer_config.json"
        )
    if not path.exists():
        try:  # a hub name already in the local cache; never downloads
            return AutoTokenizer.from_pretrained(str(source), local_files_only=True,
                                                 trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"{what} {path} does not exist: {flag} must be a local directory (tokenizer.json + "
                "tokenizer_config.json); nothing is downloaded"
            ) from err
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"could not load a tokenizer from {path} ({flag}): {err}. The directory needs the tokenizer "
            "files (tokenizer.json or the model's vocabulary files); pass --tokenizer DIR to use another"
        ) from err
    if len(tok) < MIN_VOCABULARY:
        # transformers 5 builds an (almost) empty tokenizer from a directory without tokenizer files
        # rather than failing: every text would then encode to the same id and train on nothing.
        raise ValueError(
            f"{what} {path} ({flag}) has no usable tokenizer (a vocabulary of {len(tok)} tokens: its "
            "tokenizer files are missing); copy tokenizer.json + tokenizer_config.json there or pass "
            "--tokenizer DIR"
        )
    return tok

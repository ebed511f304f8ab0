"""Command line for the data pipeline.

    python -m soulchat.data prepare [--data PATH ...] [--tokenizer DIR] [--cache-dir DIR] [--config FILE]
                                    [every data option of `python -m soulchat.train`] [--seed N] [--force]
    python -m soulchat.data synth --dialogues N --out FILE [--seed N]

Without --data / --tokenizer, prepare uses the sample corpus and tokenizer bundled with the package. The
options are the training command's (soulchat.options): the same names, defaults and checks, so a store
prepared here is the one `train` finds in its cache with the same options. With --eval-fraction F
(default 0.05), a fraction F of the conversations (chosen by a hash of their id and --eval-seed) is held
out: packed into <cache-dir>/eval and written to <cache-dir>/heldout.json for
`python -m soulchat.evaluate --data`. --workers N renders and tokenizes in N processes (the output does
not depend on N). `--out` still names the cache directory.
"""

from __future__ import annotations

import argparse
import sys

from soulchat.cli import exit_on_option_error, run_cli
from soulchat.commandline import Command, OptionParser, Section
from soulchat.options import DataConfig, ModelConfig, PrepareConfig, TrainConfig

PREPARE = Command(
    "python -m soulchat.data prepare",
    "Read, render, tokenize and pack a corpus into a cached store.",
    [
        Section(ModelConfig, only=("tokenizer",)),
        Section(DataConfig, aliases={"cache_dir": ("--out",)}),
        Section(TrainConfig, only=("seed", "progress")),
        PrepareConfig,
    ],
)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OptionParser(prog="python -m soulchat.data", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help=PREPARE.description, description=PREPARE.description)
    PREPARE.add_arguments(p)
    s = sub.add_parser("synth", help="write synthetic SoulChatCorpus-shaped dialogues (a JSON array)")
    s.add_argument("--dialogues", type=_positive, required=True, help="number of dialogues")
    s.add_argument("--out", required=True, metavar="FILE", help="output .json file")
    s.add_argument("--seed", type=int, default=0, help="generator seed")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0, or 2 after one line on stderr (bad options exit with SystemExit(2) as argparse does)."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    argv = PREPARE.normalize_argv(argv)
    args = exit_on_option_error(lambda: build_parser().parse_args(argv), argv)
    if args.command == "synth":
        from soulchat.data.synth import write_synthetic

        size = write_synthetic(args.out, args.dialogues, seed=args.seed)
        print(f"wrote {args.dialogues:,} dialogues to {args.out} ({size / 2**20:.1f} MiB)")
        return 0

    options = exit_on_option_error(lambda: PREPARE.from_namespace(args), argv)
    from soulchat.data.pipeline import prepare

    store = prepare(
        options["data"], options["model"].tokenizer,
        seed=options["train"].seed, force=options["prepare"].force, progress=options["train"].progress,
    )  # fmt: skip
    print(f"store: {store.path} ({len(store):,} rows)")
    if store.heldout is not None:
        print(f"held out: {store.heldout.path} ({len(store.heldout):,} rows), conversations in "
              f"{store.heldout_path} (python -m soulchat.evaluate --data {store.heldout_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

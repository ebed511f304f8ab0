"""Command line for the data pipeline.

    python -m soulchat.data prepare [--data PATH ...] [--tokenizer DIR] [--template auto|soulchat|chatml]
                                    [--max-length N] [--row-size N] [--out DIR] [--format F]
                                    [--on-error raise|skip] [--overflow split|drop]
                                    [--loss-weighting token|turn|conversation] [--seed N] [--force]
                                    [--eval-fraction F] [--eval-seed N] [--workers N]
    python -m soulchat.data synth --dialogues N --out FILE [--seed N]

Without --data / --tokenizer, prepare uses the sample corpus and tokenizer bundled with the package.
With --eval-fraction F, a fraction F of the conversations (chosen by a hash of their id and --eval-seed)
is held out: packed into OUT/eval and written to OUT/heldout.json for `python -m soulchat.evaluate --data`.
--workers N renders and tokenizes in N processes (the output does not depend on N).
"""

from __future__ import annotations

import argparse
import sys

from soulchat.config import DataConfig
from soulchat.data.pipeline import DEFAULT_MAX_LENGTH, DEFAULT_OUT


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from soulchat.data.readers import FORMATS
    from soulchat.data.render import LOSS_WEIGHTING, OVERFLOW, TEMPLATES

    parser = argparse.ArgumentParser(prog="python -m soulchat.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="read, render, tokenize and pack a corpus into a cached store")
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="corpus files or directories (default: the bundled sample corpus)")
    p.add_argument("--tokenizer", metavar="DIR", help="local tokenizer directory (default: the bundled one)")
    p.add_argument("--template", choices=TEMPLATES,
                   help="conversation template (default: auto if the tokenizer has a chat template, "
                   "else soulchat)")
    p.add_argument("--max-length", type=_positive, default=DEFAULT_MAX_LENGTH,
                   help="longest sequence in tokens; longer conversations are split or dropped (--overflow)")
    p.add_argument("--row-size", type=_positive, help="packed row length in tokens (default: --max-length)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="cache directory (default: %(default)s)")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS),
                   help="input format (default: detected per file)")
    p.add_argument("--on-error", default="raise", choices=("raise", "skip"),
                   help="bad record: stop with an error, or skip it and count it by reason")
    p.add_argument("--overflow", default="split", choices=OVERFLOW,
                   help="over-long conversation: split at turn boundaries into windows, or drop it")
    p.add_argument("--loss-weighting", default="token", choices=LOSS_WEIGHTING,
                   help="per token 1; per counselor turn summing to 1; or per conversation summing to 1")
    p.add_argument("--counselor-role", action="append", default=[], metavar="NAME",
                   help="extra raw role name meaning the counselor (repeatable)")
    p.add_argument("--client-role", action="append", default=[], metavar="NAME",
                   help="extra raw role name meaning the client (repeatable)")
    p.add_argument("--columns", metavar="FIELD=COLUMN,...",
                   help="record fields under other names (messages, role, content, id, topic), e.g. "
                   "messages=conversations,role=from,content=value")
    p.add_argument("--seed", type=int, default=0, help="seed of the row shuffle")
    p.add_argument("--eval-fraction", type=_fraction, default=DataConfig.eval_fraction, metavar="F",
                   help="hold out this fraction of the conversations, whole (all windows of a split one), "
                   "into OUT/eval and OUT/heldout.json (default: %(default)s; 0: none)")
    p.add_argument("--eval-seed", type=int, default=0, metavar="N",
                   help="seed of the held-out choice (a hash of seed and conversation id; default: 0)")
    p.add_argument("--workers", type=_positive, metavar="N",
                   help="processes that render and tokenize; 1 renders in-process; the output is the same "
                   "for every N (default: min(8, CPUs); in-process for corpora under ~2,000 conversations)")
    p.add_argument("--force", action="store_true", help="rebuild even when the cache matches")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("synth", help="write synthetic SoulChatCorpus-shaped dialogues (a JSON array)")
    s.add_argument("--dialogues", type=_positive, required=True, help="number of dialogues")
    s.add_argument("--out", required=True, metavar="FILE", help="output .json file")
    s.add_argument("--seed", type=int, default=0, help="generator seed")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "synth":
        from soulchat.data.synth import write_synthetic

        size = write_synthetic(args.out, args.dialogues, seed=args.seed)
        print(f"wrote {args.dialogues:,} dialogues to {args.out} ({size / 2**20:.1f} MiB)")
        return 0

    from soulchat.config import ConfigError
    from soulchat.data.conversation import DataError
    from soulchat.data.pipeline import default_template, load_tokenizer, prepare

    try:
        tokenizer = load_tokenizer(args.tokenizer)
        options = DataConfig(
            template=args.template or default_template(tokenizer), max_length=args.max_length,
            row_size=args.row_size, format=args.format, on_error=args.on_error, overflow=args.overflow,
            loss_weighting=args.loss_weighting, eval_fraction=args.eval_fraction, eval_seed=args.eval_seed,
            workers=args.workers, counselor_role=args.counselor_role, client_role=args.client_role,
            columns=args.columns,
        )
        store = prepare(args.data, tokenizer, args.out, options, seed=args.seed, force=args.force,
                        progress=not args.no_progress)
    except (ConfigError, DataError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"store: {store.path} ({len(store):,} rows)")
    if store.heldout is not None:
        print(f"held out: {store.heldout.path} ({len(store.heldout):,} rows), conversations in "
              f"{store.heldout_path} (python -m soulchat.evaluate --data {store.heldout_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The report of prepare(): every conversation accounted for, per side, as a dict and as a table.

The report (printed as a table, stored in meta.json and report.json) accounts for every conversation:
``conversations_read == conversations_trained + sum(dropped.values())`` is checked before anything is
written. Conversation counts (read, trained, dropped, split) cover both sides of a held-out split and
``conversations_trained == train + held-out``; the sequence/token/row figures at the top level describe
the training store that prepare() returns; ``report["train"]`` and ``report["heldout"]`` hold the same
figures per side.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from soulchat.data.store import HELDOUT_DIR, HELDOUT_FILE


def format_report(report: dict[str, Any]) -> str:
    """The report as a short two-column table."""
    heldout = report.get("heldout")
    trained = f"{report['conversations_trained']:,}"
    if heldout:
        trained += f" (train {report['train']['conversations']:,} + held-out {heldout['conversations']:,})"
    rows: list[tuple[str, str]] = [
        ("conversations read", f"{report['conversations_read']:,}"),
        ("  trained", trained),
        ("  split (-> windows)", f"{report['conversations_split']:,} (-> {report['windows']:,})"),
        ("  dropped", f"{report['conversations_dropped']:,}"),
    ]
    for reason, n in sorted(report["dropped"].items(), key=lambda kv: -kv[1]):
        rows.append((f"    {reason}", f"{n:,}"))
    if report.get("shards_missing"):
        missing = f"{report['shards_missing']:,}"
        rows.append(("  whole shards missing (not read, conversations unknown)", missing))
    for warning, n in sorted(report.get("warnings", {}).items()):
        rows.append((f"  warning: {warning} (trained)", f"{n:,}"))
    if "render_mode" in report:  # stores written before render modes existed lack it
        rows.append(("render mode", _render_mode_row(report)))
    if report.get("samples_shortened"):
        rows.append(("per-turn samples shortened (context cut)", f"{report['samples_shortened']:,}"))
    if report.get("counselor_turns_dropped"):
        rows.append(("counselor turns dropped (too long)", f"{report['counselor_turns_dropped']:,}"))
    rows += [
        ("sequences", f"{report['sequences']:,}"),
        ("tokens", f"{report['tokens']:,}"),
        ("  counselor (trained) tokens", f"{report['trained_tokens']:,} ({report['trained_fraction']:.1%})"),
        ("rows", f"{report['rows']:,} x {report['row_size']} tokens "
                 f"(lower bound {report['rows_lower_bound']:,})"),
        ("fill efficiency", f"{report['fill_efficiency']:.2%} "
                            f"(rows vs lower bound {report['packing_efficiency']:.2%})"),
    ]
    if heldout:
        rows += [
            (f"held out (fraction {report['eval_fraction']:g}, seed {report['eval_seed']})",
             f"{heldout['conversations']:,} conversations -> {HELDOUT_FILE}, {HELDOUT_DIR}/"),
            ("  sequences", f"{heldout['sequences']:,} ({heldout['conversations_split']:,} split)"),
            ("  tokens", f"{heldout['tokens']:,} ({heldout['trained_tokens']:,} counselor)"),
            ("  rows", f"{heldout['rows']:,} (fill {heldout['fill_efficiency']:.2%})"),
        ]
    rows.append(("time", f"{report['seconds']:.1f} s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _render_mode_row(report: dict[str, Any]) -> str:
    ratio = report["per_turn_token_ratio"]
    if report["render_mode"] == "per-turn":
        return f"per-turn ({ratio:.2f}x the tokens of whole conversations)"
    return f"conversation (per-turn would take {ratio:.2f}x the tokens)"


def part_report(stats: Counter, tokens_in_store: int, rows: int, row_size: int, part: str) -> dict[str, Any]:
    """Figures of one side (training or held-out) from its render counters and its packed store."""
    tokens = int(stats["tokens"])
    if tokens != tokens_in_store:
        raise RuntimeError(
            f"token accounting is off ({part}): render counted {tokens}, the store holds {tokens_in_store}"
        )
    trained_tokens = int(stats["trained_tokens"])
    lower_bound = -(-tokens // row_size)
    return {
        "conversations": int(stats["trained"]),
        "conversations_split": int(stats["split"]),
        "windows": int(stats["windows"]),
        "sequences": int(stats["sequences"]),
        "tokens": tokens,
        "trained_tokens": trained_tokens,
        "trained_fraction": trained_tokens / tokens if tokens else 0.0,
        "rows": int(rows),
        "rows_lower_bound": int(lower_bound),
        "fill_efficiency": tokens / (rows * row_size) if rows else 0.0,
        "packing_efficiency": lower_bound / rows if rows else 1.0,
    }


@dataclass
class BuildCounts:
    """What one build counted, by the pipeline's stages; ``report()`` is the whole report, checked.

    ``stats``: the render counters of both sides together; ``train``/``heldout``: ``part_report`` of each
    side (``heldout`` None without a split).
    """

    read: int  # records seen by the readers, kept or dropped
    reader_drops: Counter  # records the readers dropped, by reason
    stats: Counter
    train: dict[str, Any]
    heldout: dict[str, Any] | None
    row_size: int
    eval_fraction: float
    eval_seed: int | None  # None without a split
    seconds: float
    reader_notes: Counter | None = None  # kept records the readers warn about
    render_mode: str = "conversation"  # the mode used

    def report(self) -> dict[str, Any]:
        read, stats, train, heldout = self.read, self.stats, self.train, self.heldout
        dropped: Counter = Counter({f"read:{reason}": n for reason, n in self.reader_drops.items()})
        for key, n in stats.items():
            if key.startswith("dropped:") and n:
                dropped[f"render:{key.split(':', 1)[1]}"] += n
        trained = int(stats["trained"])
        n_heldout = heldout["conversations"] if heldout else 0
        report = {
            # Conversations: both sides together.
            "conversations_read": int(read),
            "conversations_trained": trained,
            "conversations_heldout": n_heldout,
            "conversations_dropped": int(sum(dropped.values())),
            "dropped": dict(sorted(dropped.items())),
            "conversations_split": int(stats["split"]),
            "windows": int(stats["windows"]),
            "counselor_turns_dropped": int(stats["turns_dropped:turn_too_long"]),
            "straddling_tokens": int(stats["straddling_tokens"]),
            # The render mode used, and what per-turn samples cost against whole conversations: tokens of
            # the per-turn samples / tokens of the conversations (measured in per-turn mode, counted from
            # the whole renders in conversation mode), over the trained conversations of both sides.
            "render_mode": self.render_mode,
            "per_turn_tokens": int(stats["per_turn_tokens"]),
            "conversation_tokens": int(stats["conversation_tokens"]),
            "per_turn_token_ratio": (stats["per_turn_tokens"] / stats["conversation_tokens"]
                                     if stats["conversation_tokens"] else 0.0),
            "samples_shortened": int(stats["samples_shortened"]),
            # Kept and trained, but worth a look: e.g. read:duplicate_record, exact repeats of a record.
            "warnings": {f"read:{k}": int(n) for k, n in sorted((self.reader_notes or {}).items())
                         if n and k != "missing_shard"},
            # save_to_disk shards listed in state.json but absent (--on-error skip): their conversations
            # cannot be counted, the shards are.
            "shards_missing": int((self.reader_notes or {}).get("missing_shard", 0)),
            # Sequences, tokens, rows: the training store (the one prepare() returns), as without a split.
            **{k: train[k] for k in ("sequences", "tokens", "trained_tokens", "trained_fraction", "rows")},
            "row_size": int(self.row_size),
            **{k: train[k] for k in ("rows_lower_bound", "fill_efficiency", "packing_efficiency")},
            "eval_fraction": self.eval_fraction,
            "eval_seed": self.eval_seed,
            "train": train,
            "heldout": heldout,
            "seconds": self.seconds,
        }
        # Every conversation read is accounted for exactly once, and every kept one sits on one side.
        if report["conversations_read"] != trained + report["conversations_dropped"]:
            raise RuntimeError(
                f"conversation accounting is off: read {read} != trained {trained} + dropped "
                f"{report['conversations_dropped']} ({dict(dropped)}); this is a bug, please report it"
            )
        if trained != train["conversations"] + n_heldout:
            raise RuntimeError(
                f"split accounting is off: trained {trained} != train {train['conversations']} + held-out "
                f"{n_heldout}; this is a bug, please report it"
            )
        if int(stats["tokens"]) != train["tokens"] + (heldout["tokens"] if heldout else 0):
            raise RuntimeError(f"token accounting is off: render counted {stats['tokens']} over both sides")
        return report

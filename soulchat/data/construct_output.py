"""construct's output files: the dialogues written (``--out``) and the records rejected
(``<out>.rejected.jsonl``), both appended one flushed line at a time; resuming from them (a last line cut
by a kill is dropped, the ids already done are skipped), the duplicate index over the dialogues written,
one run at a time per ``--out`` (a lock file), and their totals for the report."""

from __future__ import annotations

import fcntl
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from soulchat.data.construct_generation import Attempted


def rejected_path(out: Path) -> Path:
    return out.with_name(out.name + ".rejected.jsonl")


def _read_done(path: Path, counts: Counter, kind: str) -> Iterator[dict[str, Any]]:
    """The records of an output file of an earlier run; a last line cut by a kill is removed first."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        f.seek(0, 2)
        size = f.tell()
        if size:
            f.seek(max(0, size - 1))
            if f.read(1) != b"\n":  # the last record was being written when the run died
                f.seek(0)
                data_end = 0
                for line in f:
                    if line.endswith(b"\n"):
                        data_end += len(line)
                f.truncate(data_end)
                counts[f"{kind}_partial_line_dropped"] += 1
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                rec = None
            if not isinstance(rec, dict) or not isinstance(rec.get("source_id"), str):
                raise ValueError(
                    f"{path}:{lineno}: not a construct record (malformed JSON or no source_id): the file was "
                    "edited or is not construct's output; fix or remove that line, or write to a new --out"
                )
            yield rec


def _messages_to_turns(messages: list[dict[str, str]]):
    from soulchat.data.conversation import Turn

    return [Turn("client" if m["role"] == "user" else "counselor", m["content"]) for m in messages]


class Output:
    """The two output files, the ids already done, and the duplicate index over written dialogues."""

    def __init__(self, out: Path, threshold: float, counts: Counter) -> None:
        from soulchat.data.construct_screen import DedupIndex

        out.parent.mkdir(parents=True, exist_ok=True)
        self.lock = open(out.with_name(out.name + ".lock"), "w")  # noqa: SIM115 (held for the run)
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"--out {out}: another construct run is writing it; wait for it or pick another --out") from None
        self.out, self.rejected = out, rejected_path(out)
        self.dedup = DedupIndex(threshold)
        self.held: list[Attempted] = []  # request failures not yet written (see construct._run_chunk)
        self.done: dict[str, str] = {}
        for rec in _read_done(out, counts, "written"):
            self._mark(rec["source_id"], "written", out)
            turns = _messages_to_turns(rec["messages"])
            key, sig = self.dedup.check(turns)[1:]
            self.dedup.add(key, sig, turns)
        for rec in _read_done(self.rejected, counts, "rejected"):
            self._mark(rec["source_id"], "rejected", self.rejected)
        self.f_out = open(out, "a", encoding="utf-8")  # noqa: SIM115
        self.f_rej = open(self.rejected, "a", encoding="utf-8")  # noqa: SIM115

    def _mark(self, source_id: str, kind: str, path: Path) -> None:
        if source_id in self.done:
            raise ValueError(f"{path}: source id {source_id!r} appears twice in the output files ({self.done[source_id]} "
                             "and " + kind + "); remove one of the lines")  # fmt: skip
        self.done[source_id] = kind

    @staticmethod
    def _append(f, rec: dict[str, Any]) -> None:
        # One write of one whole line, flushed: a kill leaves at most the last line cut (dropped on resume).
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()

    def write(self, rec: dict[str, Any]) -> None:
        self._append(self.f_out, rec)
        self.done[rec["source_id"]] = "written"

    def reject(self, source_id: str, reason: str, detail: str = "", attempts: int = 0,
               generation: str | None = None) -> None:  # fmt: skip
        rec = {"source_id": source_id, "reason": reason, "detail": detail, "attempts": attempts}
        if generation is not None:
            rec["generation"] = generation[:4000]
        self._append(self.f_rej, rec)
        self.done[source_id] = "rejected"

    def close(self) -> None:
        import os

        for f in (self.f_out, self.f_rej):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        self.lock.close()

    def totals(self) -> dict[str, Any]:
        reasons: Counter = Counter()
        written = 0
        for rec in _read_done(self.out, Counter(), "written"):
            written += 1
        for rec in _read_done(self.rejected, Counter(), "rejected"):
            reasons[rec["reason"]] += 1
        return {"written": written, "rejected": sum(reasons.values()), "rejected_by_reason": dict(sorted(reasons.items()))}

"""Writing conversations back as a SoulChatCorpus JSON array (the held-out set, heldout.json)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from soulchat.data.chat_template import CANONICAL_ROLE


class ConversationJsonWriter:
    """Streams conversations into a SoulChatCorpus-format JSON array (read back by the "soulchat" reader).

    Record: ``{"id", "topic", "messages": [{"role": "system"|"user"|"assistant", "content"}]}``, the
    conversation exactly as read (ids are strings; trailing client turns are kept).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self._file = open(path, "w", encoding="utf-8")
        self._file.write("[")

    def add(self, conv) -> None:
        record = {
            "id": conv.id,
            "topic": conv.topic,
            "messages": [{"role": CANONICAL_ROLE[t.role], "content": t.text} for t in conv.turns],
        }
        sep = "\n" if self.count == 0 else ",\n"
        try:
            self._file.write(sep + json.dumps(record, ensure_ascii=False))
        except UnicodeEncodeError:  # a lone surrogate (from a "\ud800" escape): keep it as an escape
            self._file.write(sep + json.dumps(record))
        self.count += 1

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.write("\n]\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()

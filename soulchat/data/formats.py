"""The supported formats: each record shape -> a Conversation (roles mapped, not yet validated), and
which format a file holds.

- "soulchat"  SoulChatCorpus: ``{"id", "topic", "messages": [{"role": "user"|"assistant", "content"}]}``
- "openai"    ``{"messages": [{"role": "system"|"user"|"assistant", "content"}]}``
- "sharegpt"  ``{"conversations": [{"from": "system"|"human"|"gpt", "value"}]}``
- "smile"     a list of ``{"role": "client"|"counselor", "content"}`` (or of strings ``"<role>：<text>"``),
              bare or under "messages" / "dialogue" / "conversation"
- "xtuner"    EmoLLM: ``{"conversation": [{"system"?, "input", "output"}, ...]}``
- "cpsycound" plain text: lines ``来访者：…`` / ``心理咨询师：…`` (ASCII ":" too), continuation lines join
              the previous turn, dialogues separated by blank lines (``iter_text_blocks``)

``--columns`` renames record fields first (``remap``). A record that does not fit its format raises
DataError naming the record, what is wrong and the fix.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Iterator

from soulchat.data.arrow import is_arrow_file, iter_arrow_records
from soulchat.data.conversation import (
    SKIP_HINT,
    THINK_OPEN,
    Conversation,
    DataError,
    RoleMap,
    Turn,
    join_reasoning,
)
from soulchat.data.json_stream import is_json_array, iter_json_array, iter_jsonl, iter_lines, open_binary
from soulchat.dataspec import FORMATS

SPEAKER = re.compile(r"^\s*([^\s:：]{1,16})\s*[:：]\s*(.*)$", re.DOTALL)  # "来访者：text" / "client: text"


# --------------------------------------------------------------------------------------------------
# cpsycound text: blank-line separated dialogues
# --------------------------------------------------------------------------------------------------


def iter_text_blocks(path: str) -> Iterator[tuple[int, list[str] | DataError]]:
    """Yield (first line number, lines) per blank-line separated block of a UTF-8 text file."""
    block: list[str] = []
    start = 0
    bad: DataError | None = None
    with open_binary(path) as f:
        for lineno, line_offset, raw in iter_lines(f):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if bad is None:
                    where = f"{path}:{lineno}"
                    bad = DataError(
                        f"{where}: non-UTF-8 byte at byte offset {line_offset + e.start}; re-encode the "
                        f"file as UTF-8 (e.g. iconv -f GB18030 -t UTF-8) {SKIP_HINT}",
                        reason="non_utf8",
                        where=where,
                    )
                line = "x"  # keeps the block open so the whole dialogue is dropped
            if lineno == 1:
                line = line.lstrip("\ufeff")
            line = line.rstrip("\r\n")
            if line.strip():
                if not block:
                    start = lineno
                block.append(line)
                continue
            if block:
                yield start, (bad if bad is not None else block)
            block, bad, start = [], None, 0
    if block:
        yield start, (bad if bad is not None else block)


# --------------------------------------------------------------------------------------------------
# Record -> Conversation
# --------------------------------------------------------------------------------------------------


def _text_of(value: object, where: str, j: int) -> str:
    """Message content as a string; OpenAI-style content part lists are joined."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""  # validation reports it as empty content
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        return "".join(str(p.get("text", "")) for p in value if p.get("type", "text") == "text")
    raise DataError(
        f"{where}: message {j} content is a {type(value).__name__}, expected a string; "
        f"fix the record {SKIP_HINT}",
        reason="bad_field",
        where=where,
    )


def turns_from_messages(messages: object, where: str, role_map: RoleMap, key: str) -> list[Turn]:
    """[{role|from, content|value}] or ["<role>：<text>"] -> turns (roles mapped, not yet validated)."""
    if not isinstance(messages, list):
        raise DataError(
            f"{where}: {key!r} must be a list of messages, found {type(messages).__name__}; fix the record "
            f"or pick the right --format {SKIP_HINT}",
            reason="bad_field",
            where=where,
        )
    lookup = role_map._lookup
    turns = []
    for m in messages:
        # Fast path: {"role": <exact mapped name>, "content": <str>} (every SoulChatCorpus message).
        try:
            role = lookup[m["role"]]
            text = m["content"]
            if type(text) is str and "reasoning_content" not in m:
                turns.append(Turn(role, text))
                continue
        except (KeyError, TypeError):
            pass
        turns.append(_turn_from_message(m, len(turns), where, role_map))
    return turns


def _turn_from_message(m: object, j: int, where: str, role_map: RoleMap) -> Turn:
    """Any accepted message shape -> Turn, or a DataError saying what is missing."""
    if type(m) is dict:
        raw = m.get("role")
        if raw is None:
            raw = m.get("from")
        text = m.get("content")
        if text is None:
            text = m.get("value")
        if raw is None or (text is None and "content" not in m and "value" not in m):
            missing = "'role' (or 'from')" if raw is None else "'content' (or 'value')"
            raise DataError(
                f"{where}: message {j} has no {missing} key; fix the record or pick the right --format "
                f"{SKIP_HINT}",
                reason="missing_field",
                where=where,
            )
    elif isinstance(m, str):
        match = SPEAKER.match(m)
        if match is None:
            raise DataError(
                f"{where}: message {j} is a string without a '<role>：' prefix; use "
                f"{{'role': ..., 'content': ...}} messages {SKIP_HINT}",
                reason="missing_field",
                where=where,
            )
        raw, text = match.group(1), match.group(2)
    else:
        raise DataError(
            f"{where}: message {j} is a {type(m).__name__}, expected an object with role and content; "
            f"fix the record {SKIP_HINT}",
            reason="bad_field",
            where=where,
        )
    role = role_map.canonical(raw, f"{where} message {j}")
    text = _text_of(text, where, j)
    reasoning = m.get("reasoning_content") if type(m) is dict else None
    if reasoning:
        text = _with_reasoning(reasoning, text, role, where, j)
    return Turn(role, text)


def _with_reasoning(reasoning: object, text: str, role: str, where: str, j: int) -> str:
    """A counselor message's ``reasoning_content`` joined to its content in the spelling turns carry
    (``<think>...</think>`` before the reply; the render layer trains it as --thinking says)."""
    problem = None
    if not isinstance(reasoning, str):
        problem = f"reasoning_content is a {type(reasoning).__name__}, expected a string"
    elif role != "counselor":
        problem = f"a {role} message has reasoning_content; only counselor replies carry reasoning"
    elif text.startswith(THINK_OPEN):
        problem = "has both reasoning_content and a <think> prefix in its content; keep one of the two"
    if problem is not None:
        raise DataError(f"{where}: message {j}: {problem}; fix the record {SKIP_HINT}",
                        reason="bad_reasoning", where=where)
    return join_reasoning(reasoning, text)


def _turns_from_xtuner(conversation: object, where: str) -> list[Turn]:
    if not isinstance(conversation, list):
        raise DataError(
            f"{where}: 'conversation' must be a list of {{'input', 'output'}} objects; "
            f"fix the record {SKIP_HINT}",
            reason="bad_field",
            where=where,
        )
    turns = []
    for j, step in enumerate(conversation):
        if not isinstance(step, dict) or "input" not in step or "output" not in step:
            raise DataError(
                f"{where}: conversation step {j} needs 'input' and 'output' keys; fix the record {SKIP_HINT}",
                reason="missing_field",
                where=where,
            )
        # The system prompt is taken from the first step; EmoLLM repeats it or omits it later. A later
        # step with a different one has no place in the conversation: refused, not dropped.
        system = step.get("system")
        if j == 0 and system:
            turns.append(Turn("system", _text_of(system, where, j)))
        elif system and (not turns or turns[0].role != "system" or turns[0].text != system):
            raise DataError(
                f"{where}: conversation step {j} has a 'system' prompt that differs from the first step's; "
                f"a system prompt may only open the conversation: move it to step 0 or delete it {SKIP_HINT}",
                reason="system_not_first",
                where=where,
            )
        turns.append(Turn("client", _text_of(step["input"], where, j)))
        turns.append(Turn("counselor", _text_of(step["output"], where, j)))
    return turns


def is_message(x: object) -> bool:
    """A single message (rather than a dialogue record): {"role"|"from": ...} or "<role>：<text>"."""
    if isinstance(x, dict):
        return ("role" in x or "from" in x) and ("content" in x or "value" in x)
    return isinstance(x, str) and SPEAKER.match(x) is not None


def remap(rec: object, columns: dict[str, str], where: str) -> object:
    """A record with its mapped columns renamed to the fields the readers know (--columns)."""
    if not isinstance(rec, dict):
        return rec
    out = dict(rec)
    for field in ("messages", "id", "topic"):
        column = columns.get(field)
        if column is None or column == field:
            continue
        if column not in out:
            if field != "messages":
                continue  # id and topic are optional
            raise DataError(
                f"{where}: record has no column {column!r} (--columns messages={column}); its keys are "
                f"{sorted(rec)[:8]} {SKIP_HINT}",
                reason="missing_field",
                where=where,
            )
        out[field] = out.pop(column)
    role, content = columns.get("role"), columns.get("content")
    messages = out.get("messages")
    if (role or content) and isinstance(messages, list):
        out["messages"] = [_remap_message(m, role, content) for m in messages]
    return out


def _remap_message(m: object, role: str | None, content: str | None) -> object:
    if not isinstance(m, dict):
        return m
    m = dict(m)
    if role and role in m:
        m["role"] = m.pop(role)
    if content and content in m:
        m["content"] = m.pop(content)
    return m


def _check_id_kind(rid: object, id_kinds: dict[str, str], where: str) -> None:
    """Ids are compared as text, so 12 and "12" would name one conversation (one side of the held-out
    split, one id in heldout.json): the second kind of the same spelling is refused."""
    kind = "string" if isinstance(rid, str) else type(rid).__name__
    first = id_kinds.setdefault(str(rid), kind)
    if first != kind:
        raise DataError(
            f"{where}: id {rid!r} ({kind}) reads the same as an earlier {first} id {str(rid)!r}; ids of "
            f"different JSON types must not share a spelling: give the records distinct ids {SKIP_HINT}",
            reason="id_type_clash",
            where=where,
        )


def record_to_conversation(
    rec: object, fmt: str, where: str, default_id: str, role_map: RoleMap,
    id_kinds: dict[str, str] | None = None, columns: dict[str, str] | None = None,
) -> Conversation:
    if columns:
        rec = remap(rec, columns, where)
    if fmt == "smile" and isinstance(rec, list):
        return Conversation(turns_from_messages(rec, where, role_map, "dialogue"), default_id, None, where)
    if not isinstance(rec, dict):
        raise DataError(
            f"{where}: expected a JSON object for --format {fmt}, found {type(rec).__name__}; fix the record "
            f"or pick the right --format {SKIP_HINT}",
            reason="bad_record_shape",
            where=where,
        )
    if fmt in ("soulchat", "openai"):
        key = "messages"
    elif fmt == "sharegpt":
        key = "conversations"
    elif fmt == "xtuner":
        key = "conversation"
    else:  # smile wrapped in an object
        key = next(
            (k for k in ("messages", "dialogue", "conversation", "conversations") if k in rec), "messages"
        )
    if key not in rec:
        raise DataError(
            f"{where}: record has no {key!r} key (keys: {sorted(rec)[:8]}); "
            f"pick the right --format or fix the "
            f"record {SKIP_HINT}",
            reason="missing_field",
            where=where,
        )
    if fmt == "xtuner":
        turns = _turns_from_xtuner(rec[key], where)
    else:
        turns = turns_from_messages(rec[key], where, role_map, key)
    rid = rec.get("id")
    topic = rec.get("topic")
    if isinstance(rid, (dict, list, bool)):
        # str() of these is no id: {"a": 1} and [1, 2] would name a conversation "{'a': 1}", true "True".
        kind = "boolean" if isinstance(rid, bool) else "JSON object" if isinstance(rid, dict) else "JSON array"
        raise DataError(
            f"{where}: id {json.dumps(rid, ensure_ascii=False)[:80]} is a {kind}; an id must be a string or "
            f"a number: fix the record {SKIP_HINT}",
            reason="bad_id",
            where=where,
        )
    if rid is not None and id_kinds is not None:
        _check_id_kind(rid, id_kinds, where)
    return Conversation(
        turns,
        default_id if rid is None else str(rid),
        topic if isinstance(topic, str) else None,
        where,
    )


def block_to_conversation(
    lines: list[str], path: str, start: int, index: int, role_map: RoleMap
) -> Conversation:
    """A cpsycound dialogue: speaker lines start a turn, other lines continue the previous turn."""
    lookup = role_map._lookup
    where = f"{path}:{start}"
    roles: list[str] = []
    texts: list[list[str]] = []
    for k, line in enumerate(lines):
        m = SPEAKER.match(line)
        role = lookup.get(m.group(1).strip().lower()) if m else None
        if role is not None:
            roles.append(role)
            texts.append([m.group(2).strip()])
        elif m and (guess := _close_speaker(m.group(1), lookup)):
            raise DataError(
                f"{path}:{start + k}: unknown speaker {m.group(1)!r} (did you mean {guess!r}?); a line "
                f"'<speaker>：' must name a known role, else its reply would join the previous turn. Fix "
                f"the label or add it to the RoleMap (--counselor-role / --client-role) {SKIP_HINT}",
                reason="unknown_speaker",
                where=f"{path}:{start + k}",
            )
        elif texts:
            texts[-1].append(line.strip())
        else:
            raise DataError(
                f"{path}:{start + k}: dialogue does not start with a known speaker (e.g. '来访者：' or "
                f"'心理咨询师：'), found {line[:30]!r}; add the speaker to the RoleMap or fix the text "
                f"{SKIP_HINT}",
                reason="unknown_role",
                where=f"{path}:{start + k}",
            )
    turns = [Turn(r, "\n".join(t).strip()) for r, t in zip(roles, texts, strict=True)]
    return Conversation(turns, f"{path}:{index}", None, where)


def _close_speaker(label: str, lookup: dict[str, str]) -> str | None:
    """The known role name ``label`` is likely a typo of ("心里咨询师" -> "心理咨询师"), else None.

    Only labels this close to a role name count as speakers: a continuation line such as "比如：..." is
    text, not a speaker (difflib ratio >= 0.6, which 1 wrong character in 5 passes and 2 unrelated
    characters fail).
    """
    import difflib

    close = difflib.get_close_matches(label.strip().lower(), list(lookup), n=1, cutoff=0.6)
    return close[0] if close else None


# --------------------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------------------


def _classify(rec: object, path: str) -> str:
    if isinstance(rec, list) or is_message(rec):
        return "smile"
    if isinstance(rec, dict):
        if "conversation" in rec:
            return "xtuner"
        if "conversations" in rec:
            return "sharegpt"
        if "dialogue" in rec:
            return "smile"
        if "messages" in rec:
            msgs = rec["messages"]
            roles = {m.get("role") for m in msgs if isinstance(m, dict)} if isinstance(msgs, list) else set()
            if roles & {"client", "counselor"}:
                return "smile"
            if "topic" in rec or "id" in rec:
                return "soulchat"
            return "openai"
    raise DataError(
        f"{path}: cannot detect the format from the first record (type {type(rec).__name__}, keys "
        f"{sorted(rec)[:8] if isinstance(rec, dict) else '-'}); pass --format, one of {FORMATS}",
        reason="unknown_format",
        where=path,
    )


def detect_format(path: str | os.PathLike, role_map: RoleMap | None = None,
                  columns: dict[str, str] | None = None) -> str:
    """Sniff the first bytes (and first record) of ``path`` and return one of FORMATS.

    columns: the --columns mapping, applied to the first record before it is classified.
    """
    path = os.fspath(path)
    if is_arrow_file(path):
        first_row = next(iter_arrow_records(path), None)
        if first_row is None:
            return "soulchat"  # no rows: any format reads it as nothing
        return _classify(remap(first_row[1], columns, path) if columns else first_row[1], path)
    with open_binary(path) as f:
        head = f.read(1 << 16).decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
    if not head:
        raise DataError(
            f"{path}: the file is empty; remove it from the inputs", reason="empty_file", where=path
        )
    if head[0] in "[{":
        # Classify the first readable record; a few undecodable ones at the start are tolerated so that
        # "skip" mode can still drop them later.
        if is_json_array(path):
            records = (rec for _, rec in iter_json_array(path))
        else:
            records = (rec for _, _, rec in iter_jsonl(path))
        first_error: DataError | None = None
        first: object = None
        try:
            for rec in itertools.islice(records, 100):
                if not isinstance(rec, DataError):
                    first = rec
                    break
                first_error = first_error or rec
        except DataError as e:
            first_error = e
        if first is not None:
            return _classify(remap(first, columns, path) if columns else first, path)
        if first_error is not None:
            raise DataError(
                f"{path}: cannot detect the format, the first records are unreadable ({first_error}); "
                f"fix the "
                f"file or pass --format",
                reason=first_error.reason,
                where=path,
            )
        return "soulchat"  # an empty array: any JSON format reads it as nothing
    lookup = (role_map or RoleMap())._lookup
    for line in head.splitlines()[:50]:
        m = SPEAKER.match(line)
        if m and m.group(1).strip().lower() in lookup:
            return "cpsycound"
    raise DataError(
        f"{path}: cannot detect the format (not JSON, and no '来访者：'/'心理咨询师：' speaker lines "
        f"in the first "
        f"lines); pass --format, one of {FORMATS}",
        reason="unknown_format",
        where=path,
    )

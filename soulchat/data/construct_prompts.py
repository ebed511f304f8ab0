"""The rewrite prompts of `python -m soulchat.data construct`: versioned, Chinese and English, overridable.

The bundled prompts live in ``soulchat/assets/construct_prompts.json``; ``--prompt FILE`` replaces them
with a file of the same shape (copy the bundled one and edit it). Every generated record carries
``prompt_version`` = the file's ``version`` + "@" + the first 12 hex digits of the file's SHA-256, so a
prompt edited without a new version still shows in the output.

The instruction asks, in our own words after the SoulChat paper, for a multi-turn rewrite of one
single-turn Q&A whose counselor turns question, comfort, recognise, listen, build trust and support,
over the paper's 12 topics; it repeats the safety rules the screens check (no diagnosis or
prescription, crisis signs answered with human help) and fixes the output format the parser reads.
Few-shot examples are whole dialogues of the bundled sample corpus in the prompt's language, of the
record's topic where there is one, chosen per record from ``--seed`` and the record's source id.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soulchat.data.construct_screen import Labels

BUNDLED_PROMPTS = Path(__file__).resolve().parent.parent / "assets" / "construct_prompts.json"
LANGUAGES = ("zh", "en")
INSTRUCTION_FIELDS = {"topic", "topics", "min_turns", "max_turns", "client", "counselor", "examples",
                      "question", "answer"}  # fmt: skip
EXAMPLE_FIELDS = {"number", "dialogue"}
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def language_of(text: str, setting: str) -> str:
    """``--language``: zh or en, or auto = zh when the text has CJK characters."""
    if setting != "auto":
        return setting
    return "zh" if _CJK.search(text) else "en"


def _placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


@dataclass(frozen=True)
class LanguagePrompt:
    system: str
    instruction: str
    example: str
    labels: Labels
    unknown_topic: str
    topics: tuple[str, ...]
    glosses: dict[str, str]

    def topic_text(self, topic: str) -> str:
        gloss = self.glosses.get(topic)
        return f"{topic} ({gloss})" if gloss else topic

    def canonical_topic(self, value: str | None) -> str | None:
        """The topic a generated "topic:" line names (one of ``topics``, by name or gloss), or None."""
        if not value:
            return None
        lowered = value.lower()
        # Longest first: "心理学知识" before a shorter name it might contain.
        for topic in sorted(self.topics, key=len, reverse=True):
            if topic.lower() in lowered:
                return topic
        for topic, gloss in self.glosses.items():
            if gloss.lower() in lowered:
                return topic
        return None


@dataclass(frozen=True)
class PromptSet:
    version: str  # "<version>@<sha256 prefix>"
    path: str
    languages: dict[str, LanguagePrompt]

    def for_language(self, language: str, where: str) -> LanguagePrompt:
        if language not in self.languages:
            raise ValueError(
                f"{where}: the prompt file {self.path} has no {language!r} prompt (it has "
                f"{sorted(self.languages)}); add one or pass --language {next(iter(self.languages))}"
            )
        return self.languages[language]


def load_prompts(path: str | None = None) -> PromptSet:
    """The bundled prompts, or ``--prompt FILE``; a malformed file -> ValueError naming it and the fix."""
    file = Path(path) if path is not None else BUNDLED_PROMPTS
    where = f"--prompt {file}" if path is not None else f"the bundled prompts {file}"
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise ValueError(f"{where}: cannot be read ({err.strerror}); pass a JSON prompt file") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{where}: not valid UTF-8 JSON ({err}); start from {BUNDLED_PROMPTS}") from None
    if not isinstance(data, dict) or not isinstance(data.get("version"), str) or not data["version"].strip():
        raise ValueError(f'{where}: needs a non-empty "version" string (see {BUNDLED_PROMPTS})')
    languages = data.get("languages")
    if not isinstance(languages, dict) or not languages or not set(languages) <= set(LANGUAGES):
        raise ValueError(f'{where}: "languages" must map some of {list(LANGUAGES)} to prompts')
    out = {name: _language(value, f"{where} languages.{name}") for name, value in languages.items()}
    digest = hashlib.sha256(raw).hexdigest()[:12]
    return PromptSet(f"{data['version'].strip()}@{digest}", str(file), out)


def _language(value: Any, where: str) -> LanguagePrompt:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: must be an object")

    def text(key: str) -> str:
        v = value.get(key)
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f'{where}: needs a non-empty "{key}" string')
        return v

    def names(key: str) -> tuple[str, ...]:
        v = value.get(key)
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x.strip() for x in v):
            raise ValueError(f'{where}: "{key}" must be a non-empty list of names')
        return tuple(x.strip() for x in v)

    instruction, example = text("instruction"), text("example")
    for name, template, allowed, required in (
        ("instruction", instruction, INSTRUCTION_FIELDS, {"question", "answer"}),
        ("example", example, EXAMPLE_FIELDS, {"dialogue"}),
    ):
        try:
            found = _placeholders(template)
        except ValueError as err:
            raise ValueError(f'{where}: "{name}" is not a valid template ({err}); write literal braces as {{{{ }}}}') from None
        unknown = found - allowed
        if unknown:
            raise ValueError(f'{where}: "{name}" has unknown placeholders {sorted(unknown)}; allowed: {sorted(allowed)}')
        if not required <= found:
            raise ValueError(f'{where}: "{name}" must contain {sorted("{" + r + "}" for r in required)}')
    glosses = value.get("topic_glosses", {})
    if not isinstance(glosses, dict) or not all(isinstance(v, str) for v in glosses.values()):
        raise ValueError(f'{where}: "topic_glosses" must map topics to strings')
    labels = Labels(names("client_labels"), names("counselor_labels"), names("topic_labels"))
    return LanguagePrompt(
        system=text("system"), instruction=instruction, example=example, labels=labels,
        unknown_topic=text("unknown_topic"), topics=names("topics"), glosses=dict(glosses),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Few-shot examples and the prompt of one record
# --------------------------------------------------------------------------------------------------


class FewShot:
    """Dialogues of the bundled sample corpus, by language and topic, for the prompt's examples."""

    def __init__(self, path: Path | None = None) -> None:
        from soulchat.data.assets import default_corpus_path

        records = json.loads((path or default_corpus_path()).read_text(encoding="utf-8"))
        self.by_language: dict[str, list[dict[str, Any]]] = {lang: [] for lang in LANGUAGES}
        for rec in records:
            self.by_language[language_of(rec["messages"][0]["content"], "auto")].append(rec)

    def choose(self, language: str, topic: str | None, k: int, rng: random.Random) -> list[dict[str, Any]]:
        pool = self.by_language.get(language, [])
        same = [r for r in pool if topic is not None and r.get("topic") == topic]
        pool = same if len(same) >= k else pool
        return rng.sample(pool, min(k, len(pool)))


def derive_seed(seed: int, source_id: str, purpose: str) -> int:
    """A 32-bit seed for one record and purpose ("examples", "attempt 2"), the same in every run."""
    digest = hashlib.blake2b(f"{seed}\x1f{source_id}\x1f{purpose}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def _colon(label: str) -> str:
    """The colon a label is written with: full-width after Chinese, "label: " otherwise."""
    return f"{label}：" if _CJK.search(label) else f"{label}: "


def render_examples(prompt: LanguagePrompt, examples: list[dict[str, Any]]) -> str:
    """The examples as the output format asks for: a topic line, then one labelled line per message."""
    out = []
    for number, rec in enumerate(examples, 1):
        lines = [_colon(prompt.labels.topic[0]) + rec["topic"]] if rec.get("topic") else []
        for m in rec["messages"]:
            label = prompt.labels.client[0] if m["role"] == "user" else prompt.labels.counselor[0]
            lines.append(_colon(label) + m["content"])
        out.append(prompt.example.format(number=number, dialogue="\n".join(lines)))
    return "".join(out)


def build_prompt(
    prompt: LanguagePrompt, question: str, answer: str, topic: str | None, examples: list[dict[str, Any]],
    min_turns: int, max_turns: int,
) -> tuple[str, str]:  # fmt: skip
    """(system message, user message) asking for the rewrite of one Q&A record."""
    values = {
        "topic": prompt.topic_text(topic) if topic else prompt.unknown_topic,
        "topics": "、".join(prompt.topic_text(t) for t in prompt.topics)
        if _CJK.search(prompt.unknown_topic) else ", ".join(prompt.topic_text(t) for t in prompt.topics),
        "min_turns": min_turns,
        "max_turns": max_turns,
        "client": prompt.labels.client[0],
        "counselor": prompt.labels.counselor[0],
        "examples": render_examples(prompt, examples),
        "question": question.strip(),
        "answer": answer.strip(),
    }  # fmt: skip
    return prompt.system, prompt.instruction.format_map(values)

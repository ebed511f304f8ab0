"""Checks on every dialogue `python -m soulchat.data construct` generates, before it is written.

1. ``parse_dialogue``: the generator's text -> client/counselor turns. A turn starts on a line that begins
   with one of the prompt's role labels and a colon (full-width or ASCII, optionally in markdown bold:
   ``用户：`` / ``**Counselor:**``); lines without a label continue the turn before them. Text before the
   first label is a preamble ("好的，以下是改写后的对话："): dropped and counted, except a line naming the
   topic (``话题：婚恋`` / ``Topic: ...``), which is read as the topic.
2. ``check_dialogue``: the rules of ``DialogueRules`` (alternating turns, client first, counselor last,
   turn count and per-message length bounds, valid text) and two keyword screens on the content:

   - the counselor never diagnoses or prescribes: ``DIAGNOSIS_RULES`` / ``PRESCRIPTION_RULES`` (regular
     expressions, Chinese and English, case-insensitive, checked on counselor turns only: a client may
     name a diagnosis or a medicine of their own);
   - a client message that shows crisis signs (``CRISIS_RULES``: self-harm, suicide, abuse, immediate
     danger) must be answered with a pointer to human help -- a phrase or emergency number of
     soulchat.safety's ``keyword_matches`` (the rules ``evaluate --crisis-check`` uses) -- in the
     counselor's reply to it or a later counselor turn. Not only the very next one: good practice often
     asks about safety first ("are you safe right now?") and names help a turn later, as 3 dialogues of
     the bundled sample corpus do; the prompt still asks for help in the very next reply.

   The screens are crude on purpose and in one direction: a false alarm only costs a retry, a miss lets a
   dialogue through. They cannot tell "你得了抑郁症" from "你担心自己得了抑郁症？", they miss diagnoses
   and crisis signs in other words, and any help phrase satisfies the crisis rule. They are a filter in
   front of the human review, not a replacement for it.
3. ``DedupIndex``: exact duplicates (a hash of the normalised turns) and near duplicates (MinHash over
   character 5-grams, LSH banding, estimated Jaccard similarity >= a threshold) of dialogues already
   written.

A failed check is a ``Rejection`` with a short ``reason`` key, counted by that key in the run's report.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from soulchat.data.conversation import Conversation, DataError, Turn, validate_conversation


class Rejection(ValueError):
    """A generated dialogue that failed a check; ``reason`` is the key it is counted under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Labels:
    """Role labels of one prompt language: the first of each is the one the prompt asks for."""

    client: tuple[str, ...]
    counselor: tuple[str, ...]
    topic: tuple[str, ...]


@dataclass
class ParsedDialogue:
    turns: list[Turn]
    topic: str | None  # the topic line's value, when the generator wrote one
    preamble: bool  # text before the first turn was dropped


@functools.lru_cache(maxsize=16)
def _label_pattern(labels: Labels) -> re.Pattern[str]:
    names = sorted({*labels.client, *labels.counselor, *labels.topic}, key=len, reverse=True)
    alternatives = "|".join(re.escape(n) for n in names)
    # Optional markdown around the label: "**用户**：", "**Client:**", "- Client:".
    return re.compile(
        rf"^[ \t]*(?:[-*>#]+[ \t]*)?(?:\*\*)?({alternatives})(?:\*\*)?[ \t]*[:：](?:\*\*)?[ \t]*(.*)$",
        re.IGNORECASE,
    )


def parse_dialogue(text: str, labels: Labels) -> ParsedDialogue:
    """The turns of a generated dialogue (see the module docstring); raises Rejection when none."""
    if not text.strip():
        raise Rejection("empty_generation", "the generator returned no text")
    pattern = _label_pattern(labels)
    lookup = {n.lower(): "client" for n in labels.client}
    lookup.update({n.lower(): "counselor" for n in labels.counselor})
    lookup.update({n.lower(): "topic" for n in labels.topic})
    roles: list[str] = []
    texts: list[list[str]] = []
    topic, preamble = None, False
    for line in text.splitlines():
        match = pattern.match(line)
        if match is not None:
            kind = lookup[match.group(1).lower()]
            if kind == "topic":
                if not roles and topic is None:
                    topic = match.group(2).strip().strip("*").strip() or None
                    continue
                kind = None  # a "topic:" line inside the dialogue is ordinary text
            if kind is not None:
                roles.append(kind)
                texts.append([match.group(2)])
                continue
        if roles:
            texts[-1].append(line)
        elif line.strip():
            preamble = True
    if not roles:
        raise Rejection("no_dialogue", "no line starts with a role label")
    turns = [Turn(role, "\n".join(lines).strip()) for role, lines in zip(roles, texts)]
    return ParsedDialogue(turns, topic, preamble)


# --------------------------------------------------------------------------------------------------
# Content screens
# --------------------------------------------------------------------------------------------------

_DISORDERS_ZH = (
    "抑郁症|焦虑症|焦虑障碍|强迫症|躁郁症|双相|精神分裂|人格障碍|边缘型|创伤后应激障碍|PTSD|ADHD|多动症|"
    "惊恐障碍|进食障碍|厌食症|暴食症|失眠症|精神病|心理疾病|精神疾病"
)
_DISORDERS_EN = (
    r"(?:clinical |major |severe |mild |moderate )?(?:depression|depressive disorder|anxiety disorder|"
    r"generali[sz]ed anxiety|bipolar(?: disorder)?|ptsd|ocd|adhd|borderline personality disorder|"
    r"personality disorder|schizophrenia|panic disorder|eating disorder|anorexia|bulimia|insomnia disorder)"
)
_DRUGS = (
    "舍曲林|氟西汀|帕罗西汀|西酞普兰|艾司西酞普兰|文拉法辛|度洛西汀|米氮平|安非他酮|阿普唑仑|劳拉西泮|氯硝西泮|"
    "地西泮|安定|佐匹克隆|唑吡坦|碳酸锂|喹硫平|奥氮平|利培酮|安眠药|抗抑郁药|抗焦虑药|镇静剂|褪黑素"
)
_DRUGS_EN = (
    r"sertraline|zoloft|fluoxetine|prozac|paroxetine|paxil|citalopram|escitalopram|lexapro|venlafaxine|"
    r"duloxetine|mirtazapine|bupropion|wellbutrin|alprazolam|xanax|lorazepam|ativan|clonazepam|diazepam|"
    r"valium|zolpidem|ambien|lithium|quetiapine|olanzapine|risperidone|sleeping pills?|antidepressants?|"
    r"benzodiazepines?|sedatives?|melatonin"
)

# (rule name, pattern). A counselor turn matching any is rejected as "diagnosis" / "prescription".
DIAGNOSIS_RULES: tuple[tuple[str, str], ...] = (
    ("zh_you_have_disorder", rf"你(?:已经|肯定|应该|可能)?(?:是)?(?:患有|患上了?|患了|得了)[^。，,.!！?？]{{0,8}}(?:{_DISORDERS_ZH}|症|障碍)"),
    ("zh_you_are_disorder", rf"你(?:这|的情况|的症状)?(?:就|已经|明显|肯定)?是(?:典型的|明显的|很明显的)?(?:{_DISORDERS_ZH})"),
    ("zh_i_diagnose", r"(?:我|可以)(?:诊断|判断|断定|确定)你(?:是|有|患|得)"),
    ("en_you_have_disorder", rf"\byou(?:'ve got| have got| have| are suffering from| suffer from| are showing)\s+(?:a |an )?(?:classic |clear )?{_DISORDERS_EN}\b"),
    ("en_i_diagnose", r"\bI(?: would| can| could)? diagnose you\b"),
    ("en_this_is_disorder", rf"\b(?:this|that|it) is (?:clearly |definitely |classic |textbook )?(?:a case of )?{_DISORDERS_EN}\b"),
)  # fmt: skip
PRESCRIPTION_RULES: tuple[tuple[str, str], ...] = (
    ("dose", r"\d+(?:\.\d+)?\s*(?:mg|毫克|微克|milligrams?)\b|\d+(?:\.\d+)?\s*(?:毫克|微克)"),
    ("zh_daily_dose", r"(?:每天|每日|每晚|一天|睡前)[^。，,]{0,6}(?:吃|服用|服)[^。，,]{0,4}[一两二三四五六七八九十半\d]+\s*(?:片|粒|毫克)"),
    ("zh_take_drug", rf"(?:吃|服用|服|试试|加用|换成|换用|开)(?:点|些|一些|上)?[^。，,]{{0,4}}(?:{_DRUGS})"),
    ("zh_i_prescribe", r"我(?:给你|帮你|为你)开(?:点|些)?(?:药|处方)"),
    ("en_take_drug", rf"\b(?:take|try|start(?: taking| on)?|increase|double|switch to|get some)\s+(?:some\s+|a\s+)?(?:{_DRUGS_EN})\b"),
    ("en_i_prescribe", r"\bI(?:'ll| will| can| would)? prescribe\b"),
)  # fmt: skip
# Crisis signs in a client message: self-harm, suicide, abuse, immediate danger (the categories of
# soulchat/assets/crisis_prompts.json; a test checks that every one of its 16 messages is caught).
CRISIS_RULES: tuple[tuple[str, str], ...] = (
    ("zh_suicide", (r"自杀|轻生|寻死|想死|去死|不想活|活不下去|活着没(?:有)?(?:任何)?意[义思]|结束(?:自己的)?生命|"
                    r"了结自己|了断|遗书|遗言|写好了[^。，,]{0,8}信|不用再为我操心|死了算了|跳楼|跳河|吞药|服毒")),
    ("zh_self_harm", r"自残|自伤|伤害自己|弄伤自己|割腕|划伤自己|割自己"),
    ("zh_abuse", r"打我(?!电话|手机)|把我打|家暴|虐待|动手动脚|性侵|猥亵|强奸|不放过我|威胁我"),
    ("zh_danger", r"跟踪我|敲我的门|吃了很多药|叫不醒|药物过量|吃了一整瓶"),
    ("en_suicide", (r"suicid|kill myself|killing myself|end(?:ing)? my life|end it all|want to die|wanna die|"
                    r"better off dead|reason to (?:keep )?(?:living|live)|don'?t want to (?:live|be alive)|"
                    r"won'?t be a burden|given away my (?:things|stuff)|goodbye to my (?:friends|family)")),
    ("en_self_harm", r"self[- ]?harm|hurt(?:ing)? myself|harm(?:ing)? myself|cut(?:ting)? myself"),
    ("en_abuse", (r"\bhits? me\b|\bbeats? me\b|abus(?:e|ed|es|ive)|touches me|\brap(?:e|ed)\b|"
                  r"find me if I (?:ever )?leave")),
    ("en_danger", r"following me|outside my door|took a lot of pills|overdos|won'?t wake up|can'?t wake (?:her|him) up"),
)  # fmt: skip


_COMPILED = {
    name: re.compile(pattern, re.IGNORECASE)
    for rules in (DIAGNOSIS_RULES, PRESCRIPTION_RULES, CRISIS_RULES)
    for name, pattern in rules
}


def _first_match(text: str, rules: Sequence[tuple[str, str]]) -> tuple[str, str] | None:
    # One pattern per rule: a single alternation of all rules measured 6x slower per search (re does not
    # optimise large alternations; 62 us vs 9 us on the sample corpus).
    for name, _ in rules:
        match = _COMPILED[name].search(text)
        if match is not None:
            return name, match.group()
    return None


def crisis_signs(text: str) -> tuple[str, str] | None:
    """(rule, matched text) of the first crisis rule a client message matches, or None."""
    return _first_match(text, CRISIS_RULES)


def diagnoses_or_prescribes(text: str) -> tuple[str, str, str] | None:
    """("diagnosis" | "prescription", rule, matched text) for a counselor message, or None."""
    for reason, rules in (("diagnosis", DIAGNOSIS_RULES), ("prescription", PRESCRIPTION_RULES)):
        hit = _first_match(text, rules)
        if hit is not None:
            return reason, *hit
    return None


# --------------------------------------------------------------------------------------------------
# The dialogue rules
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DialogueRules:
    min_turns: int  # messages, client and counselor together
    max_turns: int
    min_chars: int  # per message
    max_chars: int


def check_dialogue(turns: Sequence[Turn], rules: DialogueRules) -> None:
    """Raise Rejection naming the first rule ``turns`` breaks (module docstring); return when all hold."""
    from soulchat.safety import keyword_matches

    for i, turn in enumerate(turns):
        if not turn.text:
            raise Rejection("empty_turn", f"turn {i} ({turn.role}) has no text")
    if turns[0].role != "client":
        raise Rejection("starts_with_counselor", "the first turn is the counselor's")
    for i in range(1, len(turns)):
        if turns[i].role == turns[i - 1].role:
            raise Rejection("not_alternating", f"turns {i - 1} and {i} are both {turns[i].role} turns")
    if turns[-1].role != "counselor":
        raise Rejection("ends_with_client", "the last turn is the client's")
    if len(turns) < rules.min_turns:
        raise Rejection("too_few_turns", f"{len(turns)} turns, fewer than --min-turns {rules.min_turns}")
    if len(turns) > rules.max_turns:
        raise Rejection("too_many_turns", f"{len(turns)} turns, more than --max-turns {rules.max_turns}")
    for i, turn in enumerate(turns):
        if len(turn.text) < rules.min_chars:
            raise Rejection("turn_too_short", f"turn {i} has {len(turn.text)} characters (< --min-chars)")
        if len(turn.text) > rules.max_chars:
            raise Rejection("turn_too_long", f"turn {i} has {len(turn.text)} characters (> --max-chars)")
    try:  # control characters, lone surrogates: what the readers would refuse in prepare
        validate_conversation(Conversation(list(turns), "generated", None, "generated"))
    except DataError as err:
        raise Rejection("invalid_text", f"{err.reason}: {err}") from None
    for i, turn in enumerate(turns):
        if turn.role == "counselor":
            hit = diagnoses_or_prescribes(turn.text)
            if hit is not None:
                raise Rejection(hit[0], f"turn {i}: rule {hit[1]} matched {hit[2]!r}")
        else:
            sign = crisis_signs(turn.text)
            later = [t.text for t in turns[i + 1 :] if t.role == "counselor"]
            if sign is not None and not any(keyword_matches(text) for text in later):
                raise Rejection(
                    "crisis_without_help",
                    f"client turn {i} shows crisis signs (rule {sign[0]}: {sign[1]!r}) and no counselor turn "
                    "after it names human help",
                )


# --------------------------------------------------------------------------------------------------
# Duplicates
# --------------------------------------------------------------------------------------------------

_SPACE = re.compile(r"\s+")
_NOT_WORD = re.compile(r"[\W_]+", re.UNICODE)
SHINGLE = 5  # characters per shingle: a Chinese sentence of 20 characters has 16
PERMUTATIONS = 64  # MinHash functions: the similarity estimate's standard error is <= 0.5/sqrt(64) = 0.06
BANDS = 16  # LSH bands of 4 rows: a pair at similarity 0.8 becomes a candidate with p = 0.9998
_PRIME = (1 << 31) - 1  # universal hashing mod a Mersenne prime; shingle hashes are 32-bit
_SHINGLE_KEYS = np.random.default_rng(5).integers(1 << 32, 1 << 63, size=SHINGLE, dtype=np.uint64) | np.uint64(1)


def dialogue_key(turns: Sequence[Turn]) -> bytes:
    """Exact-duplicate key: roles and whitespace-normalised texts, hashed (16 bytes)."""
    text = "\x1e".join(f"{t.role}\x1f{_SPACE.sub(' ', t.text).strip()}" for t in turns)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


@dataclass
class DedupIndex:
    """Exact and near-duplicate screen over the dialogues kept so far (``add`` them as they are written).

    Near duplicates: the texts of all turns, lowercased with punctuation and spaces removed, cut into
    character 5-grams; a MinHash signature of 64 universal hash functions (fixed seed, so the decision
    for a pair is the same in every run and on resume); LSH with 16 bands of 4 rows finds candidates, and
    a candidate whose estimated Jaccard similarity (the fraction of equal signature entries) is at least
    ``threshold`` is a near duplicate. ``threshold`` 1.0 leaves only exact duplicates. Memory: ~600 bytes
    per dialogue (signature + band keys), about 150 MB for the 258k dialogues of SoulChatCorpus.
    """

    threshold: float = 0.8
    _exact: set[bytes] = field(default_factory=set)
    _signatures: list[np.ndarray] = field(default_factory=list)
    _bands: list[dict[bytes, list[int]]] = field(default_factory=lambda: [{} for _ in range(BANDS)])

    def __post_init__(self) -> None:
        rng = np.random.default_rng(20231)
        self._a = rng.integers(1, _PRIME, size=PERMUTATIONS, dtype=np.uint64)
        self._b = rng.integers(0, _PRIME, size=PERMUTATIONS, dtype=np.uint64)

    def signature(self, turns: Sequence[Turn]) -> np.ndarray:
        text = _NOT_WORD.sub("", " ".join(t.text for t in turns).lower()) or " "
        # Code points; each 5-gram hashed as sum(cp[i + j] * K[j]) mod 2^64 (numpy wraps), top 32 bits kept:
        # vectorised, and the same in every process (a Python str hash is salted per process).
        cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        n = max(1, len(cp) - SHINGLE + 1)
        mixed = np.zeros(n, dtype=np.uint64)
        for j in range(min(SHINGLE, len(cp))):
            mixed += cp[j : j + n] * _SHINGLE_KEYS[j]
        x = np.unique(mixed >> np.uint64(32))
        # [PERMUTATIONS, shingles]: a < 2^31 and x < 2^32, so a * x + b < 2^64 does not overflow.
        hashed = (self._a[:, None] * x[None, :] + self._b[:, None]) % np.uint64(_PRIME)
        return hashed.min(axis=1).astype(np.uint32)

    def _band_keys(self, sig: np.ndarray) -> list[bytes]:
        rows = PERMUTATIONS // BANDS
        return [sig[i * rows : (i + 1) * rows].tobytes() for i in range(BANDS)]

    def check(self, turns: Sequence[Turn]) -> tuple[str | None, bytes, np.ndarray | None]:
        """(None | "duplicate" | "near_duplicate", exact key, signature) for a dialogue not yet added."""
        key = dialogue_key(turns)
        if key in self._exact:
            return "duplicate", key, None
        if self.threshold >= 1.0:
            return None, key, None
        sig = self.signature(turns)
        candidates = {i for band, k in zip(self._bands, self._band_keys(sig)) for i in band.get(k, ())}
        for i in sorted(candidates):
            if float(np.mean(self._signatures[i] == sig)) >= self.threshold:
                return "near_duplicate", key, sig
        return None, key, sig

    def add(self, key: bytes, sig: np.ndarray | None, turns: Sequence[Turn] = ()) -> None:
        self._exact.add(key)
        if self.threshold >= 1.0:
            return
        if sig is None:
            sig = self.signature(turns)
        index = len(self._signatures)
        self._signatures.append(sig)
        for band, k in zip(self._bands, self._band_keys(sig)):
            band.setdefault(k, []).append(index)

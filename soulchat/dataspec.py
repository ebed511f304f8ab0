"""What the data options may say, in one place that both soulchat.options and soulchat.data import.

The choice lists (input formats, templates, render modes, overflow, loss weighting, on-error), the
``--columns`` mapping, the built-in raw role names and the RoleMap built from them, with DataError (which
the role lookup raises). Standard library only: reading the options imports no tokenizer or reader code,
and no data module has to be kept equal to a copy of its choices.

Each choice list is spelled once, as the ``Literal`` that types the option's field; the tuple the data
code checks against is read from it.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

# ---- choice lists ---------------------------------------------------------------------------------

FormatChoice = Literal["auto", "soulchat", "openai", "sharegpt", "smile", "cpsycound", "xtuner"]
TemplateChoice = Literal["auto", "soulchat", "chatml"]
RenderModeChoice = Literal["auto", "conversation", "per-turn"]
OverflowChoice = Literal["split", "drop"]
LossWeightingChoice = Literal["token", "turn", "conversation"]
OnErrorChoice = Literal["raise", "skip"]
ThinkingChoice = Literal["off", "on"]  # --thinking (unset: what the chat template does by default)

FORMATS: tuple[str, ...] = typing.get_args(FormatChoice)[1:]  # the formats a file can be read as
TEMPLATES: tuple[str, ...] = typing.get_args(TemplateChoice)
RENDER_MODES: tuple[str, ...] = typing.get_args(RenderModeChoice)
OVERFLOW: tuple[str, ...] = typing.get_args(OverflowChoice)
LOSS_WEIGHTING: tuple[str, ...] = typing.get_args(LossWeightingChoice)
ON_ERROR: tuple[str, ...] = typing.get_args(OnErrorChoice)
THINKING: tuple[str, ...] = typing.get_args(ThinkingChoice)

# ---- --columns ------------------------------------------------------------------------------------

# question/answer name the fields of single-turn Q&A records, read only by `construct`
# (data/construct_sources.py).
COLUMN_FIELDS = ("messages", "role", "content", "id", "topic", "question", "answer")


def parse_columns(spec: str | None) -> dict[str, str]:
    """"messages=conversations,role=from,content=value" -> {"messages": "conversations", ...}."""
    out: dict[str, str] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, sep, column = (x.strip() for x in part.partition("="))
        if not sep or name not in COLUMN_FIELDS or not column:
            raise ValueError(
                f"--columns {spec!r}: {part.strip()!r} must be FIELD=COLUMN with FIELD one of {COLUMN_FIELDS}, "
                "e.g. --columns messages=conversations,role=from,content=value"
            )
        if name in out:
            raise ValueError(f"--columns {spec!r}: {name} is mapped twice")
        out[name] = column
    return out


# ---- roles ----------------------------------------------------------------------------------------

ROLES = ("system", "client", "counselor")  # canonical roles after role mapping

# The fix suggested for every record-level problem, besides repairing the data itself.
SKIP_HINT = "or pass --on-error skip to drop such records (they are counted by reason)"


class DataError(ValueError):
    """Bad input. The message names the file + line/record, what is wrong, and the fix.

    ``reason`` is a short machine key ("malformed_json", "unknown_role", "empty_content", ...) used to
    count skipped records; ``where`` is the location ("path:line" or "path[record N]") when known.
    """

    def __init__(self, message: str, reason: str = "bad_record", where: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.where = where


@dataclass
class RoleMap:
    """Explicit mapping raw role name -> canonical role. Matching is exact after strip() and lower().

    Overriding a field replaces that role's defaults, e.g.
    ``RoleMap(counselor=("doctor",), client=("patient",))``. Fields are read once, at construction.
    """

    counselor: tuple[str, ...] = ("assistant", "gpt", "counselor", "心理咨询师", "咨询师", "bot", "model")
    client: tuple[str, ...] = ("user", "human", "client", "来访者", "用户")
    system: tuple[str, ...] = ("system",)
    _lookup: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for role in ROLES:
            names = getattr(self, role)
            if isinstance(names, str):  # RoleMap(counselor="doctor") is an easy mistake; accept it
                names = (names,)
                setattr(self, role, names)
            for name in names:
                key = name.strip().lower()
                other = self._lookup.get(key)
                if other is not None and other != role:
                    raise ValueError(
                        f"RoleMap: raw role {name!r} is listed as both {other!r} and {role!r}; "
                        f"keep it in one of the two lists"
                    )
                self._lookup[key] = role

    def canonical(self, raw: str, where: str) -> str:
        """The canonical role of ``raw``; DataError(reason="unknown_role") when it is not mapped."""
        role = self._lookup.get(raw) if isinstance(raw, str) else None
        if role is None and isinstance(raw, str):
            role = self._lookup.get(raw.strip().lower())
        if role is None:
            raise DataError(
                f"{where}: unknown role {raw!r}; known roles are "
                f"counselor={list(self.counselor)}, client={list(self.client)}, system={list(self.system)}. "
                f"Add it to the RoleMap (e.g. RoleMap(counselor=(..., {raw!r}))) {SKIP_HINT}",
                reason="unknown_role",
                where=where,
            )
        return role

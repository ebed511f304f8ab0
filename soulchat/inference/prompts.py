"""The prompt for the counselor's next reply: the text checked, and the conversation fitted into the
model's context window (the oldest client/counselor exchanges dropped first, the system prompt kept)."""

from __future__ import annotations

from collections.abc import Sequence

from soulchat.data.conversation import Turn
from soulchat.data.render import render_prompt, thinking_value
from soulchat.inference.loading import LoadedModel


class ContextTooLong(ValueError):
    """Even the newest client turn (with the system prompt) does not fit the context window."""


def check_text(turns: Sequence[Turn], where: str) -> None:
    """Text must be valid Unicode: a lone surrogate (invalid UTF-8 bytes read with surrogateescape, or a
    "\\ud800" escape in JSON) cannot be tokenized."""
    for turn in turns:
        try:
            turn.text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(
                f"{where}: a {turn.role} message is not valid text (character {err.start} is "
                f"{turn.text[err.start]!r}: invalid UTF-8 input or a lone surrogate escape); fix the "
                "encoding of the input (UTF-8)"
            ) from None


def check_no_control_tokens(lm: LoadedModel, turns: Sequence[Turn], where: str) -> None:
    """A control-token string typed into a message (e.g. "<|im_end|>") would end the turn early."""
    for turn in turns:
        for token in lm.control_tokens:
            if token in turn.text:
                raise ValueError(
                    f"{where}: a {turn.role} message contains the control token {token!r}, which would be "
                    "read as the template's own marker; remove it from the text"
                )


def fit_context(
    lm: LoadedModel, turns: Sequence[Turn], max_new_tokens: int, where: str = "conversation"
) -> tuple[list[int], int]:
    """(prompt token ids, exchanges dropped): the prompt for the counselor's next reply, within the window.

    ``turns``: optional system turn, then client/counselor alternating, ending with a client turn. While
    the prompt plus ``max_new_tokens`` exceeds the context window, the oldest client/counselor exchange
    is dropped (the system prompt stays). Raises ContextTooLong when even the last client turn alone
    does not fit.
    """
    turns = list(turns)
    if not turns or turns[-1].role != "client":
        raise ValueError(f"{where}: the conversation must end with a client turn to get a counselor reply")
    budget = lm.context_window - max_new_tokens
    if budget < 1:
        raise ContextTooLong(
            f"{where}: --max-new-tokens {max_new_tokens} leaves no room for a prompt in the context window "
            f"of {lm.context_window} tokens; lower --max-new-tokens"
        )
    system = turns[:1] if turns[0].role == "system" else []
    body = turns[len(system) :]
    dropped = 0
    while True:
        ids = lm.encode(render_prompt(system + body, lm.tokenizer, lm.template, thinking_value(lm.thinking)))
        if len(ids) <= budget:
            return ids, dropped
        if len(body) < 3:
            raise ContextTooLong(
                f"{where}: the last client message needs a {len(ids)}-token prompt, more than the "
                f"{budget} tokens left in the context window of {lm.context_window} after --max-new-tokens "
                f"{max_new_tokens}; shorten the message or lower --max-new-tokens"
            )
        body = body[2:]  # the oldest client turn and the counselor's reply to it
        dropped += 1

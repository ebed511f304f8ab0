"""The fast chat-template render: the same text and errors as apply_chat_template, or not used at all."""

from __future__ import annotations

import functools
import sys
import types

import pytest
from test_render import DIALOGUE, LLAMA3, MISTRAL, QWEN25, ROUNDS, conv_of, make_tokenizer
from test_render_mode import REASONING_DIALOGUE, UNSTABLE, tokenizer_for
from transformers.utils import chat_template_utils

from soulchat.data import chat_template
from soulchat.data.assets import load_tokenizer
from soulchat.data.chat_template import (
    _FAST_CHECK_EVERY,
    _FAST_CHECK_FIRST,
    TemplateError,
    _messages,
    apply_template,
)
from soulchat.data.conversation import Turn
from soulchat.data.pipeline import prepare
from soulchat.options import DataConfig

RAISES_ON_SYSTEM = (
    "{%- for m in messages %}{%- if m.role == 'system' %}{{- raise_exception('系统提示不被支持') }}{%- endif %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
ENDS_WITH_EOS = "{%- for m in messages %}{{- m.role + ': ' + m.content + eos_token + '\\n' }}{%- endfor %}"
# date_string: a variable that only some callers pass (Llama-3.1's templates read it).
READS_DATE = "{{- date_string | default('no date') }}\n" + ENDS_WITH_EOS


# The bundled tokenizer and tiny ones with the templates of test_render and test_render_mode.
TOKENIZERS = {
    "bundled": lambda: load_tokenizer(None),
    **{name: functools.partial(tokenizer_for, t) for name, t in UNSTABLE.items()},
    "qwen25": lambda: tokenizer_for(QWEN25),
    "llama3": lambda: make_tokenizer(chat_template=LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
    "mistral": lambda: make_tokenizer(chat_template=MISTRAL, bos_token="<s>", eos_token="</s>"),
    "rounds": lambda: make_tokenizer(chat_template=ROUNDS, eos_token="</s>"),
    "raises_on_system": lambda: tokenizer_for(RAISES_ON_SYSTEM),
}


def conversations() -> list[list[Turn]]:
    """Every prefix of plain, system-prompted and reasoning conversations."""
    whole = [conv_of(*DIALOGUE).turns, conv_of(*DIALOGUE, system="你是一位心理咨询师。").turns,
             conv_of(*REASONING_DIALOGUE).turns, conv_of(" 前后有空格 ", "\n回复\n").turns]
    return [turns[:k] for turns in whole for k in range(1, len(turns) + 1)]


def hf(tok, turns, generation_prompt: bool) -> str:
    return tok.apply_chat_template(_messages(turns), tokenize=False, add_generation_prompt=generation_prompt)


def outcome(tok, turns, generation_prompt: bool) -> str:
    """What apply_template gives: the text, or the TemplateError's text."""
    try:
        return "text: " + apply_template(tok, turns, generation_prompt, "test[c]")
    except TemplateError as exc:
        return "error: " + str(exc)


def slow_outcome(tok, turns, generation_prompt: bool) -> str:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chat_template, "_fast_render_for", lambda tokenizer: None)
        return outcome(tok, turns, generation_prompt)


def fast_of(tok) -> chat_template._FastRender:
    fast = chat_template._fast_render_for(tok)
    assert fast is not None, "the fast render should be used for this template"
    return fast


# ------------------------------------------------------------------------------------------------
# Identical output


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_fast_render_gives_the_text_and_errors_of_apply_chat_template(name):
    tok = TOKENIZERS[name]()
    fast = fast_of(tok)
    fast.calls = _FAST_CHECK_FIRST  # past the checked calls: the renders below are the fast path alone
    cases = [(turns, g) for turns in conversations() for g in (False, True)]
    assert len(cases) < _FAST_CHECK_EVERY - _FAST_CHECK_FIRST  # no spot check among them
    errors = 0
    for turns, generation_prompt in cases:
        got = outcome(tok, turns, generation_prompt)
        assert got == slow_outcome(tok, turns, generation_prompt)
        if got.startswith("text: "):
            assert got == "text: " + hf(tok, turns, generation_prompt)
        errors += got.startswith("error: ")
    assert fast.calls == _FAST_CHECK_FIRST + len(cases)  # every one rendered by the fast path
    assert errors == 0 or name in ("mistral", "raises_on_system")  # those raise on some of the cases


def test_template_errors_read_the_same_on_both_paths():
    tok = tokenizer_for(RAISES_ON_SYSTEM)
    fast = fast_of(tok)
    turns = conv_of(*DIALOGUE, system="你是一位心理咨询师。").turns
    checked = outcome(tok, turns, False)  # within the first calls: also rendered by apply_chat_template
    fast.calls = _FAST_CHECK_FIRST
    unchecked = outcome(tok, turns, False)
    assert checked == unchecked == slow_outcome(tok, turns, False)
    assert unchecked.startswith("error: test[c]: the tokenizer's chat template failed: TemplateError: 系统提示不被支持.")


def test_prepared_stores_are_byte_identical_with_and_without_the_fast_render(tmp_path, monkeypatch):
    # The bundled tokenizer (conversation mode) and a Qwen3-style template (per-turn mode).
    for name, load in (("bundled", lambda: load_tokenizer(None)), ("qwen3", lambda: tokenizer_for(UNSTABLE["qwen3"]))):
        fast_tok, slow_tok = load(), load()
        prepare(DataConfig(cache_dir=str(tmp_path / name / "fast")), fast_tok, progress=False, verbose=False)
        (fast,) = chat_template._FAST_RENDERS[fast_tok].values()
        assert fast is not None and fast.calls > _FAST_CHECK_FIRST  # past the spot-checked calls
        with monkeypatch.context() as mp:
            mp.setattr(chat_template, "_fast_render_for", lambda tokenizer: None)
            slow_options = DataConfig(cache_dir=str(tmp_path / name / "slow"))
            prepare(slow_options, slow_tok, progress=False, verbose=False)
        assert slow_tok not in chat_template._FAST_RENDERS
        fast_files = sorted(p.relative_to(tmp_path / name / "fast") for p in (tmp_path / name / "fast").rglob("*.npy"))
        slow_files = sorted(p.relative_to(tmp_path / name / "slow") for p in (tmp_path / name / "slow").rglob("*.npy"))
        assert fast_files and fast_files == slow_files
        for rel in fast_files:
            assert (tmp_path / name / "fast" / rel).read_bytes() == (tmp_path / name / "slow" / rel).read_bytes(), rel


# ------------------------------------------------------------------------------------------------
# Disabled when it would differ


def test_disabled_when_its_template_variables_differ_on_the_probes(monkeypatch):
    assert chat_template._fast_render_for(tokenizer_for(ENDS_WITH_EOS)) is not None  # unpatched: used
    monkeypatch.setattr(chat_template, "_template_variables",
                        lambda tok: {**tok.special_tokens_map, "eos_token": "</s>"})
    tok = tokenizer_for(ENDS_WITH_EOS)
    assert chat_template._fast_render_for(tok) is None
    turns = conv_of(*DIALOGUE).turns
    assert apply_template(tok, turns, False, "test[c]") == hf(tok, turns, False)
    assert "<|im_end|>" in hf(tok, turns, False)


def test_disabled_when_apply_chat_template_passes_a_variable_it_does_not(monkeypatch):
    tok = tokenizer_for(READS_DATE)
    monkeypatch.setattr(tok, "apply_chat_template", functools.partial(tok.apply_chat_template,
                                                                      date_string="26 Jul 2024"))
    assert chat_template._fast_render_for(tok) is None
    assert apply_template(tok, conv_of(*DIALOGUE).turns, False, "test[c]").startswith("26 Jul 2024user: ")


def test_not_used_when_transformers_helpers_are_missing(monkeypatch):
    # A transformers without the private helpers (apply_chat_template keeps the real module it imported).
    monkeypatch.setitem(sys.modules, "transformers.utils.chat_template_utils", types.ModuleType("moved"))
    tok = tokenizer_for(QWEN25)
    assert chat_template._fast_render_for(tok) is None
    turns = conv_of(*DIALOGUE).turns
    assert apply_template(tok, turns, True, "test[c]") == hf(tok, turns, True)


def test_apply_chat_template_renders_what_the_fast_render_does_not_handle():
    # No chat template: the same TemplateError as before.
    tok = make_tokenizer(eos_token="</s>")
    assert chat_template._fast_render_for(tok) is None
    with pytest.raises(TemplateError, match=r"test\[c\]: .*failed: ValueError: Cannot use chat template"):
        apply_template(tok, conv_of(*DIALOGUE).turns, False, "test[c]")
    # An empty conversation, a str subclass as content: left to apply_chat_template.
    tok = tokenizer_for(QWEN25)
    fast = fast_of(tok)
    calls = fast.calls
    with pytest.raises(TemplateError, match=r"failed: ValueError: Cannot apply chat template to an empty"):
        apply_template(tok, [], True, "test[c]")

    class Text(str):
        pass

    turns = [Turn("client", Text("我最近总是失眠。"))]
    assert apply_template(tok, turns, True, "test[c]") == hf(tok, turns, True)
    assert fast.calls == calls


def test_a_changed_template_or_special_token_is_noticed():
    tok = tokenizer_for(ENDS_WITH_EOS)
    turns = conv_of(*DIALOGUE).turns
    assert apply_template(tok, turns, False, "test[c]") == hf(tok, turns, False)
    tok.eos_token = "</s>"
    assert apply_template(tok, turns, False, "test[c]") == hf(tok, turns, False)
    assert "</s>" in hf(tok, turns, False)
    tok.chat_template = QWEN25
    assert apply_template(tok, turns, False, "test[c]") == hf(tok, turns, False)
    assert "You are a helpful assistant." in hf(tok, turns, False)
    assert set(chat_template._FAST_RENDERS[tok]) == {ENDS_WITH_EOS, QWEN25}
    assert all(fast is not None for fast in chat_template._FAST_RENDERS[tok].values())


# ------------------------------------------------------------------------------------------------
# Spot checks


def test_spot_checks_raise_on_a_difference(monkeypatch):
    tok = tokenizer_for(QWEN25)
    fast = fast_of(tok)
    # A planted bug: the fast render uses another template from now on.
    monkeypatch.setattr(fast, "compiled", chat_template_utils._compile_jinja_template(ENDS_WITH_EOS))
    turns = conv_of(*DIALOGUE).turns
    fast.calls = 0
    with pytest.raises(RuntimeError, match=r"test\[c\]: .*tokenizer .* \(template sha1 [0-9a-f]{12}.*differs "
                                           r"from tokenizer.apply_chat_template.*bug in soulchat's fast render"):
        apply_template(tok, turns, False, "test[c]")
    # Between the checked calls the fast render is trusted (that is what makes it fast) ...
    fast.calls = _FAST_CHECK_FIRST
    assert apply_template(tok, turns, False, "test[c]") != hf(tok, turns, False)
    # ... and one call in _FAST_CHECK_EVERY is checked again.
    fast.calls = _FAST_CHECK_EVERY - 1
    with pytest.raises(RuntimeError, match="bug in soulchat's fast render"):
        apply_template(tok, turns, False, "test[c]")


def test_spot_checks_raise_when_only_one_path_raises(monkeypatch):
    tok = tokenizer_for(QWEN25)
    fast = fast_of(tok)
    monkeypatch.setattr(fast, "compiled", chat_template_utils._compile_jinja_template(RAISES_ON_SYSTEM))
    fast.calls = 0
    with pytest.raises(RuntimeError, match="fast raised TemplateError: 系统提示不被支持, apply_chat_template returned"):
        apply_template(tok, conv_of(*DIALOGUE, system="你好").turns, False, "test[c]")


# ------------------------------------------------------------------------------------------------
# {% generation %} blocks rendered in place

# A TRL-style training template whose generation block sets a variable: inside transformers' macro
# call the assignment stays in the block, so "after" still reads the outer value.
GENERATION_SCOPE = (
    "{%- set mark = 'outer' %}{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}"
    "{%- if m.role == 'assistant' %}{%- generation %}{%- set mark = 'inner' %}{{- m.content + '<|im_end|>' }}"
    "{%- endgeneration %}{%- else %}{{- m.content + '<|im_end|>' }}{%- endif %}{{- '\\n' + mark + '\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.mark.parametrize("name", ["bundled", "generation_scope"])
def test_generation_blocks_render_in_place_with_the_same_text(name):
    tok = load_tokenizer(None) if name == "bundled" else tokenizer_for(GENERATION_SCOPE)
    assert "generation" in tok.chat_template
    fast = fast_of(tok)
    # Not transformers' compiled template: the generation tag is parsed by soulchat's in-place extension.
    assert _generation_tag(fast) == "InlineGeneration"
    fast.calls = _FAST_CHECK_FIRST  # past the spot checks: the fast render alone
    for turns in conversations():
        for generation_prompt in (False, True):
            assert outcome(tok, turns, generation_prompt) == "text: " + hf(tok, turns, generation_prompt)
    if name == "generation_scope":
        assert "inner" not in hf(tok, conv_of(*DIALOGUE).turns, False)  # the scope the test is about


def _generation_tag(fast) -> str:
    """The name of the extension that parses {% generation %} in the fast render's environment."""
    tags = {tag: type(ext).__name__ for ext in fast.compiled.environment.extensions.values() for tag in ext.tags}
    return tags["generation"]


def test_templates_without_generation_blocks_keep_the_compiled_template():
    assert _generation_tag(fast_of(tokenizer_for(QWEN25))) == "AssistantTracker"

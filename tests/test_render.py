"""Templates, the counselor mask, loss weights and splitting, on tiny tokenizers built in the test."""

from __future__ import annotations

import functools
import re
import warnings
from collections import Counter

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from soulchat.data.chat_template import CANONICAL_ROLE, TemplateError
from soulchat.data.conversation import Conversation, Turn
from soulchat.data.plans import plan_for
from soulchat.data.render import (
    BatchRenderer,
    render_and_tokenize,
    render_conversation,
    render_prompt,
    tokenize_conversation,
)
from soulchat.data.templates import builtin_chat_template, spans_by_prefixes

SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
]
HEADER_SPECIALS = ["<|im_start|>", "<s>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]

CORPUS = [
    "我最近总是失眠，晚上睡不着。", "听起来你最近很辛苦，能多说说吗？", "工作压力很大，老板总是批评我。",
    "我理解这种压力，被批评一定很难受。", "谢谢你听我说。", "不客气，我一直都在。",
    "用户：你好\n心理咨询师：你好，有什么想聊的吗？", "hello world system user assistant INST",
]

# Qwen2.5-style: injects a default system prompt when none is given.
QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
    "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Llama-3-style headers; writes its own bos and trims content.
LLAMA3 = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# Mistral/Llama-2 [INST] style: bos, system folded into the first user message, " " before each reply.
MISTRAL = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set system_message = '' %}"
    "{%- set loop_messages = messages %}{%- endif %}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- if loop.first and system_message %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}{%- else %}"
    "{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)
# Mistral-v0.3-style: the system prompt goes into the LAST user message, so it moves as turns are added.
MISTRAL_LAST_SYSTEM = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- set ns = namespace(last_user=-1) %}{%- for m in loop_messages %}{%- if m.role == 'user' %}"
    "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}{%- if loop.index0 == ns.last_user and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}{%- else %}"
    "{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- else %}{{- message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)
# Qwen3-style: the reply after the last user message gets an (empty) think block, earlier ones do not,
# so a reply renders differently once later turns follow.
QWEN3_LIKE = (
    "{%- set ns = namespace(last_user=-1) %}{%- for m in messages %}{%- if m.role == 'user' %}"
    "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}{%- for m in messages %}"
    "{%- if m.role == 'assistant' and loop.index0 > ns.last_user %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Strips the reasoning (text before "</think>") from past replies only.
STRIP_PAST_REASONING = (
    "{%- for m in messages %}{%- set content = m.content %}"
    "{%- if m.role == 'assistant' and not loop.last and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1] %}{%- endif %}"
    "{{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# ChatGLM2-style round numbers: the pieces between turns depend on the position (no constant pieces).
ROUNDS = (
    "{%- for m in messages %}{%- if m.role == 'user' %}{{- '[Round ' ~ (loop.index0 // 2 + 1) ~ ']\\n\\n问：' "
    "+ m.content + '\\n\\n答：' }}{%- else %}{{- m.content + eos_token + '\\n\\n' }}{%- endif %}{%- endfor %}"
)

# Per template: (tokenizer kwargs, what precedes each reply in the trained text, the end marker).
CASES = {
    "qwen25": (dict(chat_template=QWEN25, eos_token="<|im_end|>"), "auto", "", "<|im_end|>"),
    "llama3": (
        dict(chat_template=LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
        "auto", "", "<|eot_id|>",
    ),
    "mistral": (dict(chat_template=MISTRAL, bos_token="<s>", eos_token="</s>"), "auto", " ", "</s>"),
    "rounds": (dict(chat_template=ROUNDS, eos_token="</s>"), "auto", "", "</s>"),
    "soulchat": (dict(eos_token="<|endoftext|>"), "soulchat", "", "<|endoftext|>"),
    "chatml": (dict(eos_token="<|im_end|>"), "chatml", "", "<|im_end|>"),
}


@functools.lru_cache(maxsize=None)
def _trained_backend(pretokenizer: str) -> str:
    tok = Tokenizer(models.BPE())
    if pretokenizer == "gpt2":  # GPT-2 regex: punctuation never merges with the letters after it
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:  # Qwen2 regex: one punctuation character may lead a run of letters ("：我")
        qwen = (
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
            r"\s*[\r\n]+|\s+(?!\S)|\s+"
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(qwen), behavior="isolated"),
            pre_tokenizers.ByteLevel(use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20 + ["心理咨询师：我理解你。"] * 50, trainer)
    return tok.to_str()


def make_tokenizer(pretokenizer: str = "gpt2", add_bos: str | None = None, **kwargs):
    tok = Tokenizer.from_str(_trained_backend(pretokenizer))
    if add_bos is not None:  # a tokenizer that adds bos by itself, like Llama's
        tok.post_processor = processors.TemplateProcessing(
            single=f"{add_bos} $A", special_tokens=[(add_bos, tok.token_to_id(add_bos))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kwargs)


def conv_of(*texts: str, system: str | None = None, cid: str = "c") -> Conversation:
    turns = [Turn("system", system)] if system else []
    turns += [Turn("client" if i % 2 == 0 else "counselor", t) for i, t in enumerate(texts)]
    return Conversation(turns, cid, topic="情绪", source=f"test[{cid}]")


DIALOGUE = ("我最近总是失眠。", "听起来你最近很辛苦，能多说说吗？", "工作压力很大。", "我理解这种压力。",
            "谢谢你听我说。", "不客气，我一直都在。")


def runs(tc) -> list[tuple[int, int]]:
    """[start, end) token index ranges of the contiguous trained runs."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], tc.trained.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def trained_texts(tok, tc) -> list[str]:
    return [tok.decode(tc.input_ids[a:b].tolist(), skip_special_tokens=False) for a, b in runs(tc)]


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------------------------------------
# The mask


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("system", [None, "你是一位温暖的心理咨询师。"], ids=["no_system", "system"])
def test_mask_trains_exactly_counselor_content_and_end_marker(case, system):
    kwargs, template, lead, marker = CASES[case]
    tok = make_tokenizer(**kwargs)
    conv = conv_of(*DIALOGUE, system=system)
    stats = Counter()
    (tc,) = render_and_tokenize([conv], tok, template, max_length=None, stats=stats)
    assert tc.input_ids.dtype == np.int32 and tc.trained.dtype == bool and tc.weight.dtype == np.float32
    assert tc.id == "c" and tc.topic == "情绪"
    assert trained_texts(tok, tc) == [lead + t + marker for t in DIALOGUE[1::2]]
    # No header token is ever a target, and the token before each reply is a header's last token.
    header_ids = {tok.convert_tokens_to_ids(s) for s in HEADER_SPECIALS}
    assert not header_ids & set(tc.input_ids[tc.trained].tolist())
    for a, _ in runs(tc):
        assert not tc.trained[a - 1]
    assert stats["straddling_tokens"] == 0
    assert stats["trained_tokens"] == tc.trained.sum() and stats["tokens"] == len(tc.input_ids)


@pytest.mark.parametrize("case", list(CASES))
def test_mask_on_random_conversations(case):
    # Replies with stray spaces and newlines, several turn counts, with and without a system prompt.
    kwargs, template, lead, marker = CASES[case]
    tok = make_tokenizer(**kwargs)
    trims = case == "llama3"
    rng = np.random.default_rng(1)
    convs = []
    for k in range(12):
        n = 2 * int(rng.integers(1, 5))
        texts = [rng.choice(["", " ", "\n"]) + CORPUS[int(rng.integers(0, 6))] + rng.choice(["", "  "])
                 for _ in range(n)]
        convs.append(conv_of(*texts, system="系统" if k % 3 == 0 else None, cid=str(k)))
    stats = Counter()
    out = list(render_and_tokenize(convs, tok, template, None, stats=stats))
    assert [tc.id for tc in out] == [c.id for c in convs]
    for conv, tc in zip(convs, out):
        replies = [t.text.strip() if trims else t.text for t in conv.turns if t.role == "counselor"]
        assert trained_texts(tok, tc) == [lead + r + marker for r in replies]
    assert stats["straddling_tokens"] == 0


def test_hf_assistant_mask_is_empty_without_generation_markers_but_ours_is_not():
    tok = make_tokenizer(chat_template=QWEN25, eos_token="<|im_end|>")
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(DIALOGUE)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    assert sum(out["assistant_masks"]) == 0  # why render.py does not use it
    (tc,) = render_and_tokenize([conv_of(*DIALOGUE)], tok, "auto", None)
    assert tc.input_ids.tolist() == out["input_ids"]  # same tokens as HF's own tokenization
    assert tc.trained.sum() > 0


@pytest.mark.parametrize("case", list(CASES))
def test_render_prompt_is_exactly_the_text_before_each_reply(case):
    kwargs, template, _, _ = CASES[case]
    tok = make_tokenizer(**kwargs)
    conv = conv_of(*DIALOGUE, system="你是一位温暖的心理咨询师。")
    rendered = render_conversation(conv, tok, template)
    counselor_at = [i for i, t in enumerate(conv.turns) if t.role == "counselor"]
    assert len(rendered.spans) == len(counselor_at)
    for (start, _), i in zip(rendered.spans, counselor_at):
        assert render_prompt(conv.turns[:i], tok, template) == rendered.text[:start]
    with pytest.raises(ValueError, match="client turn"):
        render_prompt(conv.turns[:3], tok, template)


def test_builtin_formats():
    tok = make_tokenizer(eos_token="<|endoftext|>")
    conv = conv_of("你好", "你好，有什么想聊的吗？", system="系统提示")
    assert render_conversation(conv, tok, "soulchat").text == (
        "系统提示\n用户：你好\n心理咨询师：你好，有什么想聊的吗？<|endoftext|>"
    )
    assert render_prompt(conv.turns[:2], tok, "soulchat") == "系统提示\n用户：你好\n心理咨询师："
    assert render_conversation(conv, tok, "chatml").text == (
        "<|im_start|>system\n系统提示<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n你好，有什么想聊的吗？<|im_end|>\n"
    )


def test_trimming_template_falls_back_to_prefix_renders_and_trains_trimmed_text():
    # Llama-3 trims content: padded replies do not match the compiled pieces and take the prefix path.
    tok = make_tokenizer(chat_template=LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    conv = conv_of("  我最近总是失眠。 ", "\n听起来你很辛苦。  ", "嗯", " 我理解。")
    (tc,) = render_and_tokenize([conv], tok, "auto", None)
    assert trained_texts(tok, tc) == ["听起来你很辛苦。<|eot_id|>", "我理解。<|eot_id|>"]


@pytest.mark.parametrize("case", ["qwen25", "llama3", "mistral", "rounds"])
def test_compiled_pieces_agree_with_prefix_renders(case):
    kwargs, template, _, _ = CASES[case]
    tok = make_tokenizer(**kwargs)
    plan = plan_for(tok, template)
    assert (plan.pieces is None) == (case == "rounds")  # round numbers are not constant pieces
    rng = np.random.default_rng(0)
    for k in range(20):
        n = int(rng.integers(1, 5)) * 2
        texts = [CORPUS[int(j)] for j in rng.integers(0, 6, size=n)]
        conv = conv_of(*texts, system="系统" if k % 2 else None)
        rendered = render_conversation(conv, tok, template)
        assert rendered.spans == spans_by_prefixes(tok, conv.turns, rendered.text, "test")


def test_template_that_rewrites_earlier_turns_is_refused():
    tok = make_tokenizer(chat_template=QWEN3_LIKE, eos_token="<|im_end|>")
    with pytest.raises(TemplateError, match="inconsistent.*rewrites earlier turns.*--render-mode per-turn"
                                            ".*--template chatml"):
        list(render_and_tokenize([conv_of(*DIALOGUE)], tok, "auto", None, render_mode="conversation"))
    # The built-in chatml template is the way out.
    (tc,) = render_and_tokenize([conv_of(*DIALOGUE)], tok, "chatml", None)
    assert trained_texts(tok, tc) == [t + "<|im_end|>" for t in DIALOGUE[1::2]]


def test_template_that_strips_past_reasoning_is_refused_on_such_data():
    tok = make_tokenizer(chat_template=STRIP_PAST_REASONING, eos_token="<|im_end|>")
    fine = conv_of(*DIALOGUE)
    assert len(list(render_and_tokenize([fine], tok, "auto", None, render_mode="conversation"))) == 1
    with pytest.raises(TemplateError, match="rewrites earlier turns.*--render-mode per-turn") as err:
        list(render_and_tokenize([conv_of("你好", "想一想</think>你好呀", "嗯", "好的")], tok, "auto", None,
                                 render_mode="conversation"))
    assert "test[c]" in str(err.value)  # names the record


def test_template_that_moves_the_system_prompt_is_refused_only_with_one():
    tok = make_tokenizer(chat_template=MISTRAL_LAST_SYSTEM, bos_token="<s>", eos_token="</s>")
    (tc,) = render_and_tokenize([conv_of(*DIALOGUE)], tok, "auto", None, render_mode="conversation")
    assert trained_texts(tok, tc) == [t + "</s>" for t in DIALOGUE[1::2]]
    with pytest.raises(TemplateError, match="system prompt"):
        list(render_and_tokenize([conv_of(*DIALOGUE, system="系统")], tok, "auto", None,
                                 render_mode="conversation"))


def test_unusable_templates_raise_early():
    with pytest.raises(TemplateError, match="has none"):
        list(render_and_tokenize([], make_tokenizer(eos_token="</s>"), "auto", None))
    with pytest.raises(TemplateError, match="unknown template"):
        list(render_and_tokenize([], make_tokenizer(eos_token="</s>"), "llama", None))
    with pytest.raises(TemplateError, match="eos"):
        list(render_and_tokenize([], make_tokenizer(), "soulchat", None))
    # A tokenizer without the chatml tokens: "<|im_start|>" would be trained as plain text pieces.
    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="a")
    with pytest.raises(TemplateError, match="chatml.*one token"):
        list(render_and_tokenize([], word_level, "chatml", None))
    # A tokenizer that reads control tokens in text as plain text: the template's tokens would be lost.
    splitting = make_tokenizer(chat_template=QWEN25, eos_token="<|im_end|>", split_special_tokens=True)
    with pytest.raises(TemplateError, match="<\\|im_start\\|>.* 0 times"):
        list(render_and_tokenize([], splitting, "auto", None))
    with pytest.raises(ValueError, match="overflow"):
        list(render_and_tokenize([], make_tokenizer(eos_token="</s>"), "chatml", 8, overflow="cut"))


def test_bos_written_once():
    # A template that writes bos itself: exactly one bos token, never trained.
    tok = make_tokenizer(chat_template=LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    (tc,) = render_and_tokenize([conv_of(*DIALOGUE)], tok, "auto", None)
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert tc.input_ids[0] == bos and (tc.input_ids == bos).sum() == 1
    # A tokenizer that adds bos by itself: the built-in templates write it, once.
    tok = make_tokenizer(add_bos="<s>", bos_token="<s>", eos_token="</s>")
    bos = tok.convert_tokens_to_ids("<s>")
    for template in ("soulchat", "chatml"):
        (tc,) = render_and_tokenize([conv_of(*DIALOGUE)], tok, template, None)
        assert tc.input_ids[0] == bos and (tc.input_ids == bos).sum() == 1 and not tc.trained[0]
        assert render_prompt(conv_of("你好").turns, tok, template).startswith("<s>")
    # One that does not: no bos.
    tok = make_tokenizer(bos_token="<s>", eos_token="</s>")
    assert not render_conversation(conv_of(*DIALOGUE), tok, "soulchat").text.startswith("<s>")


def test_straddling_token_is_never_trained():
    # With the Qwen2 regex "：我" is one pre-token and BPE merges it: the header's "：" shares a token
    # with the reply's first character. That token must not be trained.
    tok = make_tokenizer(pretokenizer="qwen", eos_token="<|endoftext|>")
    conv = conv_of("你好", "我理解你。")
    with pytest.warns(UserWarning, match="straddle"):  # found on the probe conversation
        rendered = render_conversation(conv, tok, "soulchat")
    ((start, end),) = rendered.spans
    assert rendered.text[start - 1 : end] == "：我理解你。<|endoftext|>"
    offsets = tok(rendered.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert any(a < start < b for a, b in offsets)  # the straddling token exists
    stats = Counter()
    (tc,) = render_and_tokenize([conv], tok, "soulchat", None, stats=stats)
    for (a, b), trained in zip(offsets, tc.trained):
        assert trained == (start <= a and b <= end)  # exactly the tokens made of reply characters
    assert stats["straddling_tokens"] == 1
    assert trained_texts(tok, tc)[-1].endswith("<|endoftext|>")


# ------------------------------------------------------------------------------------------------
# Loss weights


@pytest.mark.parametrize("case", ["qwen25", "soulchat"])
def test_loss_weights(case):
    kwargs, template, _, _ = CASES[case]
    tok = make_tokenizer(**kwargs)
    conv = conv_of(*DIALOGUE)
    (tok_w,) = render_and_tokenize([conv], tok, template, None, loss_weighting="token")
    (turn_w,) = render_and_tokenize([conv], tok, template, None, loss_weighting="turn")
    (conv_w,) = render_and_tokenize([conv], tok, template, None, loss_weighting="conversation")
    assert np.array_equal(tok_w.weight, tok_w.trained.astype(np.float32))
    for tc in (turn_w, conv_w):
        assert np.array_equal(tc.trained, tok_w.trained) and np.all(tc.weight[~tc.trained] == 0)
    assert [turn_w.weight[a:b].sum() for a, b in runs(turn_w)] == pytest.approx([1.0, 1.0, 1.0])
    assert conv_w.weight.sum() == pytest.approx(1.0)
    assert np.allclose(conv_w.weight[conv_w.trained], 1.0 / conv_w.trained.sum())


# ------------------------------------------------------------------------------------------------
# Over-long conversations


LONG = [f"第{i}句" + "我理解这种压力" * (1 + i % 3) for i in range(12)]  # 6 units of varying length


def _window_turns(conv, tok, tc):
    """The turns a window holds, found from the texts it shows (all texts are distinct)."""
    text = tok.decode(tc.input_ids.tolist(), skip_special_tokens=False)
    first = min(i for i, t in enumerate(conv.turns) if t.role == "client" and t.text in text)
    last = max(i for i, t in enumerate(conv.turns) if t.role == "counselor" and t.text in text)
    return first, last, text


@pytest.mark.parametrize("template", ["chatml", "auto"])
@pytest.mark.parametrize("system", [None, "你是一位温暖的心理咨询师。"], ids=["no_system", "system"])
def test_split_windows_train_each_reply_once_within_max_length(template, system):
    tok = make_tokenizer(chat_template=QWEN25, eos_token="<|im_end|>")
    conv = conv_of(*LONG, system=system)
    full = n_tokens(tok, render_conversation(conv, tok, template).text)
    max_length = full // 3
    stats = Counter()
    out = list(
        render_and_tokenize([conv], tok, template, max_length, loss_weighting="conversation", stats=stats)
    )
    assert len(out) >= 3 and stats["split"] == 1 and stats["windows"] == len(out) == stats["sequences"]
    assert [tc.id for tc in out] == [f"c#w{k}" for k in range(len(out))]
    assert all(len(tc.input_ids) <= max_length for tc in out)
    # Every reply trained exactly once, in order.
    trained = [s for tc in out for s in trained_texts(tok, tc)]
    assert trained == [t + "<|im_end|>" for t in LONG[1::2]]
    assert sum(tc.weight.sum() for tc in out) == pytest.approx(1.0)  # the whole conversation sums to 1
    system_turns = [conv.turns[0]] if system else []
    context_turns = []
    for tc in out:
        first, last, text = _window_turns(conv, tok, tc)
        first_trained = last - 2 * len(trained_texts(tok, tc)) + 1  # client turn of the first trained reply
        assert conv.turns[first].role == "client" and conv.turns[last].role == "counselor"
        context_turns.append(first_trained - first)
        if system:  # kept: it fits easily
            assert system in text
        # Maximal: one more turn pair of context, or one more trained reply, would not fit.
        if first - 2 >= len(system_turns):
            longer = system_turns + conv.turns[first - 2 : last + 1]
            assert n_tokens(tok, render_conversation(longer, tok, template).text) > max_length
        if last + 2 < len(conv.turns):
            longer = system_turns + conv.turns[first_trained : last + 3]
            assert n_tokens(tok, render_conversation(longer, tok, template).text) > max_length
    assert context_turns[0] == 0


def test_split_keeps_preceding_context_that_fits():
    # Four short turn pairs fill the first window; the long last reply gets a window of its own, in which
    # the short turns before it come along as (untrained) context.
    tok = make_tokenizer(eos_token="<|im_end|>")
    short = [f"第{i}句话" for i in range(8)]
    long_reply = "我理解这种压力。" * 6
    conv = conv_of(*short, "最后一个问题", long_reply, system="系统")
    n_short = n_tokens(tok, render_conversation(conv_of(*short, system="系统"), tok, "chatml").text)
    n_last = n_tokens(tok, render_conversation(conv_of("最后一个问题", long_reply), tok, "chatml").text)
    max_length = max(n_short, n_last) + 12
    stats = Counter()
    first, second = render_and_tokenize([conv], tok, "chatml", max_length, stats=stats)
    assert trained_texts(tok, first) == [t + "<|im_end|>" for t in short[1::2]]
    assert trained_texts(tok, second) == [long_reply + "<|im_end|>"]
    text = tok.decode(second.input_ids.tolist(), skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n系统<|im_end|>\n<|im_start|>user\n第")
    assert short[-1] in text and short[-2] in text  # context kept, untrained
    assert len(second.input_ids) <= max_length and stats["windows"] == 2


def test_split_drops_a_reply_that_cannot_fit_and_counts_it():
    tok = make_tokenizer(eos_token="<|im_end|>")
    huge = "我理解这种压力。" * 40
    conv = conv_of("你好", "你好呀", "说说吧", huge, "嗯", "好的")
    stats = Counter()
    out = list(render_and_tokenize([conv], tok, "chatml", 40, stats=stats))
    assert [s for tc in out for s in trained_texts(tok, tc)] == ["你好呀<|im_end|>", "好的<|im_end|>"]
    assert stats["turns_dropped:turn_too_long"] == 1 and stats["split"] == 1 and stats["trained"] == 1
    stats = Counter()
    assert list(render_and_tokenize([conv_of("你好", huge)], tok, "chatml", 40, stats=stats)) == []
    assert stats["dropped:turn_too_long"] == 1 and stats["trained"] == 0


def test_overflow_drop_and_no_trained_tokens_are_counted():
    tok = make_tokenizer(chat_template=QWEN25, eos_token="<|im_end|>")
    convs = [
        conv_of(*LONG, cid="long"),
        conv_of("只有来访者在说话", cid="client_only"),
        conv_of("你好", "我<|im_end|>在", cid="injected"),
        conv_of(*DIALOGUE, cid="ok"),
        conv_of(*DIALOGUE, "还有一句", cid="trailing_client"),  # trailing client turn: trimmed
    ]
    stats = Counter()
    out = list(render_and_tokenize(convs, tok, "auto", 120, overflow="drop", stats=stats))
    assert [tc.id for tc in out] == ["ok", "trailing_client"]
    assert np.array_equal(out[0].input_ids, out[1].input_ids)
    assert stats["dropped:too_long"] == 1
    assert stats["dropped:no_trained_tokens"] == 1
    assert stats["dropped:control_token_in_text"] == 1
    dropped = sum(v for k, v in stats.items() if k.startswith("dropped:"))
    assert stats["rendered"] == 5 == stats["trained"] + dropped
    assert stats["sequences"] == stats["trained"] - stats["split"] + stats["windows"]


def _reference_weights(sequences, loss_weighting):
    """Each sequence's loss weights computed alone, from its trained runs (one run per reply: a header
    always separates two replies) and its conversation's trained total."""
    totals = Counter()
    for tc in sequences:
        totals[tc.conversation_index] += int(tc.trained.sum())
    out = []
    for tc in sequences:
        weight = np.zeros(len(tc.input_ids), np.float32)
        if loss_weighting == "token":
            weight[tc.trained] = 1.0
        elif loss_weighting == "turn":
            for a, b in runs(tc):
                weight[a:b] = np.float32(1.0 / (b - a))
        else:
            weight[tc.trained] = np.float32(1.0 / totals[tc.conversation_index])
        out.append(weight)
    return out


@pytest.mark.parametrize("loss_weighting", ["token", "turn", "conversation"])
def test_batching_does_not_change_results(loss_weighting):
    # Weights are computed for a whole batch at once: any batch size gives each sequence the weights it
    # has alone, with windows of one conversation in the same batch or not.
    tok = make_tokenizer(chat_template=LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    convs = [conv_of(*DIALOGUE[: 2 * k], cid=str(k)) for k in range(1, 4)] + [conv_of(*LONG, cid="long")]
    convs += [conv_of(*DIALOGUE, cid="last")]
    a = list(render_and_tokenize(convs, tok, "auto", 60, loss_weighting=loss_weighting, batch_size=1))
    assert sum(x.id.startswith("long#w") for x in a) > 2
    for batch_size in (2, 3, 256):
        b = list(render_and_tokenize(convs, tok, "auto", 60, loss_weighting=loss_weighting,
                                     batch_size=batch_size))
        assert [x.id for x in a] == [x.id for x in b]
        for x, y in zip(a, b):
            assert np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.trained, y.trained)
            assert x.weight.dtype == np.float32 and np.array_equal(x.weight, y.weight)
            assert x.conversation_index == y.conversation_index and x.topic == y.topic
    for x, want in zip(a, _reference_weights(a, loss_weighting)):
        assert np.array_equal(x.weight, want)


def test_sequence_batch_round_trips_through_pickle():
    import pickle

    tok = make_tokenizer(chat_template=LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    renderer = BatchRenderer(tok, "auto", 60, loss_weighting="turn")
    convs = [conv_of(*DIALOGUE, cid="a"), conv_of(*LONG, cid="b")]
    ready = renderer.render(list(enumerate(convs)), Counter())
    batch = renderer.finish(ready, renderer.encode(ready), Counter())
    again = pickle.loads(pickle.dumps(batch))
    assert len(again) == len(batch) == len(list(batch)) > 2
    assert int(again.lengths.sum()) == len(again.input_ids) == len(again.trained) == len(again.weight)
    for x, y in zip(batch, again):
        assert (x.id, x.topic, x.conversation_index) == (y.id, y.topic, y.conversation_index)
        assert np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.weight, y.weight)


def test_tokenize_conversation_helper():
    tok = make_tokenizer(eos_token="<|endoftext|>")
    (tc,) = tokenize_conversation(conv_of(*DIALOGUE), tok, "soulchat")
    assert trained_texts(tok, tc) == [t + "<|endoftext|>" for t in DIALOGUE[1::2]]
    stats = Counter()
    assert tokenize_conversation(conv_of("你好"), tok, "soulchat", stats=stats) == []
    assert stats["dropped:no_trained_tokens"] == 1
    assert re.match(r"^用户：你好\n心理咨询师：$", render_prompt(conv_of("你好").turns, tok, "soulchat"))


@pytest.mark.parametrize("template", ["soulchat", "chatml"])
@pytest.mark.parametrize("add_bos", [None, "<s>"], ids=["no_bos", "bos"])
def test_builtin_chat_template_renders_like_the_builtin(template, add_bos):
    tok = make_tokenizer(add_bos=add_bos, bos_token="<s>", eos_token="<|endoftext|>")
    exported = make_tokenizer(add_bos=add_bos, bos_token="<s>", eos_token="<|endoftext|>")
    exported.chat_template = builtin_chat_template(tok, template)
    for system in (None, "系统\n提示"):
        conv = conv_of(*DIALOGUE, "还有'引号\"和\\反斜杠", system=system)
        messages = [{"role": CANONICAL_ROLE[t.role], "content": t.text} for t in conv.turns]
        full = render_conversation(conv_of(*DIALOGUE, system=system), tok, template).text
        assert exported.apply_chat_template(messages[:-1], tokenize=False) == full
        prompt = exported.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert prompt == render_prompt(conv.turns, tok, template)
    with pytest.raises(TemplateError):
        builtin_chat_template(tok, "auto")


def test_sequences_carry_the_index_of_their_conversation():
    # Ids repeat and one conversation is dropped: the index, not the id, says where a sequence came from.
    tok = make_tokenizer(chat_template=QWEN25, eos_token="<|im_end|>")
    long = conv_of(*LONG, cid="same")
    no_reply = Conversation([Turn("client", "你好")], "same")
    short = conv_of(*DIALOGUE, cid="same")
    max_length = n_tokens(tok, render_conversation(short, tok, "auto").text)
    assert n_tokens(tok, render_conversation(long, tok, "auto").text) > 2 * max_length
    stats = Counter()
    out = list(render_and_tokenize([short, no_reply, long, short], tok, "auto", max_length, stats=stats,
                                   first_index=10))
    assert stats["dropped:no_trained_tokens"] == 1 and stats["split"] == 1
    windows = stats["windows"]
    assert [tc.conversation_index for tc in out] == [10] + [12] * windows + [13]
    assert tokenize_conversation(short, tok, "auto")[0].conversation_index == 0


# ------------------------------------------------------------------------------------------------
# Layering of the render modules

# Lower layers never import higher ones (not even for type checking or inside a function), and no module
# imports another's underscore names: what they share is public in the module that owns it.
RENDER_LAYERS = ("pieces", "templates", "encode", "plans", "windows", "render", "workers", "pipeline")


def test_render_modules_import_one_way_and_only_public_names():
    import ast
    import pathlib

    import soulchat.data

    root = pathlib.Path(soulchat.data.__file__).parent
    rank = {name: i for i, name in enumerate(RENDER_LAYERS)}
    seen = 0
    for name in RENDER_LAYERS:
        for node in ast.walk(ast.parse((root / f"{name}.py").read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("soulchat.data."):
                continue
            target = node.module.removeprefix("soulchat.data.")
            if target not in rank:
                continue
            seen += 1
            assert rank[target] < rank[name], f"soulchat/data/{name}.py imports {target} (a higher layer)"
            private = [a.name for a in node.names if a.name.startswith("_")]
            assert not private, f"soulchat/data/{name}.py imports private {private} from {target}"
    assert seen >= 10  # the walk saw the imports it checks

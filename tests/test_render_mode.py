"""Render modes: per-turn samples for templates that are not prefix-stable, auto's choice, the report."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from test_render import DIALOGUE, LONG, QWEN25, conv_of, make_tokenizer, n_tokens, runs, trained_texts

from soulchat.data.chat_template import CANONICAL_ROLE
from soulchat.data.conversation import Turn
from soulchat.data.render import (
    TemplateError,
    render_and_tokenize,
    render_conversation,
    render_prompt,
    resolve_render_mode,
    tokenize_conversation,
)
from soulchat.options import ConfigError, DataConfig

# After Qwen3's public template: a reply after the last user turn gets a think block (empty when the reply
# has no reasoning), earlier replies none, and their reasoning is stripped. The generation prompt holds
# an empty think block when thinking is off.
QWEN3 = (
    "{%- set ns = namespace(last_query=-1) %}{%- for m in messages %}{%- if m.role == 'user' %}"
    "{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- if m.role == 'assistant' %}"
    "{%- set content = m.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content }}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
QWEN3_NO_THINKING = "{%- set enable_thinking = false %}" + QWEN3
# After DeepSeek-R1-style reasoning templates: the reasoning (up to "</think>") is stripped from past
# replies; the reply being generated keeps it.
STRIPS_REASONING = (
    "{%- for m in messages %}{%- set content = m.content %}"
    "{%- if m.role == 'assistant' and not loop.last and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
UNSTABLE = {"qwen3": QWEN3, "qwen3_no_thinking": QWEN3_NO_THINKING, "strips_reasoning": STRIPS_REASONING}

REASONING_DIALOGUE = (
    "我最近总是失眠。", "<think>\n先共情，再询问。\n</think>\n\n听起来你最近很辛苦，能多说说吗？",
    "工作压力很大。", "<think>\n压力来自工作。\n</think>\n\n我理解这种压力。",
    "谢谢你听我说。", "不客气，我一直都在。",
)


def tokenizer_for(chat_template: str):
    return make_tokenizer(chat_template=chat_template, eos_token="<|im_end|>")


def messages(turns) -> list[dict[str, str]]:
    return [{"role": CANONICAL_ROLE[t.role], "content": t.text} for t in turns]


def hf_prompt(tok, turns) -> str:
    return tok.apply_chat_template(messages(turns), tokenize=False, add_generation_prompt=True)


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def expected_reply(case: str, text: str) -> str:
    """The text a per-turn sample trains for reply ``text``: everything the model generates after the
    generation prompt, as the template renders the reply last."""
    if case == "qwen3" and "</think>" not in text:
        return "<think>\n\n</think>\n\n" + text  # thinking on, no reasoning: the empty think block is trained
    if case == "qwen3":
        reasoning, content = text.split("</think>")
        reasoning = reasoning.split("<think>")[-1].strip("\n")
        return "<think>\n" + reasoning + "\n</think>\n\n" + content.lstrip("\n")
    return text


# ------------------------------------------------------------------------------------------------
# Choosing the mode


@pytest.mark.parametrize("case", list(UNSTABLE))
def test_auto_picks_per_turn_for_templates_that_are_not_prefix_stable(case):
    tok = tokenizer_for(UNSTABLE[case])
    assert resolve_render_mode(tok, "auto", "auto") == "per-turn"
    assert resolve_render_mode(tok, "auto", "per-turn") == "per-turn"


def test_auto_picks_conversation_for_prefix_stable_templates():
    from soulchat.data.assets import load_tokenizer

    cases = [(tokenizer_for(QWEN25), "auto"), (tokenizer_for(QWEN25), "chatml"),
             (make_tokenizer(eos_token="<|endoftext|>"), "soulchat"), (load_tokenizer(None), "auto")]
    for tok, template in cases:
        assert resolve_render_mode(tok, template, "auto") == "conversation"
        assert resolve_render_mode(tok, template, "per-turn") == "per-turn"
    with pytest.raises(ValueError, match="render_mode"):
        resolve_render_mode(tokenizer_for(QWEN25), "auto", "whole")


def test_conversation_mode_refuses_unstable_templates_naming_per_turn():
    with pytest.raises(TemplateError, match="rewrites earlier turns.*--render-mode per-turn"):
        resolve_render_mode(tokenizer_for(QWEN3), "auto", "conversation")
    # A template that strips reasoning renders plain conversations whole, and refuses reasoning data.
    tok = tokenizer_for(STRIPS_REASONING)
    (tc,) = render_and_tokenize([conv_of(*DIALOGUE)], tok, "auto", None, render_mode="conversation")
    assert trained_texts(tok, tc) == [t + "<|im_end|>" for t in DIALOGUE[1::2]]
    with pytest.raises(TemplateError, match="test\\[c\\].*rewrites earlier turns.*--render-mode per-turn"):
        list(render_and_tokenize([conv_of(*REASONING_DIALOGUE)], tok, "auto", None,
                                 render_mode="conversation"))


def test_data_config_render_mode_is_validated_and_a_flag_of_prepare():
    from soulchat.data.__main__ import build_parser

    assert DataConfig().render_mode == "auto"
    assert DataConfig(render_mode="per-turn").render_mode == "per-turn"
    with pytest.raises(ConfigError, match="render_mode|render-mode"):
        DataConfig(render_mode="turns")
    args = build_parser().parse_args(["prepare", "--render-mode", "per-turn"])
    assert vars(args)["data.render_mode"] == "per-turn"


# ------------------------------------------------------------------------------------------------
# Per-turn samples


@pytest.mark.parametrize("case", list(UNSTABLE))
@pytest.mark.parametrize("system", [None, "你是一位温暖的心理咨询师。"], ids=["no_system", "system"])
@pytest.mark.parametrize("dialogue", [DIALOGUE, REASONING_DIALOGUE], ids=["plain", "reasoning"])
def test_per_turn_sample_is_the_generation_prompt_then_the_reply(case, system, dialogue):
    tok = tokenizer_for(UNSTABLE[case])
    conv = conv_of(*dialogue, system=system)
    stats = Counter()
    if case == "qwen3_no_thinking" and dialogue is REASONING_DIALOGUE:
        # Thinking off, the prompt ends in an empty think block: a reply with reasoning cannot follow it.
        refused = "test\\[c\\]\\) counselor turn [12]: .*holds reasoning.*--thinking on"
        with pytest.raises(TemplateError, match=refused):
            list(render_and_tokenize([conv], tok, "auto", None, stats=stats))
        return
    out = list(render_and_tokenize([conv], tok, "auto", None, stats=stats))
    counselor_at = [i for i, t in enumerate(conv.turns) if t.role == "counselor"]
    assert [tc.id for tc in out] == [f"c#t{k}" for k in range(len(counselor_at))]
    for tc, i in zip(out, counselor_at):
        prompt = hf_prompt(tok, conv.turns[:i])
        assert prompt == render_prompt(conv.turns[:i], tok, "auto")  # chat and evaluate see the same
        reply = expected_reply(case, conv.turns[i].text) + "<|im_end|>"
        # Token for token: the prompt's tokens, then what the model generates after it (Qwen3 with thinking
        # on: the think block, empty without reasoning), the reply and its end marker, nothing after.
        assert tc.input_ids.tolist() == ids_of(tok, prompt + reply)
        assert tc.input_ids[: len(ids_of(tok, prompt))].tolist() == ids_of(tok, prompt)
        # The mask lands exactly on the reply: one run, ending at the last token.
        assert trained_texts(tok, tc) == [reply]
        ((a, b),) = runs(tc)
        assert b == len(tc.input_ids) and a == len(ids_of(tok, prompt))
    assert stats["straddling_tokens"] == 0 and stats["trained"] == 1 and stats["sequences"] == len(out)


@pytest.mark.parametrize("case", list(UNSTABLE))
def test_per_turn_loss_weights_keep_the_papers_objective(case):
    tok = tokenizer_for(UNSTABLE[case])
    conv = conv_of(*(DIALOGUE if case == "qwen3_no_thinking" else REASONING_DIALOGUE))
    by_weighting = {w: list(render_and_tokenize([conv], tok, "auto", None, loss_weighting=w))
                    for w in ("token", "turn", "conversation")}
    for w, out in by_weighting.items():
        assert len(out) == 3
        for tc, ref in zip(out, by_weighting["token"]):
            assert np.array_equal(tc.trained, ref.trained) and np.all(tc.weight[~tc.trained] == 0)
    assert all(np.array_equal(tc.weight, tc.trained.astype(np.float32)) for tc in by_weighting["token"])
    assert [tc.weight.sum() for tc in by_weighting["turn"]] == pytest.approx([1.0, 1.0, 1.0])  # each turn 1
    total = sum(int(tc.trained.sum()) for tc in by_weighting["conversation"])
    assert sum(tc.weight.sum() for tc in by_weighting["conversation"]) == pytest.approx(1.0)
    assert all(np.allclose(tc.weight[tc.trained], 1.0 / total) for tc in by_weighting["conversation"])


@pytest.mark.parametrize("template", ["auto", "chatml", "soulchat"])
def test_per_turn_on_a_prefix_stable_template_trains_the_same_tokens_as_whole_conversations(template):
    # For a prefix-stable template sample k is the whole render cut after reply k: the same reply tokens
    # in the same context as in the whole conversation.
    tok = tokenizer_for(QWEN25)
    conv = conv_of(*DIALOGUE, system="系统")
    (whole,) = render_and_tokenize([conv], tok, template, None, render_mode="conversation")
    samples = list(render_and_tokenize([conv], tok, template, None, render_mode="per-turn"))
    assert len(samples) == 3
    for (a, b), tc in zip(runs(whole), samples):
        assert tc.input_ids.tolist() == whole.input_ids[:b].tolist()
        assert runs(tc) == [(a, b)]


def test_per_turn_sample_whose_prompt_is_not_its_prefix_is_refused_naming_the_conversation():
    # The generation prompt adds text when the last client turn asks a question; the reply renders
    # without it: training would not see what inference sees.
    template = STRIPS_REASONING.replace(
        "{{- '<|im_start|>assistant\\n' }}{%- endif %}",
        "{{- '<|im_start|>assistant\\n' }}{%- if messages[-1].content.endswith('？') %}{{- '嗯，' }}"
        "{%- endif %}{%- endif %}",
    )
    tok = tokenizer_for(template)
    assert len(list(render_and_tokenize([conv_of(*DIALOGUE)], tok, "auto", None))) == 3
    with pytest.raises(TemplateError, match="test\\[q\\].*does not start with the generation prompt"):
        list(render_and_tokenize([conv_of("你还好吗？", "我很好。", cid="q")], tok, "auto", None))


def test_render_conversation_of_one_reply_works_for_unstable_templates():
    # One reply renders consistently even for Qwen3 (chat reads the end marker from such a render); with
    # thinking on its empty think block is generated, so trained.
    tok = tokenizer_for(QWEN3)
    rendered = render_conversation([Turn("client", "你好"), Turn("counselor", "嗯。")], tok, "auto")
    ((start, end),) = rendered.spans
    assert rendered.text[start:end] == "<think>\n\n</think>\n\n嗯。<|im_end|>"
    with pytest.raises(TemplateError, match="--render-mode per-turn"):
        render_conversation(conv_of(*DIALOGUE).turns, tok, "auto")


# ------------------------------------------------------------------------------------------------
# Over-long samples


@pytest.mark.parametrize("system", [None, "你是一位温暖的心理咨询师。"], ids=["no_system", "system"])
def test_over_long_sample_keeps_the_latest_context_that_fits(system):
    tok = tokenizer_for(QWEN3_NO_THINKING)
    conv = conv_of(*LONG, system=system)
    system_turns = conv.turns[:1] if system else []
    body = conv.turns[len(system_turns):]
    full = list(render_and_tokenize([conv], tok, "auto", None))
    max_length = len(full[-1].input_ids) // 2
    stats = Counter()
    out = list(render_and_tokenize([conv], tok, "auto", max_length, stats=stats))
    assert len(out) == len(LONG) // 2 and all(len(tc.input_ids) <= max_length for tc in out)
    assert stats["samples_shortened"] == sum(len(tc.input_ids) > max_length for tc in full) > 0
    assert stats["split"] == 0 and stats["trained"] == 1
    for k, tc in enumerate(out):
        reply = body[2 * k + 1]
        assert trained_texts(tok, tc) == [reply.text + "<|im_end|>"]
        # The context is system (kept: it fits) + the latest turns; its prompt is the generation prompt.
        def sample_ids(c: int) -> list[int]:
            return ids_of(tok, hf_prompt(tok, system_turns + body[c : 2 * k + 1]) + reply.text + "<|im_end|>")

        context = next(body[c : 2 * k + 1] for c in range(0, 2 * k + 1, 2)
                       if tc.input_ids.tolist() == sample_ids(c))
        if len(full[k].input_ids) <= max_length:
            assert context == body[: 2 * k + 1]  # not over-long: untouched
        else:  # one more turn pair of context would not fit
            longer = system_turns + body[2 * k - len(context) - 1 : 2 * k + 2]
            assert n_tokens(tok, hf_prompt(tok, longer[:-1]) + reply.text + "<|im_end|>") > max_length


def test_over_long_samples_drop_and_count_as_in_conversation_mode():
    tok = tokenizer_for(QWEN3)
    huge = "我理解这种压力。" * 40
    stats = Counter()
    out = list(render_and_tokenize([conv_of("你好", "你好呀", "说说吧", huge, "嗯", "好的")], tok, "auto", 60,
                                   stats=stats))
    think = "<think>\n\n</think>\n\n"  # thinking on, no reasoning: the empty think block is generated
    want = [think + "你好呀<|im_end|>", think + "好的<|im_end|>"]
    assert [s for tc in out for s in trained_texts(tok, tc)] == want
    assert stats["turns_dropped:turn_too_long"] == 1 and stats["trained"] == 1
    stats = Counter()
    assert list(render_and_tokenize([conv_of("你好", huge)], tok, "auto", 60, stats=stats)) == []
    assert stats["dropped:turn_too_long"] == 1 and stats["trained"] == 0
    stats = Counter()
    convs = [conv_of(*LONG, cid="long"), conv_of(*DIALOGUE, cid="ok")]
    out = list(render_and_tokenize(convs, tok, "auto", 120, overflow="drop", stats=stats))
    assert {tc.conversation_index for tc in out} == {1} and stats["dropped:too_long"] == 1
    assert stats["rendered"] == 2 == stats["trained"] + stats["dropped:too_long"]


def test_tokenize_conversation_for_evaluation_is_per_turn_like_training():
    tok = tokenizer_for(QWEN3)
    conv = conv_of(*DIALOGUE)
    evaluated = tokenize_conversation(conv, tok, "auto", 1024)
    trained = list(render_and_tokenize([conv], tok, "auto", 1024, render_mode="per-turn"))
    assert [tc.input_ids.tolist() for tc in evaluated] == [tc.input_ids.tolist() for tc in trained]


# ------------------------------------------------------------------------------------------------
# prepare(): the report, and stores of prefix-stable templates unchanged


def _write_corpus(path, dialogues) -> None:
    records = [{"id": k, "topic": "情绪", "messages": [
        {"role": "user" if j % 2 == 0 else "assistant", "content": t} for j, t in enumerate(d)]}
        for k, d in enumerate(dialogues)]
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")


def test_prepare_reports_the_render_mode_and_the_per_turn_token_cost(tmp_path):
    from soulchat.data.pipeline import format_report, prepare

    corpus = tmp_path / "corpus.json"
    _write_corpus(corpus, [DIALOGUE, REASONING_DIALOGUE, DIALOGUE[:4]] * 4)
    options = DataConfig(data=corpus, cache_dir=str(tmp_path / "pt"), eval_fraction=0.0, workers=1)
    store = prepare(options, tokenizer_for(QWEN3), progress=False, verbose=False)
    report = store.report
    assert report["render_mode"] == "per-turn" and report["sequences"] == 4 * (3 + 3 + 2)
    assert report["per_turn_tokens"] == report["tokens"]
    assert report["per_turn_token_ratio"] == pytest.approx(report["tokens"] / report["conversation_tokens"])
    assert report["per_turn_token_ratio"] > 1.5
    assert "per-turn (" in format_report(report)
    with pytest.raises(TemplateError, match="--render-mode per-turn"):
        prepare(DataConfig(data=corpus, cache_dir=str(tmp_path / "c"), eval_fraction=0.0, workers=1,
                           render_mode="conversation"), tokenizer_for(QWEN3), progress=False, verbose=False)


STORE_FILES = ("tokens.npy", "trained.npy", "weight.npy", "seq_offsets.npy", "row_offsets.npy",
               "row_seqs.npy")


def test_prefix_stable_store_is_the_same_in_auto_and_conversation_mode(tmp_path):
    # The bundled corpus and tokenizer (a prefix-stable chatml template): auto renders whole conversations,
    # byte for byte as conversation mode; per-turn would train exactly the same counselor tokens, and its
    # token count is what conversation mode predicted.
    from soulchat.data.pipeline import prepare

    def build(mode: str, max_length: int):
        options = DataConfig(render_mode=mode, max_length=max_length, loss_weighting="turn", workers=1,
                             cache_dir=str(tmp_path / f"{mode}{max_length}"))
        return prepare(options, None, progress=False, verbose=False)

    auto, conversation = build("auto", 256), build("conversation", 256)
    for part in ("", "eval/"):
        for name in STORE_FILES:
            assert (auto.path / part / name).read_bytes() == (conversation.path / part / name).read_bytes()
    assert (auto.path / "heldout.json").read_bytes() == (conversation.path / "heldout.json").read_bytes()
    assert auto.report["render_mode"] == "conversation"
    assert auto.report["conversations_split"] > 0  # max_length 256 splits most of them
    # Long enough for no split and no shortening: per-turn trains the same counselor tokens.
    whole, per_turn = build("conversation", 4096).report, build("per-turn", 4096).report
    assert per_turn["render_mode"] == "per-turn" and per_turn["samples_shortened"] == 0
    assert per_turn["trained_tokens"] + per_turn["heldout"]["trained_tokens"] == (
        whole["trained_tokens"] + whole["heldout"]["trained_tokens"])
    assert per_turn["per_turn_tokens"] == whole["per_turn_tokens"]
    assert whole["per_turn_token_ratio"] > 1.5


def test_template_that_moves_the_system_prompt_renders_per_turn():
    # Mistral-v0.3-style: the system prompt sits in the last user message, so it moves as turns follow.
    from test_render import MISTRAL_LAST_SYSTEM

    tok = make_tokenizer(chat_template=MISTRAL_LAST_SYSTEM, bos_token="<s>", eos_token="</s>")
    assert resolve_render_mode(tok, "auto") == "per-turn"
    conv = conv_of(*DIALOGUE, system="系统")
    out = list(render_and_tokenize([conv], tok, "auto", None))
    for tc, i in zip(out, (2, 4, 6)):
        prompt = render_prompt(conv.turns[:i], tok, "auto")
        assert prompt == hf_prompt(tok, conv.turns[:i])
        assert prompt.endswith("系统\n\n" + conv.turns[i - 1].text + "[/INST]")
        assert tc.input_ids.tolist() == ids_of(tok, prompt + conv.turns[i].text + "</s>")
        assert trained_texts(tok, tc) == [conv.turns[i].text + "</s>"]

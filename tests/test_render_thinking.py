"""The thinking contract on reasoning-model chat templates written for these tests after each family's
format (DeepSeek-R1 distills, QwQ, DeepSeek-V3.1, GLM-4.6, Qwen3 with thinking on and off).

The rule under test: a sample's text is the inference prompt ``apply_chat_template(turns[:i],
add_generation_prompt=True, <thinking flags>)`` followed by every character the model generates after it,
and exactly that is trained. The expected completions below are written out by hand per family, from the
format's documentation, independently of soulchat's code.
"""

from __future__ import annotations

from collections import Counter

import pytest

# The GLM-4.6-style template ends a reply with no end-of-turn text: every render of it warns so (asserted in
# test_end_marker_of_every_family); the other tests here are about what is trained.
pytestmark = pytest.mark.filterwarnings("ignore:template .* puts no end-of-turn marker:UserWarning")
from test_render import conv_of, make_tokenizer, runs, trained_texts
from test_render_mode import QWEN3

from soulchat.data.chat_template import CANONICAL_ROLE
from soulchat.data.conversation import Turn, join_reasoning, split_reasoning
from soulchat.data.render import (
    TemplateError,
    end_marker,
    render_and_tokenize,
    render_prompt,
    resolve_render_mode,
)

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
DEEPSEEK_SPECIALS = [BOS, EOS, "<｜User｜>", "<｜Assistant｜>"]
GLM_SPECIALS = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>"]

# After DeepSeek-R1-Distill: system text right after bos, reasoning stripped from every reply (the last one
# too, "\n\n" after </think> kept), the generation prompt opens a think block.
R1_DISTILL = (
    "{{- bos_token }}{%- if messages and messages[0].role == 'system' %}{{- messages[0].content }}{%- endif %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{{- '<｜User｜>' + m.content }}"
    "{%- elif m.role == 'assistant' %}{%- set c = m.content %}"
    "{%- if '</think>' in c %}{%- set c = c.split('</think>')[-1] %}{%- endif %}"
    "{{- '<｜Assistant｜>' + c + '<｜end▁of▁sentence｜>' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<｜Assistant｜><think>\\n' }}{%- endif %}"
)
# After QwQ: ChatML, reasoning stripped from every reply, the generation prompt opens a think block.
QWQ = (
    "{%- for m in messages %}{%- if m.role == 'assistant' %}"
    "{%- set c = m.content.split('</think>')[-1].lstrip('\\n') %}"
    "{{- '<|im_start|>assistant\\n' + c + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)
# After DeepSeek-V3.1: replies render after an empty "</think>" with their reasoning stripped; the
# generation prompt opens "<think>" when `thinking` is set, else closes it (thinking off by default).
V31 = (
    "{{- bos_token }}{%- if messages and messages[0].role == 'system' %}{{- messages[0].content }}{%- endif %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{{- '<｜User｜>' + m.content }}"
    "{%- elif m.role == 'assistant' %}{%- set c = m.content %}"
    "{%- if '</think>' in c %}{%- set c = c.split('</think>', 1)[1] %}{%- endif %}"
    "{{- '<｜Assistant｜></think>' + c + '<｜end▁of▁sentence｜>' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<｜Assistant｜>' }}"
    "{%- if thinking is defined and thinking %}{{- '<think>' }}{%- else %}{{- '</think>' }}{%- endif %}"
    "{%- endif %}"
)
# After GLM-4.6: a reply keeps its reasoning only after the last user turn (earlier ones get an empty
# "<think></think>"), no end-of-turn text (generation stops at the next role token), thinking off appends
# "/nothink" to user turns and closes an empty think block in the generation prompt.
GLM46 = (
    "[gMASK]<sop>{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}"
    "{%- endfor %}{%- set off = enable_thinking is defined and not enable_thinking %}"
    "{%- for m in messages %}{%- if m.role == 'system' %}{{- '<|system|>\\n' + m.content }}"
    "{%- elif m.role == 'user' %}{{- '<|user|>\\n' + m.content }}{%- if off %}{{- '/nothink' }}{%- endif %}"
    "{%- else %}{%- set c = m.content %}{%- set r = '' %}"
    "{%- if '</think>' in c %}{%- set r = c.split('</think>')[0].split('<think>')[-1].strip() %}"
    "{%- set c = c.split('</think>')[-1] %}{%- endif %}{{- '<|assistant|>' }}"
    "{%- if loop.index0 > ns.last_user and r %}{{- '\\n<think>' + r + '</think>' }}"
    "{%- else %}{{- '\\n<think></think>' }}{%- endif %}{{- '\\n' + c.strip() }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- if off %}{{- '\\n<think></think>' }}{%- endif %}"
    "{%- endif %}"
)


def family_tokenizer(family: str):
    template, specials, kwargs = {
        "r1_distill": (R1_DISTILL, DEEPSEEK_SPECIALS, dict(bos_token=BOS, eos_token=EOS)),
        "qwq": (QWQ, [], dict(eos_token="<|im_end|>")),
        "v31": (V31, DEEPSEEK_SPECIALS, dict(bos_token=BOS, eos_token=EOS)),
        "glm46": (GLM46, GLM_SPECIALS, dict(eos_token="<|endoftext|>")),
        "qwen3": (QWEN3, [], dict(eos_token="<|im_end|>")),
    }[family]
    tok = make_tokenizer(chat_template=template)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.add_tokens(["<think>", "</think>"])  # added, not special, as in the families' tokenizers
    for name, value in kwargs.items():
        setattr(tok, name, value)
    return tok


# (reasoning or None, reply, the data's whitespace between </think> and the reply) -> the text the model
# generates after the prompt, per family and thinking.
def r1_like(end: str):
    return lambda r, c, _: (r or "") + "\n</think>\n\n" + c + end  # after "<think>\n" in the prompt


EXPECTED = {
    ("r1_distill", None): r1_like(EOS),
    ("r1_distill", True): r1_like(EOS),
    ("qwq", None): r1_like("<|im_end|>"),
    # After "<think>": V3.1 renders the reply as the data spells it after "</think>".
    ("v31", True): lambda r, c, sep: (r or "") + "</think>" + sep + c + EOS,
    ("v31", None): lambda r, c, _: c + EOS,  # after "</think>": no reasoning possible
    ("v31", False): lambda r, c, _: c + EOS,
    ("glm46", None): lambda r, c, _: "\n<think>" + (r or "") + "</think>\n" + c,
    ("glm46", False): lambda r, c, _: "\n" + c,  # after the prompt's "\n<think></think>"
    ("qwen3", None): lambda r, c, _: "<think>\n" + (r or "") + "\n</think>\n\n" + c + "<|im_end|>",
    ("qwen3", True): lambda r, c, _: "<think>\n" + (r or "") + "\n</think>\n\n" + c + "<|im_end|>",
    ("qwen3", False): lambda r, c, _: c + "<|im_end|>",  # after the prompt's empty think block
}
# Per family and thinking: the render mode auto picks (prefix-stable only where every reply renders after
# the prompt as it is generated, with and without reasoning).
MODE = {("v31", None): "conversation", ("v31", False): "conversation",
        ("glm46", False): "conversation"}

PLAIN = ("我最近总是失眠。", "听起来你最近很辛苦，能多说说吗？", "工作压力很大。", "我理解这种压力。")
REASONS = ("来访者失眠，先共情。", "压力来自工作，请她多说。")


def reasoning_dialogue(spelling: str) -> tuple[str, ...]:
    u1, c1, u2, c2 = PLAIN
    r1, r2 = REASONS
    return (u1, spelling.format(r=r1, c=c1), u2, spelling.format(r=r2, c=c2))


SPELLINGS = {"qwen": "<think>\n{r}\n</think>\n\n{c}", "tight": "<think>{r}</think>{c}"}


def hf_prompt(tok, turns, thinking) -> str:
    flags = {} if thinking is None else {"enable_thinking": thinking, "thinking": thinking}
    messages = [{"role": CANONICAL_ROLE[t.role], "content": t.text} for t in turns]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **flags)


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family,thinking", list(EXPECTED), ids=[f"{f}-{t}" for f, t in EXPECTED])
@pytest.mark.parametrize("system", [None, "你是一位温暖的心理咨询师。"], ids=["no_system", "system"])
@pytest.mark.parametrize("data", ["plain", "qwen", "tight"])
def test_every_token_generated_after_the_inference_prompt_is_trained(family, thinking, system, data):
    tok = family_tokenizer(family)
    dialogue = PLAIN if data == "plain" else reasoning_dialogue(SPELLINGS[data])
    conv = conv_of(*dialogue, system=system)
    expected = EXPECTED[family, thinking]
    assert resolve_render_mode(tok, "auto", "auto", thinking) == MODE.get((family, thinking), "per-turn")
    stats = Counter()
    thinking_off = (("v31", None), ("v31", False), ("glm46", False), ("qwen3", False))
    if data != "plain" and (family, thinking) in thinking_off:
        # Thinking off: the prompt leaves no room for reasoning; refused, naming the flag that fixes it.
        with pytest.raises(TemplateError, match="test\\[c\\].*reasoning.*--thinking on"):
            list(render_and_tokenize([conv], tok, "auto", None, stats=stats, thinking=thinking))
        return
    out = list(render_and_tokenize([conv], tok, "auto", None, stats=stats, thinking=thinking))
    start = 1 if system else 0
    counselor_at = [start + 1, start + 3]
    if MODE.get((family, thinking)) == "conversation":  # one sequence: the whole render, both replies trained
        (tc,) = out
        assert trained_texts(tok, tc) == [expected(None, PLAIN[1], ""), expected(None, PLAIN[3], "")]
        for (a, b), i in zip(runs(tc), counselor_at):
            prompt = hf_prompt(tok, conv.turns[:i], thinking)
            assert tc.input_ids[:a].tolist() == ids_of(tok, prompt)
        return
    assert len(out) == 2 and stats["straddling_tokens"] == 0
    for tc, i, k in zip(out, counselor_at, (0, 1)):
        reasoning = None if data == "plain" else REASONS[k]
        sep = "\n\n" if data == "qwen" else ""
        completion = expected(reasoning, PLAIN[2 * k + 1], sep)
        prompt = hf_prompt(tok, conv.turns[:i], thinking)
        assert render_prompt(conv.turns[:i], tok, "auto", thinking) == prompt  # what chat and evaluate send
        assert tc.input_ids.tolist() == ids_of(tok, prompt + completion)
        assert trained_texts(tok, tc) == [completion]
        assert runs(tc) == [(len(ids_of(tok, prompt)), len(tc.input_ids))]


@pytest.mark.parametrize("family", ["r1_distill", "qwq"])
def test_templates_whose_prompt_opens_a_think_block_refuse_conversation_mode_and_thinking_off(family):
    tok = family_tokenizer(family)
    with pytest.raises(TemplateError, match="opens a think block.*--render-mode per-turn"):
        resolve_render_mode(tok, "auto", "conversation")
    with pytest.raises(TemplateError, match="--thinking off: .*opens a think block whatever"):
        resolve_render_mode(tok, "auto", "auto", thinking=False)


def test_thinking_on_is_refused_for_templates_without_a_thinking_mode():
    from test_render import QWEN25

    tok = make_tokenizer(chat_template=QWEN25, eos_token="<|im_end|>")
    with pytest.raises(TemplateError, match="--thinking on: the chat template has no thinking mode"):
        resolve_render_mode(tok, "auto", "auto", thinking=True)
    assert resolve_render_mode(tok, "auto", "auto", thinking=False) == "conversation"  # off: what it does
    for template in ("chatml", "soulchat"):
        with pytest.raises(TemplateError, match=f"--thinking on: template '{template}' has no thinking mode"):
            resolve_render_mode(make_tokenizer(eos_token="<|im_end|>"), template, "auto", thinking=True)


def test_glm46_style_reasoning_goes_per_turn_and_the_refusal_names_the_flag():
    # Plain replies render the same wherever they stand; a reply's reasoning is kept only while it is the
    # last one: the reasoning probes must catch it.
    tok = family_tokenizer("glm46")
    assert resolve_render_mode(tok, "auto", "auto") == "per-turn"
    conv = conv_of(*reasoning_dialogue(SPELLINGS["qwen"]))
    with pytest.raises(TemplateError, match="rewrites earlier turns.*--render-mode per-turn"):
        list(render_and_tokenize([conv], tok, "auto", None, render_mode="conversation"))


def test_end_marker_of_every_family():
    want = {"r1_distill": EOS, "qwq": "<|im_end|>", "v31": EOS, "glm46": "", "qwen3": "<|im_end|>"}
    for family, marker in want.items():
        if marker:
            assert end_marker(family_tokenizer(family), "auto") == marker, family
        else:  # nothing would teach the model to stop: said once per template
            with pytest.warns(UserWarning, match="puts no end-of-turn marker after counselor replies"):
                assert end_marker(family_tokenizer(family), "auto") == marker, family


def test_split_reasoning_reads_both_spellings():
    assert split_reasoning("<think>\n想一想\n</think>\n\n回答") == ("想一想", "回答")
    assert split_reasoning("<think>想一想</think>回答") == ("想一想", "回答")
    assert split_reasoning("<think></think>回答") == ("", "回答")
    assert split_reasoning("回答<think>x</think>") == (None, "回答<think>x</think>")  # not a prefix
    assert split_reasoning("<think>没有结束") == (None, "<think>没有结束")
    # A record's reasoning_content is read into the first spelling, and back.
    assert join_reasoning("想一想", "回答") == "<think>\n想一想\n</think>\n\n回答"
    assert split_reasoning(join_reasoning("\n想一想\n", "回答")) == ("想一想", "回答")


def test_reasoning_content_field_and_think_prefix_read_and_train_the_same(tmp_path):
    import json

    from soulchat.data.readers import read_conversations

    def record(spelling: str) -> dict:
        messages = [{"role": "user", "content": PLAIN[0]}]
        for k, (reply, reason) in enumerate(zip(PLAIN[1::2], REASONS)):
            if spelling == "field":
                messages.append({"role": "assistant", "content": reply, "reasoning_content": reason})
            else:
                messages.append({"role": "assistant", "content": f"<think>\n{reason}\n</think>\n\n{reply}"})
            if k == 0:
                messages.append({"role": "user", "content": PLAIN[2]})
        return {"id": "c", "messages": messages}

    read = {}
    for spelling in ("field", "prefix"):
        path = tmp_path / f"{spelling}.jsonl"
        path.write_text(json.dumps(record(spelling), ensure_ascii=False) + "\n", encoding="utf-8")
        (conv,) = read_conversations([path])
        read[spelling] = conv
    assert read["field"].turns == read["prefix"].turns
    tok = family_tokenizer("qwen3")
    samples = {s: list(render_and_tokenize([c], tok, "auto", None)) for s, c in read.items()}
    ids = {s: [tc.input_ids.tolist() for tc in out] for s, out in samples.items()}
    assert ids["field"] == ids["prefix"]
    assert trained_texts(tok, samples["field"][1]) == [
        "<think>\n" + REASONS[1] + "\n</think>\n\n" + PLAIN[3] + "<|im_end|>"]


@pytest.mark.parametrize("message,problem", [
    ({"role": "user", "content": "你好", "reasoning_content": "想"}, "only counselor replies carry reasoning"),
    ({"role": "assistant", "content": "<think>想</think>好", "reasoning_content": "想"}, "keep one of the two"),
    ({"role": "assistant", "content": "好", "reasoning_content": ["想"]}, "reasoning_content is a list"),
])
def test_bad_reasoning_content_is_a_data_error_naming_the_record(tmp_path, message, problem):
    import json

    from soulchat.data.conversation import DataError
    from soulchat.data.readers import read_conversations

    messages = [{"role": "user", "content": "你好"}, message] if message["role"] != "user" else [message]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": messages}, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"bad.jsonl.*{problem}.*--on-error skip") as err:
        list(read_conversations([path]))
    assert err.value.reason == "bad_reasoning"


def test_reasoning_without_a_reply_is_a_data_error():
    from soulchat.data.conversation import DataError

    tok = family_tokenizer("qwen3")
    with pytest.raises(DataError, match="test\\[c\\].*reasoning and no reply") as err:
        list(render_and_tokenize([conv_of("你好", "<think>想一想</think>")], tok, "auto", None))
    assert err.value.reason == "empty_content"


# After gpt-oss: reasoning only from the message's reasoning field, written in its own channel, and only
# for a reply after the last user turn; a "<think>" prefix would be rendered as reply text.
FIELD_ONLY = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}"
    "{%- endfor %}{%- for m in messages %}{%- if m.role == 'assistant' %}"
    "{%- if m.reasoning_content and loop.index0 > ns.last_user %}"
    "{{- '<|im_start|>assistant<|channel|>analysis\\n' + m.reasoning_content + '<|end|>' }}{%- endif %}"
    "{{- '<|im_start|>assistant<|channel|>final\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant' }}{%- endif %}"
)


@pytest.mark.parametrize("data", ["plain", "qwen", "tight"])
def test_templates_that_read_the_reasoning_field_get_reasoning_there(data):
    tok = make_tokenizer(chat_template=FIELD_ONLY, eos_token="<|im_end|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|channel|>", "<|end|>"]})
    assert resolve_render_mode(tok, "auto", "auto") == "per-turn"  # past reasoning is dropped
    dialogue = PLAIN if data == "plain" else reasoning_dialogue(SPELLINGS[data])
    conv = conv_of(*dialogue)
    out = list(render_and_tokenize([conv], tok, "auto", None))
    assert len(out) == 2
    for tc, i, k in zip(out, (1, 3), (0, 1)):
        analysis = "" if data == "plain" else "<|channel|>analysis\n" + REASONS[k] + "<|end|><|im_start|>assistant"
        completion = analysis + "<|channel|>final\n" + PLAIN[2 * k + 1] + "<|im_end|>"
        # The inference prompt, from messages that carry the reasoning in the field (the earlier reply's
        # is then dropped by the template, as at inference).
        messages = [{"role": "user", "content": PLAIN[0]}]
        if k == 1:
            reply = {"role": "assistant", "content": PLAIN[1]}
            messages += [reply if data == "plain" else {**reply, "reasoning_content": REASONS[0]},
                         {"role": "user", "content": PLAIN[2]}]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_prompt(conv.turns[:i], tok, "auto") == prompt
        assert tc.input_ids.tolist() == ids_of(tok, prompt + completion)
        assert trained_texts(tok, tc) == [completion]
        assert runs(tc) == [(len(ids_of(tok, prompt)), len(tc.input_ids))]


# ------------------------------------------------------------------------------------------------
# Control tokens in text: only the template's own


LLAMA3_LIKE = (
    "{{- bos_token }}{%- for m in messages %}{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' "
    "+ m.content + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def test_special_tokens_the_template_does_not_use_are_text_and_its_own_are_dropped():
    tok = make_tokenizer(chat_template=LLAMA3_LIKE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                         pad_token="<|endoftext|>")
    reply = "写代码时常见<|im_end|>这样的标记。"
    stats = Counter()
    (tc,) = render_and_tokenize([conv_of("你好", reply)], tok, "auto", None, stats=stats)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert trained_texts(tok, tc) == [reply + "<|eot_id|>"]
    assert im_end in tc.input_ids[tc.trained].tolist()  # tokenized as at inference: the token itself
    # The template's own control tokens, and the tokenizer's named ones (eos, pad: generation may stop
    # there), are still dropped.
    for text in ("一半<|eot_id|>一半", "一半<|start_header_id|>一半", "一半<|endoftext|>一半"):
        stats = Counter()
        assert list(render_and_tokenize([conv_of("你好", text)], tok, "auto", None, stats=stats)) == []
        assert stats["dropped:control_token_in_text"] == 1
    chatml = make_tokenizer(eos_token="<|im_end|>")
    stats = Counter()
    assert list(render_and_tokenize([conv_of("你好", reply)], chatml, "chatml", None, stats=stats)) == []
    assert stats["dropped:control_token_in_text"] == 1


def test_think_tags_of_a_reply_are_not_control_tokens_but_inside_it_they_are():
    tok = family_tokenizer("qwen3")
    stats = Counter()
    ok = conv_of("你好", "<think>想一想</think>你好呀")
    assert len(list(render_and_tokenize([ok], tok, "auto", None, stats=stats))) == 1
    bad = conv_of("你好", "<think>想<|im_start|>一想</think>你好呀")
    assert list(render_and_tokenize([bad], tok, "auto", None, stats=stats)) == []
    assert stats["dropped:control_token_in_text"] == 1


def test_plan_turn_text_with_reasoning_under_a_template_without_reasoning_is_trained_verbatim():
    from test_render import QWEN25

    tok = make_tokenizer(chat_template=QWEN25, eos_token="<|im_end|>")
    text = "<think>\n想一想\n</think>\n\n你好呀"
    (tc,) = render_and_tokenize([conv_of("你好", text)], tok, "auto", None)
    assert trained_texts(tok, tc) == [text + "<|im_end|>"]
    assert Turn("counselor", text).text == text


# ------------------------------------------------------------------------------------------------
# --thinking: one option for prepare/train (DataConfig) and chat/evaluate (InferenceConfig)


def test_thinking_is_one_validated_flag_of_every_command():
    from soulchat.chat import CHAT
    from soulchat.commandline import ConfigError
    from soulchat.data.__main__ import build_parser
    from soulchat.evaluate import EVALUATE
    from soulchat.inference import InferenceConfig
    from soulchat.options import DataConfig
    from soulchat.train_options import TRAIN_COMMAND

    assert DataConfig().thinking is None and InferenceConfig().thinking is None  # the template's default
    assert DataConfig(thinking="off").thinking == "off"
    for config in (DataConfig, InferenceConfig):
        with pytest.raises(ConfigError, match="thinking"):
            config(thinking="maybe")
    assert vars(build_parser().parse_args(["prepare", "--thinking", "on"]))["data.thinking"] == "on"
    assert TRAIN_COMMAND.parse(["--thinking", "off"])["data"].thinking == "off"
    assert CHAT.parse(["--model", "m", "--thinking", "off"])["inference"].thinking == "off"
    assert EVALUATE.parse(["--model", "m", "--data", "d", "--thinking", "on"])["inference"].thinking == "on"


def test_the_run_and_the_export_record_the_thinking_mode_and_chat_uses_it(tmp_path):
    import json
    import warnings

    from soulchat.inference import load_model, read_training_config
    from soulchat.kernels.dispatch import force_backend
    from soulchat.train import main as train

    run = tmp_path / "run"
    argv = [
        "--steps", "1", "--tokens-per-micro-batch", "512", "--tokens-per-step", "512", "--max-length", "512",
        "--template", "soulchat", "--thinking", "off", "--eval-fraction", "0", "--output-dir", str(run),
        "--no-progress", "--no-tensorboard",
    ]  # fmt: skip
    with force_backend("attention", "reference"), force_backend("loss", "chunked"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        export = train(argv)["export"]
    assert json.loads((run / "config.json").read_text())["data"]["thinking"] == "off"
    assert read_training_config(export)["data"]["thinking"] == "off"
    assert load_model(export).thinking == "off"  # chat and evaluate prompt as trained

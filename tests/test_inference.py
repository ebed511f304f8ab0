"""soulchat.inference: loading, template choice, context fitting, generation, the packed loss."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from soulchat import inference
from soulchat.data.conversation import Turn
from soulchat.data.readers import read_conversations
from soulchat.data.render import render_prompt, tokenize_conversation
from soulchat.inference import (
    ContextTooLong,
    InferenceConfig,
    fit_context,
    load_model,
    read_training_config,
    resolve_template,
)
from soulchat.inference.generation import _cut_at_stop
from soulchat.options import ConfigError, GenerationConfig

SAMPLE = Path(__file__).resolve().parents[1] / "soulchat" / "assets" / "sample_corpus.json"

# One intra-op thread (tests/conftest.py): a tiny-model generate() is ~8x faster on shared cores.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def prompt_length(cm, turns: list[Turn]) -> int:
    return len(cm.encode(render_prompt(turns, cm.tokenizer, cm.template)))


# ------------------------------------------------------------------------------------------------
# Loading and templates


def test_load_uses_the_training_template_and_stops_at_end_marker(cm, model_dir) -> None:
    assert cm.template == "soulchat"  # from the training config, not the tokenizer's chat template
    assert cm.template_source.endswith(("soulchat_config.json", "config.json"))
    # The soulchat template ends counselor turns with eos, which is <|im_end|> for the bundled tokenizer.
    assert cm.tokenizer.convert_tokens_to_ids("<|im_end|>") in cm.stop_ids
    prompt = render_prompt([Turn("client", "你好")], cm.tokenizer, cm.template)
    assert prompt == "用户：你好\n心理咨询师："
    assert cm.context_window == min(cm.model.config.max_position_embeddings, cm.tokenizer.model_max_length)
    assert not cm.model.training


def test_template_from_exported_training_config(tmp_path, cm) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "soulchat_config.json").write_text(json.dumps({"data": {"template": "chatml"}}))
    config = read_training_config(tmp_path / "model")
    assert resolve_template(cm.tokenizer, None, config)[0] == "chatml"
    assert resolve_template(cm.tokenizer, "soulchat", config) == ("soulchat", "--template")
    # Without a training config: the tokenizer's own chat template.
    assert resolve_template(cm.tokenizer, None, None) == ("auto", "the tokenizer's chat template")


def test_template_from_run_directory_layout(tmp_path, cm) -> None:
    # soulchat.train writes <run>/config.json (the training config) and <run>/export (the model).
    (tmp_path / "export").mkdir()
    (tmp_path / "config.json").write_text(json.dumps({"data": {"template": "chatml"}, "train": {}}))
    name, source = resolve_template(cm.tokenizer, None, read_training_config(tmp_path / "export"))
    assert name == "chatml" and "config.json" in source
    # Only a directory named "export" looks at its parent's config.json.
    (tmp_path / "other").mkdir()
    assert read_training_config(tmp_path / "other") is None


def test_prompts_use_the_recorded_thinking_mode(cm, model_dir, tmp_path) -> None:
    import shutil

    from test_render_mode import QWEN3, tokenizer_for

    from soulchat.data.chat_template import TemplateError
    from soulchat.inference import resolve_thinking

    config = {"data": {"template": "auto", "thinking": "off"}}
    assert resolve_thinking(None, config) == "off"  # recorded in training
    assert resolve_thinking("on", config) == "on"  # --thinking overrides it
    assert resolve_thinking(None, {"data": {"template": "auto"}}) is None  # the template's default
    with pytest.raises(ValueError, match="--thinking 'maybe'"):
        resolve_thinking("maybe", None)
    # The prompt chat and evaluate send is the one training built with that thinking mode.
    tok = tokenizer_for(QWEN3)
    turns = [Turn("client", "你好")]
    messages = [{"role": "user", "content": "你好"}]
    modes = (("off", {"enable_thinking": False}), ("on", {"enable_thinking": True}), (None, {}))
    for thinking, flags in modes:
        lm = dataclasses.replace(cm, tokenizer=tok, template="auto", thinking=thinking)
        ids, _ = fit_context(lm, turns, 8)
        want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **flags)
        assert tok.decode(ids) == want
    assert want != tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                           enable_thinking=False)  # the modes differ
    # load_model reads it from the model's training config: the tiny model was trained with the
    # soulchat template, which has no thinking mode, so a recorded "on" is refused and "off" kept.
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    values = json.loads((model / "soulchat_config.json").read_text())
    for recorded in ("off", "on"):
        values["data"]["thinking"] = recorded
        (model / "soulchat_config.json").write_text(json.dumps(values))
        if recorded == "off":
            assert load_model(str(model)).thinking == "off"
        else:
            refused = "--thinking on: template 'soulchat' has no thinking mode"
            with pytest.raises(TemplateError, match=refused):
                load_model(str(model))


def test_missing_model_directory_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_model(str(tmp_path / "nope"))


# ------------------------------------------------------------------------------------------------
# Prompt fitting


def test_fit_context_drops_oldest_exchanges_keeps_system(cm) -> None:
    system = Turn("system", "你是一位温暖的心理咨询师。")
    body = []
    for i in range(5):
        body += [
            Turn("client", f"第{i}个问题：我最近压力很大，睡不好觉。"),
            Turn("counselor", f"第{i}个回答：听起来你很辛苦。"),
        ]
    turns = [system, *body, Turn("client", "最后一个问题：我该怎么办？")]
    max_new = 8
    budget = prompt_length(cm, turns) - 40  # forces dropping some, not all, exchanges
    small = dataclasses.replace(cm, context_window=budget + max_new)
    ids, dropped = fit_context(small, turns, max_new)
    assert 1 <= dropped < 5 and len(ids) <= budget
    text = cm.tokenizer.decode(ids)
    assert text.startswith("你是一位温暖的心理咨询师。\n用户：") and text.endswith("心理咨询师：")
    assert "最后一个问题" in text and f"第{dropped}个问题" in text and f"第{dropped - 1}个问题" not in text
    # Minimal: keeping one more exchange would not fit.
    assert prompt_length(cm, [system, *body[2 * (dropped - 1) :], turns[-1]]) > budget
    # With room for everything nothing is dropped.
    assert fit_context(cm, turns, max_new)[1] == 0


def test_fit_context_too_long_message_raises(cm) -> None:
    small = dataclasses.replace(cm, context_window=32)
    with pytest.raises(ContextTooLong, match="shorten the message"):
        fit_context(small, [Turn("client", "我" * 200)], 8)


def test_batched_generation_equals_one_at_a_time(cm) -> None:
    # Left padding must not change a greedy reply. The 2-step model answers everything alike, so this
    # uses a fresh random tiny Qwen2 (it continues differently from different last tokens) and prompts
    # of different lengths ending in different tokens.
    from transformers import Qwen2ForCausalLM

    from soulchat.loading import tiny_qwen2_config

    torch.manual_seed(1)
    tokenizer = cm.tokenizer
    config = tiny_qwen2_config(len(tokenizer), eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    random_cm = dataclasses.replace(cm, model=Qwen2ForCausalLM(config).eval())
    options = GenerationConfig(max_new_tokens=5, do_sample=False)
    base = cm.encode("用户：我最近总是失眠，工作压力很大，晚上也睡不着。\n心理咨询师：")
    prompts = [base[:3], base[:9], base]
    alone = [inference.generate_batch(random_cm, [p], options)[0] for p in prompts]
    assert len(set(alone)) == len(alone)  # the check has power: the replies differ
    assert inference.generate_batch(random_cm, prompts, options) == alone
    assert inference.generate_replies(random_cm, prompts, options, batch_size=2) == alone


def test_generation_options_validated() -> None:
    with pytest.raises(ValueError, match="top-p"):
        GenerationConfig(top_p=1.5)
    with pytest.raises(ValueError, match="max-new-tokens"):
        GenerationConfig(max_new_tokens=0)
    assert "temperature" not in GenerationConfig(do_sample=False).generate_kwargs()




def test_load_options_validated(model_dir) -> None:
    with pytest.raises(ConfigError, match="--template"):
        InferenceConfig(template="llama")
    with pytest.raises(ConfigError, match="--dtype"):
        InferenceConfig(dtype="int8")
    with pytest.raises(ValueError, match="--max-context"):
        load_model(str(model_dir), max_context=1)
    with pytest.raises(FileNotFoundError, match="--judge: pass a local"):
        load_model(None, flag="--judge")


def test_length_batches_longest_first_ties_in_input_order() -> None:
    assert list(inference.length_batches([3, 9, 9, 1, 5], 2)) == [[1, 2], [4, 0], [3]]
    with pytest.raises(ValueError, match="--batch-size"):
        list(inference.length_batches([1], 0))


def test_generated_tokens_are_counted_up_to_the_stop_token(cm) -> None:
    counts: Counter = Counter()
    options = GenerationConfig(max_new_tokens=4, do_sample=False)
    prompts = [cm.encode("用户：你好\n心理咨询师："), cm.encode("用户：我很难过，睡不着。\n心理咨询师：")]
    replies = inference.generate_replies(cm, prompts, options, batch_size=2, counts=counts)
    assert len(replies) == 2
    assert 2 <= counts["generated_tokens"] <= 2 * 4  # at least one token (maybe the stop) per reply
    # What _cut_at_stop counts: tokens through the first stop token, never the padding after it.
    stop = cm.stop_ids[0]
    assert _cut_at_stop(cm, [5, 6, stop, stop, stop]) == ([5, 6], 3)
    assert _cut_at_stop(cm, [5, 6]) == ([5, 6], 2)


# ------------------------------------------------------------------------------------------------
# The packed training loss


def plain_forward_loss(cm, sequences) -> tuple[float, int]:
    """Reference: each sequence alone through the model's own forward with the full logits."""
    ref_sum, ref_n = 0.0, 0
    with torch.no_grad():
        for seq in sequences:
            ids = torch.from_numpy(seq.input_ids.astype(np.int64))[None]  # [1, L]
            logits = cm.model(input_ids=ids).logits[0, :-1].float()  # [L-1, V]: predicts tokens 1..L-1
            target = torch.from_numpy(seq.trained[1:].copy())  # [L-1] bool
            ce = torch.nn.functional.cross_entropy(logits[target], ids[0, 1:][target], reduction="sum")
            ref_sum += float(ce)
            ref_n += int(target.sum())
    return ref_sum, ref_n


def test_packed_loss_equals_plain_forward_and_attention_stays_inside_conversations(cm) -> None:
    convs = list(read_conversations(SAMPLE))[:4]
    sequences = [s for c in convs for s in tokenize_conversation(c, cm.tokenizer, cm.template)]
    ref_sum, ref_n = plain_forward_loss(cm, sequences)
    packed_sum, n, batches = inference.packed_loss(cm, sequences, tokens_per_micro_batch=4096)
    assert batches < len(sequences)  # conversations really share micro-batches
    assert n == ref_n > 0
    assert packed_sum / n == pytest.approx(ref_sum / ref_n, rel=1e-4)
    # One conversation per micro-batch gives the same loss: nothing leaks between neighbours.
    longest = max(len(s.input_ids) for s in sequences)
    alone_sum, alone_n, alone_batches = inference.packed_loss(cm, sequences, tokens_per_micro_batch=longest)
    assert alone_batches > batches and alone_n == n
    assert alone_sum == pytest.approx(packed_sum, rel=1e-4)


def test_packed_loss_restores_the_attention_used_for_generation(cm) -> None:
    before = cm.model.config._attn_implementation
    convs = list(read_conversations(SAMPLE))[:1]
    sequences = tokenize_conversation(convs[0], cm.tokenizer, cm.template)
    inference.packed_loss(cm, sequences, 4096)
    assert cm.model.config._attn_implementation == before != "soulchat_varlen"
    assert inference.packed_loss(cm, [], 4096) == (0.0, 0, 0)
    with pytest.raises(ValueError, match="--tokens-per-micro-batch"):
        inference.packed_loss(cm, sequences, 0)


# ------------------------------------------------------------------------------------------------
# vLLM backend (optional)


def test_vllm_backend_refused_with_one_line_when_not_installed(cm) -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vllm is installed here: the refusal path cannot be reached")
    with pytest.raises(ValueError, match="--backend hf"):
        inference.VllmGenerator(cm, seed=0)


@pytest.mark.cuda
def test_vllm_backend_generates_greedy_replies(model_dir) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("vllm")
    lm = load_model(str(model_dir), device="cuda")
    options = GenerationConfig(max_new_tokens=8, do_sample=False)
    prompts = [lm.encode("用户：你好\n心理咨询师："), lm.encode("用户：我很难过。\n心理咨询师：")]
    counts: Counter = Counter()
    generator = inference.VllmGenerator(lm, seed=0, gpu_memory_utilization=0.3)
    replies = generator.generate(prompts, options, counts)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    assert 2 <= counts["generated_tokens"] <= 2 * 8
    assert generator.generate(prompts, options) == replies  # greedy: the same replies again

"""CPU micro-benchmarks of the data path (pytest-benchmark).

    pytest bench --benchmark-only                 # from the repo root
    pytest bench --benchmark-only --benchmark-json out.json

Not part of the normal test suite: pyproject's ``testpaths = ["tests"]`` leaves bench/ out unless it is
named. Each benchmark also checks its result, so a fast wrong answer fails instead of looking good.
Throughput figures (sequences/s, tokens/s, MB/s) go to ``extra_info`` in the JSON report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from soulchat.data import synth
from soulchat.data.packing import lower_bound_rows, pack

N_LENGTHS = 100_000  # sequences packed per round
ROW_SIZE = 4096  # the GPU row size
N_DIALOGUES_JSON = 10_000  # ~14 MB of JSON: large enough that per-file costs vanish, quick enough for 2 cores


def conversation_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Token counts of ``n`` SoulChatCorpus-shaped dialogues: synth's message counts, gamma message lengths
    with the corpus means (client 41, counselor 90 characters), ~0.7 tokens per character, 3 template
    tokens per message."""
    rng = np.random.default_rng(seed)
    n_msgs = rng.choice(synth.MESSAGE_COUNTS, size=n, p=synth.MESSAGE_COUNT_P)  # [n]
    starts = np.cumsum(n_msgs) - n_msgs
    pos = np.arange(int(n_msgs.sum())) - np.repeat(starts, n_msgs)  # [M] message index in its dialogue
    chars = np.where(
        pos % 2 == 0,
        rng.gamma(4.0, synth.MEAN_CLIENT_CHARS / 4.0, size=pos.size),
        rng.gamma(5.0, synth.MEAN_COUNSELOR_CHARS / 5.0, size=pos.size),
    )
    tokens = np.maximum(1, np.rint(0.7 * chars)) + 3  # [M]
    return np.add.reduceat(tokens, starts).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Packing


def test_pack_100k(benchmark):
    lengths = conversation_lengths(N_LENGTHS)
    row_offsets, row_seqs = benchmark(pack, lengths, ROW_SIZE, 0)

    rows = len(row_offsets) - 1
    assert np.array_equal(np.sort(row_seqs), np.arange(N_LENGTHS))  # every sequence placed exactly once
    per_row = np.add.reduceat(lengths[row_seqs], row_offsets[:-1])
    assert per_row.max() <= ROW_SIZE
    assert rows <= 1.01 * lower_bound_rows(lengths, ROW_SIZE)  # BFD is within 1% of the bound here
    benchmark.extra_info.update(
        sequences=N_LENGTHS,
        rows=rows,
        sequences_per_s=N_LENGTHS / benchmark.stats.stats.median,
    )


# --------------------------------------------------------------------------------------------------
# Tokenization + counselor masks


@pytest.fixture(scope="module")
def bundled():
    from soulchat.data.pipeline import default_corpus_path, default_template, load_tokenizer
    from soulchat.data.readers import read_conversations

    tokenizer = load_tokenizer()
    conversations = list(read_conversations([default_corpus_path()]))
    return conversations, tokenizer, default_template(tokenizer)


def test_render_and_tokenize_bundled(benchmark, bundled):
    from soulchat.data.render import render_and_tokenize

    conversations, tokenizer, template = bundled

    def run():
        return list(render_and_tokenize(conversations, tokenizer, template, max_length=1024))

    seqs = benchmark(run)

    tokens = sum(len(s.input_ids) for s in seqs)
    trained = sum(int(s.trained.sum()) for s in seqs)
    assert len(seqs) >= len(conversations)  # none dropped (split windows only add)
    assert 0 < trained < tokens
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        conversations=len(conversations),
        tokens=tokens,
        conversations_per_s=len(conversations) / median,
        tokens_per_s=tokens / median,
    )


# --------------------------------------------------------------------------------------------------
# Reading a SoulChatCorpus JSON array (streamed)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "soulchat_synth.json"
    synth.write_synthetic(path, N_DIALOGUES_JSON, seed=0)
    return path


def test_read_soulchat_json_array(benchmark, corpus_file):
    from soulchat.data.readers import read_conversations

    def run():
        n = turns = 0
        for conv in read_conversations([corpus_file]):
            n += 1
            turns += len(conv.turns)
        return n, turns

    n, turns = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)

    assert n == N_DIALOGUES_JSON
    expected_turns = sum(len(r["messages"]) for r in synth.synthesize(N_DIALOGUES_JSON))
    assert turns == expected_turns
    median = benchmark.stats.stats.median
    size = corpus_file.stat().st_size
    benchmark.extra_info.update(
        dialogues=n,
        megabytes=size / 1e6,
        dialogues_per_s=n / median,
        megabytes_per_s=size / 1e6 / median,
    )

"""Synthetic SoulChatCorpus: statistics, topics, determinism, and a round trip through the reader."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from soulchat.data.readers import detect_format, read_conversations
from soulchat.data.synth import MESSAGE_COUNT_P, MESSAGE_COUNTS, TOPICS, synthesize, write_synthetic

N = 6000  # three seeded blocks; the standard error of the mean message count is about 0.02


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return list(synthesize(N, seed=0))


def test_synth_message_count_distribution(records):
    counts = np.array([len(r["messages"]) for r in records])
    assert abs(counts.mean() - 5.87) < 0.08
    assert counts.min() >= 2 and counts.max() <= 23
    assert 0.70 < np.mean((counts >= 5) & (counts <= 7)) < 0.82  # "mostly 5-7"
    # The table itself has the corpus mean exactly (to 0.01) and its maximum.
    assert abs(float(MESSAGE_COUNTS @ MESSAGE_COUNT_P) - 5.87) < 0.01 and MESSAGE_COUNTS.max() == 23


def test_synth_message_lengths_and_roles(records):
    client, counselor = [], []
    for r in records:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2)
        for m in r["messages"]:
            (client if m["role"] == "user" else counselor).append(len(m["content"]))
    assert abs(np.mean(client) - 41) < 41 * 0.05
    assert abs(np.mean(counselor) - 90) < 90 * 0.05
    assert min(client + counselor) >= 2


def test_synth_topics_follow_the_corpus_order(records):
    freq = Counter(r["topic"] for r in records)
    assert set(freq) == set(TOPICS)
    shares = [freq[t] for t in TOPICS]
    assert shares[0] == max(shares) and shares[-1] == min(shares)
    assert freq[TOPICS[0]] > freq[TOPICS[3]] > freq[TOPICS[7]]


def test_synth_is_deterministic_per_seed(records):
    assert list(synthesize(50, seed=0)) == records[:50]  # a prefix does not depend on n
    assert list(synthesize(3000, seed=0))[2500:] == records[2500:3000]
    other = list(synthesize(50, seed=1))
    assert other != records[:50]
    assert [r["id"] for r in records[:5]] == [0, 1, 2, 3, 4]
    assert list(synthesize(0, seed=0)) == []


def test_write_synthetic_round_trip(tmp_path):
    path = tmp_path / "synth.json"
    size = write_synthetic(path, 300, seed=3)
    assert size == path.stat().st_size
    expected = list(synthesize(300, seed=3))
    assert json.loads(path.read_text(encoding="utf-8")) == expected  # a valid single JSON array
    assert detect_format(path) == "soulchat"
    convs = list(read_conversations(path, chunk_size=4096))
    assert len(convs) == 300
    assert [c.id for c in convs[:3]] == ["0", "1", "2"]
    assert [t.text for t in convs[7].turns] == [m["content"] for m in expected[7]["messages"]]
    assert [c.topic for c in convs] == [r["topic"] for r in expected]
    empty = tmp_path / "empty.json"
    write_synthetic(empty, 0, seed=0)
    assert json.loads(empty.read_text(encoding="utf-8")) == []

"""prepare(timings=...): the per-stage seconds a benchmark reads, and that timing changes nothing."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest

from soulchat.data.assets import default_tokenizer_path, load_tokenizer
from soulchat.data.pipeline import prepare
from soulchat.data.synth import write_synthetic
from soulchat.options import DataConfig

STAGES = ("read", "render", "write", "pack", "commit")


def _digest(store_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store_dir.iterdir()) if p.suffix == ".npy"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "synthetic.json"
    write_synthetic(path, 300)
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_tokenizer_path())


@pytest.mark.parametrize("workers", [1, 2])
def test_timings_fill_every_stage_and_sum_to_at_most_total(tmp_path, corpus, tokenizer, workers):
    timings: dict[str, float] = {}
    options = DataConfig(eval_fraction=0.0, workers=workers)
    prepare(replace(options, data=[corpus], cache_dir=str(tmp_path / "out")), tokenizer, force=True,
            progress=False, verbose=False, timings=timings)
    assert set(timings) == {*STAGES, "total"}
    assert all(timings[s] >= 0.0 for s in STAGES), timings
    assert timings["read"] > 0 and timings["render"] > 0 and timings["write"] > 0, timings
    assert sum(timings[s] for s in STAGES) <= timings["total"] * 1.001 + 1e-3, timings


def test_timings_do_not_change_the_store(tmp_path, corpus, tokenizer):
    options = DataConfig(eval_fraction=0.05, workers=1)
    plain = prepare(replace(options, data=[corpus], cache_dir=str(tmp_path / "plain")), tokenizer,
                    progress=False, verbose=False)
    timed = prepare(replace(options, data=[corpus], cache_dir=str(tmp_path / "timed")), tokenizer,
                    progress=False, verbose=False, timings={})
    assert _digest(Path(plain.path)) == _digest(Path(timed.path))
    assert _digest(Path(plain.path) / "eval") == _digest(Path(timed.path) / "eval")


def test_a_cache_hit_leaves_timings_empty(tmp_path, corpus, tokenizer):
    options = DataConfig(data=[corpus], cache_dir=str(tmp_path / "out"), eval_fraction=0.0, workers=1)
    prepare(options, tokenizer, progress=False, verbose=False)
    timings: dict[str, float] = {}
    prepare(options, tokenizer, progress=False, verbose=False, timings=timings)
    assert timings == {}

"""Prepare benchmark: prepare() at corpus scale against its floor (the fast tokenizer alone) and TRL.

Writes N SoulChatCorpus-shaped dialogues (soulchat.data.synth; default the full corpus shape, 258,354),
then measures in the same run, each measurement in its own child process so that its peak memory is
its own (VmHWM of the child, plus the peak of the summed RSS of its whole process tree, sampled every
50 ms, which includes prepare's worker processes):

- prepare_workers_default (``--repeat`` times, interleaved with the floor) and the other engine once
  (workers=2 where the default is one process, else workers=1):
  ``prepare(DataConfig(data, cache_dir, workers), tokenizer, force=True)`` with the bundled tokenizer;
  wall time of the call and its per-stage seconds (``prepare(timings=...)``: read, render [render + mask
  + tokenize, as the main process sees them], write, pack, commit); sha256 of every store file, compared
  across runs (the output must not depend on --workers).
- stages_1core: each stage alone, one process, one thread, on the same conversations: read, render,
  tokenize (the encoder prepare uses: ids, and offsets only where a mask needs them), mask (mask + loss
  weights), so that the render stage above can be split honestly into its parts.
- tokenizer_floor: the fast tokenizer alone encoding the same rendered text, batched, all cores
  (``backend_tokenizer.encode_batch``, the floor; also ``encode_batch_fast``, which skips the offsets
  prepare's masks need, and optionally ``tokenizer(texts)``), timed apart from rendering.
- trl_sft: TRL's SFTTrainer dataset preparation on the same file: ``datasets`` JSON loading, then
  ``SFTTrainer(..., SFTConfig(packing=True, packing_strategy="bfd", assistant_only_loss=True))`` on a tiny
  random model, timing its ``_prepare_dataset`` (chat template + tokenize + bfd pack).

Targets (issue: prepare at corpus scale): prepare's wall time <= 1.3x the floor, peak memory <= 500 MB,
byte-identical output for any --workers. Rows go to bench/results/prepare.{jsonl,csv}, a table to
bench/results/prepare.md.

    python -m bench.bench_prepare [--dialogues 258354] [--repeat 3] [--skip-trl] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/bench_prepare.py` from the repo root
    sys.path.insert(0, str(ROOT))

from bench.common import RESULTS_DIR, environment, write_rows

TARGET_RATIO = 1.3
TARGET_PEAK_MB = 500.0
# Texts per call of the tokenizer in the floor: large enough that every core has work (the Rust
# tokenizer splits a batch across its thread pool), small enough that the encodings of one call
# (ids, offsets, token strings) stay a few hundred MB.
_FLOOR_BATCH = 4096


# --------------------------------------------------------------------------------------------------
# Children: each prints one JSON line (the last line of its stdout).


def _status_mb(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _store_digest(out_dir: Path) -> str:
    """sha256 over every array file of the store (and its held-out store and JSON), in path order.

    meta.json and report.json are left out: they record the build's own seconds."""
    h = hashlib.sha256()
    for p in sorted(out_dir.rglob("*")):
        if p.is_file() and p.suffix in (".npy", ".json") and p.name not in ("meta.json", "report.json"):
            h.update(str(p.relative_to(out_dir)).encode())
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def _child_prepare(path: Path, out_dir: Path, workers: int | None, max_length: int) -> dict:
    from soulchat.data.assets import default_tokenizer_path, load_tokenizer
    from soulchat.data.pipeline import prepare
    from soulchat.options import DataConfig

    tok = load_tokenizer(default_tokenizer_path())
    baseline = _status_mb("VmRSS")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    cpu = time.process_time()
    options = DataConfig(data=[str(path)], cache_dir=str(out_dir), workers=workers, max_length=max_length)
    store = prepare(options, tok, force=True, progress=False, verbose=False, timings=timings)
    seconds = time.perf_counter() - start
    report = store.report
    return {"seconds": seconds, "main_cpu_seconds": time.process_time() - cpu, "timings": timings,
            "tokens": int(report["train"]["tokens"]) + int((report.get("heldout") or {}).get("tokens", 0))
            if isinstance(report.get("train"), dict) else None,
            "sha256": _store_digest(out_dir), "peak_rss_mb": _status_mb("VmHWM"), "baseline_rss_mb": baseline}


def _rendered(path: Path, tok, max_length: int):
    """The conversations as prepare reads them, and the text it tokenizes for each (same order)."""
    from soulchat.data.conversation import where
    from soulchat.data.plans import _plan_for
    from soulchat.data.readers import read_conversations
    from soulchat.data.render import _trim_trailing

    plan = _plan_for(tok, "auto")
    t0 = time.perf_counter()
    convs = list(read_conversations([path]))
    t1 = time.perf_counter()
    ready = []
    for conv in convs:
        turns = _trim_trailing(conv.turns)
        if turns is not None and not plan.has_control_token(turns):
            ready.append((conv, plan.render(tok, turns, where(conv))))
    t2 = time.perf_counter()
    return plan, convs, ready, t1 - t0, t2 - t1


def _child_stages(path: Path, max_length: int) -> dict:
    """Each stage alone on one core (TOKENIZERS_PARALLELISM=false is set by the parent)."""
    from collections import Counter

    from soulchat.data.assets import default_tokenizer_path, load_tokenizer
    from soulchat.data.render import _Collected

    tok = load_tokenizer(default_tokenizer_path())
    plan, convs, ready, read_s, render_s = _rendered(path, tok, max_length)
    texts = [r.text for _, r in ready]
    stats: Counter = Counter()
    over = 0
    tokenize_s = mask_s = 0.0
    for i in range(0, len(texts), 256):  # prepare's batch; each batch's encodings dropped once masked
        t0 = time.perf_counter()
        encoded = plan.encoder(tok, texts[i:i + 256])
        t1 = time.perf_counter()
        collected = _Collected("token")
        for j, ((conv, rendered), tokens) in enumerate(zip(ready[i:i + 256], encoded), i):
            # Over-long ones are split into windows by prepare; here they are masked whole (the same
            # work per token), counted in "over_max_length".
            over += len(tokens) > max_length
            collected.add(conv, j, [(tokens, rendered.spans)], stats)
        collected.batch()
        tokenize_s += t1 - t0
        mask_s += time.perf_counter() - t1
    return {"read_s": read_s, "render_s": render_s, "tokenize_s": tokenize_s, "mask_s": mask_s,
            "conversations": len(convs), "rendered": len(texts), "chars": sum(map(len, texts)),
            "tokens": int(stats["tokens"]), "over_max_length": int(over), "peak_rss_mb": _status_mb("VmHWM")}


def _child_floor(path: Path, max_length: int, hf_call: bool = False) -> dict:
    """The fast tokenizer alone on the rendered texts, batched, all cores; rendering is not timed.

    hf_call: also time ``tokenizer(texts)`` (the Python wrapper; ~1.5x encode_batch, not the floor)."""
    from soulchat.data.assets import default_tokenizer_path, load_tokenizer

    tok = load_tokenizer(default_tokenizer_path())
    _, convs, ready, _, _ = _rendered(path, tok, max_length)
    texts = [r.text for _, r in ready]
    del convs, ready
    backend = tok.backend_tokenizer
    out = {"hf_call_s": float("nan"), "hf_call_tokens": None}
    encoders = [
        ("encode_batch", lambda b: sum(len(e.ids) for e in backend.encode_batch(b, add_special_tokens=False))),
        ("encode_batch_fast",
         lambda b: sum(len(e.ids) for e in backend.encode_batch_fast(b, add_special_tokens=False))),
    ]
    if hf_call:
        encoders.append(("hf_call", lambda b: sum(map(len, tok(b, add_special_tokens=False)["input_ids"]))))
    for name, encode in encoders:
        encode(texts[:_FLOOR_BATCH])  # warm the thread pool
        start = time.perf_counter()
        tokens = sum(encode(texts[i:i + _FLOOR_BATCH]) for i in range(0, len(texts), _FLOOR_BATCH))
        out[f"{name}_s"] = time.perf_counter() - start
        out[f"{name}_tokens"] = tokens
    return {**out, "texts": len(texts), "peak_rss_mb": _status_mb("VmHWM")}


def _child_trl(path: Path, max_length: int, cache_dir: Path, num_proc: int | None) -> dict:
    """TRL's SFTTrainer dataset preparation (chat template + tokenize + bfd packing) on the same file."""
    os.environ["HF_DATASETS_CACHE"] = str(cache_dir)  # a fresh cache: no earlier run's map() is reused
    import datasets
    import torch
    import trl
    from transformers import LlamaConfig, LlamaForCausalLM

    from soulchat.data.assets import default_tokenizer_path, load_tokenizer

    tok = load_tokenizer(default_tokenizer_path())
    baseline = _status_mb("VmRSS")
    start = time.perf_counter()
    # The file is one JSON array: `datasets` falls back to json.load of the whole file for that.
    ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache_dir))
    ds = ds.select_columns(["messages"])
    load_s = time.perf_counter() - start

    timed: dict[str, float] = {}
    original = trl.SFTTrainer._prepare_dataset

    def timed_prepare(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            timed["prepare_dataset_s"] = time.perf_counter() - t

    trl.SFTTrainer._prepare_dataset = timed_prepare
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    args = trl.SFTConfig(output_dir=str(cache_dir / "trainer"), max_length=max_length, packing=True,
                         packing_strategy="bfd", assistant_only_loss=True, dataset_num_proc=num_proc,
                         report_to=[], use_cpu=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    packed = trainer.train_dataset
    lengths = packed["seq_lengths"] if "seq_lengths" in packed.column_names else None
    tokens = sum(sum(x) for x in lengths) if lengths is not None else None
    return {"load_s": load_s, "prepare_dataset_s": timed.get("prepare_dataset_s"), "rows": len(packed),
            "tokens": tokens, "num_proc": num_proc, "peak_rss_mb": _status_mb("VmHWM"),
            "baseline_rss_mb": baseline}


# --------------------------------------------------------------------------------------------------
# Parent


def _tree_rss_mb(pid: int) -> tuple[float, float]:
    """Summed VmRSS and RssAnon of ``pid`` and all its descendants (MiB).

    RssAnon leaves out file pages mapped read-only, such as the store files prepare memory-maps to
    checksum them at commit (clean page cache the kernel can drop), which VmRSS and VmHWM count."""
    total, anon, stack = 0.0, 0.0, [pid]
    while stack:
        p = stack.pop()
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
                elif line.startswith("RssAnon:"):
                    anon += int(line.split()[1]) / 1024
            for task in os.listdir(f"/proc/{p}/task"):
                stack += [int(c) for c in open(f"/proc/{p}/task/{task}/children").read().split()]
        except (OSError, ValueError):
            continue
    return total, anon


def run_child(mode: str, *args: str, env: dict | None = None) -> dict:
    """Run one measurement in a child interpreter; its JSON result plus the sampled peak tree RSS."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "bench.bench_prepare", "--child", mode, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=ROOT)
    peak = [0.0, 0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            rss, anon = _tree_rss_mb(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], anon)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} failed (exit {proc.returncode}):\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["tree_peak_rss_mb"], result["tree_peak_anon_mb"] = peak
    return result


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _write_markdown(rows: list[dict], lines: list[str], command: str) -> Path:
    """One section per command line in prepare.md: this run's replaces that command's earlier one."""
    env = environment()
    md = RESULTS_DIR / (os.environ.get("SOULCHAT_BENCH_PREFIX", "") + "prepare.md")
    title = f"## `{command}`"
    section = [
        title, "",
        f"{env['date']}, commit {env['commit']}, {env['cpu']} ({env['cpu_count']} cores, shared with other "
        f"work while measured), python {env['python']}, numpy {env['numpy']}, torch {env.get('torch')}, "
        f"transformers {env.get('transformers')}, trl {env.get('trl')}.", "",
        "| what | wall s | peak RSS MiB (process) | peak RSS MiB (tree) | notes |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        peak = r.get("peak_rss_mb")
        tree = r.get("tree_peak_rss_mb")
        section.append(f"| {r['what']} | {r['seconds']:.2f} | {'' if peak is None else f'{peak:.0f}'} | "
                       f"{'' if tree is None else f'{tree:.0f}'} | {r.get('notes', '')} |")
    sections = []
    if md.exists():
        old = md.read_text(encoding="utf-8").split("\n## ")[1:]
        sections = ["## " + part.rstrip("\n") for part in old if not ("## " + part).startswith(title)]
    body = "\n\n".join(sections + ["\n".join(section + [""] + lines)])
    md.write_text("# Prepare benchmark\n\n" + body + "\n", encoding="utf-8")
    return md


def _run_prepare(corpus: Path, ml: str, tmp: Path, workers: str, repeat: int, common: dict, rows: list) -> dict:
    """One prepare() child (workers "default" or a number); its row appended to ``rows``."""
    from soulchat.data.workers import default_workers

    r = run_child("prepare", str(corpus), ml, str(tmp / f"store_w{workers}"), workers)
    t = r["timings"]
    stages = " ".join(f"{k}={t[k]:.2f}" for k in ("read", "render", "write", "pack", "commit"))
    print(f"prepare workers={workers:7s} {r['seconds']:7.2f} s  [{stages} total={t['total']:.2f}]  "
          f"peak {r['peak_rss_mb']:.0f} MiB (tree {r['tree_peak_rss_mb']:.0f}, anonymous "
          f"{r['tree_peak_anon_mb']:.0f}, before prepare {r['baseline_rss_mb']:.0f})  {r['sha256'][:12]}",
          flush=True)
    rows.append({"what": f"prepare_workers_{workers}", **common, "repeat": repeat,
                 "workers": default_workers() if workers == "default" else int(workers),
                 "seconds": round(r["seconds"], 3), "main_cpu_seconds": round(r["main_cpu_seconds"], 3),
                 **{f"stage_{k}_s": round(v, 3) for k, v in t.items()},
                 "tokens": r["tokens"], "peak_rss_mb": round(r["peak_rss_mb"], 1),
                 "baseline_rss_mb": round(r["baseline_rss_mb"], 1),
                 "tree_peak_rss_mb": round(r["tree_peak_rss_mb"], 1),
                 "tree_peak_anon_mb": round(r["tree_peak_anon_mb"], 1), "sha256": r["sha256"],
                 "notes": f"read {t['read']:.2f}, render+mask+tokenize {t['render']:.2f}, write "
                          f"{t['write']:.2f}, pack {t['pack']:.2f}, commit {t['commit']:.2f} s"})
    return r


def _run_floor(corpus: Path, ml: str, hf_call: bool, repeat: int, common: dict, rows: list) -> dict:
    """One tokenizer-alone child; its rows appended to ``rows``."""
    f = run_child("floor", str(corpus), ml, *(["hf"] if hf_call else []))
    print(f"tokenizer alone, all cores: encode_batch {f['encode_batch_s']:.2f} s, encode_batch_fast "
          f"{f['encode_batch_fast_s']:.2f} s, tokenizer(texts) {f['hf_call_s']:.2f} s "
          f"({f['encode_batch_tokens']:,} tokens)", flush=True)
    rows.append({"what": "tokenizer_floor_encode_batch", **common, "repeat": repeat,
                 "seconds": round(f["encode_batch_s"], 3), "tokens": f["encode_batch_tokens"],
                 "peak_rss_mb": round(f["peak_rss_mb"], 1),
                 "notes": f"backend_tokenizer.encode_batch, batches of {_FLOOR_BATCH}, all cores"})
    rows.append({"what": "tokenizer_encode_batch_fast", **common, "repeat": repeat,
                 "seconds": round(f["encode_batch_fast_s"], 3), "tokens": f["encode_batch_fast_tokens"],
                 "notes": f"backend_tokenizer.encode_batch_fast (no offsets), batches of {_FLOOR_BATCH}"})
    if hf_call:
        rows.append({"what": "tokenizer_hf_call", **common, "repeat": repeat, "seconds": round(f["hf_call_s"], 3),
                     "tokens": f["hf_call_tokens"],
                     "notes": f"tokenizer(texts, add_special_tokens=False), batches of {_FLOOR_BATCH}"})
    return f


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dialogues", type=int, default=258_354, help="synthetic dialogues to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=1024, help="DataConfig.max_length and TRL's")
    parser.add_argument("--skip-trl", action="store_true", help="leave out TRL's dataset preparation")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of prepare and of the tokenizer alone, interleaved; the target uses medians")
    parser.add_argument("--hf-call", action="store_true",
                        help="also time tokenizer(texts) (the Python wrapper) besides encode_batch")
    parser.add_argument("--skip-stages", action="store_true",
                        help="leave out the one-core stage-alone measurements (not needed for the targets)")
    parser.add_argument("--trl-num-proc", type=int, default=None,
                        help="SFTConfig.dataset_num_proc (default: None, TRL's default, one process)")
    parser.add_argument("--dir", default=None, help="where to write the corpus and stores (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the corpus and the stores")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("child_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        a = args.child_args
        path, max_length = Path(a[0]), int(a[1])
        if args.child == "prepare":
            result = _child_prepare(path, Path(a[2]), None if a[3] == "default" else int(a[3]), max_length)
        elif args.child == "stages":
            result = _child_stages(path, max_length)
        elif args.child == "floor":
            result = _child_floor(path, max_length, hf_call=len(a) > 2 and a[2] == "hf")
        elif args.child == "trl":
            result = _child_trl(path, max_length, Path(a[2]), None if a[3] == "none" else int(a[3]))
        else:
            raise SystemExit(f"unknown child {args.child}")
        print(json.dumps(result))
        return 0

    import shutil

    from soulchat.data.synth import write_synthetic
    from soulchat.data.workers import default_workers

    tmp = Path(args.dir or tempfile.mkdtemp(prefix="soulchat_bench_prepare_"))
    tmp.mkdir(parents=True, exist_ok=True)
    corpus = tmp / f"synthetic_{args.dialogues}.json"
    start = time.perf_counter()
    size = write_synthetic(corpus, args.dialogues, seed=args.seed)
    print(f"wrote {args.dialogues} dialogues, {size / 2**20:.1f} MiB in {time.perf_counter() - start:.1f} s "
          f"-> {corpus}", flush=True)
    n, ml = args.dialogues, str(args.max_length)
    common = {"dialogues": n, "file_mib": round(size / 2**20, 1), "max_length": args.max_length}
    rows: list[dict] = []
    lines: list[str] = []
    try:
        # The default (what `python -m soulchat.data prepare` does here) once per repeat, interleaved
        # with the floor so that both see the same machine; then the other engine once (in-process vs
        # worker processes), whose output must be byte-identical.
        other = "2" if default_workers() == 1 else "1"
        prep_runs: list[dict] = []
        floor_runs: list[dict] = []
        for repeat in range(args.repeat):
            prep_runs.append(_run_prepare(corpus, ml, tmp, "default", repeat, common, rows))
            floor_runs.append(_run_floor(corpus, ml, args.hf_call, repeat, common, rows))
        prep_other = _run_prepare(corpus, ml, tmp, other, 0, common, rows)

        if not args.skip_stages:
            s = run_child("stages", str(corpus), ml, env={"TOKENIZERS_PARALLELISM": "false"})
            parts = {k: s[f"{k}_s"] for k in ("read", "render", "tokenize", "mask")}
            print("one core, each stage alone: " + " ".join(f"{k}={v:.2f}" for k, v in parts.items())
                  + f" s ({s['tokens']:,} tokens)", flush=True)
            for k, v in parts.items():
                rows.append({"what": f"stage_alone_1core_{k}", **common, "seconds": round(v, 3),
                             "tokens": s["tokens"], "notes": "one process, one thread, stage timed alone"})
            rows[-1]["peak_rss_mb"] = round(s["peak_rss_mb"], 1)

        prep_s = statistics.median(r["seconds"] for r in prep_runs)
        floor = statistics.median(f["encode_batch_s"] for f in floor_runs)
        floor_fast = statistics.median(f["encode_batch_fast_s"] for f in floor_runs)
        ratio = prep_s / floor
        every = prep_runs + [prep_other]
        # The exact peak of the main process (VmHWM) or the sampled peak of its tree, whichever is larger:
        # the 50 ms samples can miss a short peak of the main process.
        peak = max(r[k] for r in every for k in ("tree_peak_rss_mb", "peak_rss_mb"))
        peak_default = max(r[k] for r in prep_runs for k in ("tree_peak_rss_mb", "peak_rss_mb"))
        digests = {r["sha256"] for r in every}
        identical = len(digests) == 1
        runs = ", ".join(f"{r['seconds']:.1f}" for r in prep_runs)
        floors = ", ".join(f"{f['encode_batch_s']:.1f}" for f in floor_runs)
        verdict = [
            f"- time: prepare (default, workers={default_workers()}) {prep_s:.2f} s / tokenizer alone "
            f"(encode_batch) {floor:.2f} s = {ratio:.2f}x, medians of {args.repeat} interleaved runs "
            f"(prepare {runs} s; tokenizer {floors} s); target <= {TARGET_RATIO}x: {_met(ratio <= TARGET_RATIO)}. "
            f"Against encode_batch_fast (ids only, no offsets; {floor_fast:.2f} s): {prep_s / floor_fast:.2f}x. "
            f"workers={other}: {prep_other['seconds']:.2f} s ({prep_other['seconds'] / floor:.2f}x)",
            f"- memory: peak RSS of the default {peak_default:.0f} MiB (process tree: main process plus any "
            f"workers); workers={other}: {max(prep_other['tree_peak_rss_mb'], prep_other['peak_rss_mb']):.0f} "
            f"MiB; target <= {TARGET_PEAK_MB:.0f} MB: {_met(peak_default * 2**20 / 1e6 <= TARGET_PEAK_MB)}",
            f"- output for workers={default_workers()} and workers={other}: "
            f"{'byte-identical' if identical else 'DIFFERENT'} (sha256 "
            f"{' / '.join(sorted(d[:16] for d in digests))}): {_met(identical)}",
        ]
        for v in verdict:
            print(v, flush=True)
        rows.append({"what": "targets", **common, "seconds": round(prep_s, 3),
                     "ratio_vs_tokenizer": round(ratio, 3), "ratio_vs_encode_batch_fast": round(prep_s / floor_fast, 3),
                     "time_target_met": ratio <= TARGET_RATIO, "peak_tree_rss_mb": round(peak_default, 1),
                     "peak_any_engine_mb": round(peak, 1),
                     "memory_target_met": peak_default * 2**20 / 1e6 <= TARGET_PEAK_MB, "identical": identical,
                     "notes": f"{ratio:.2f}x; identical={identical}"})

        if not args.skip_trl:
            r = run_child("trl", str(corpus), ml, str(tmp / "trl_cache"),
                          "none" if args.trl_num_proc is None else str(args.trl_num_proc))
            total = r["load_s"] + r["prepare_dataset_s"]
            print(f"TRL: load_dataset {r['load_s']:.2f} s + SFTTrainer._prepare_dataset "
                  f"{r['prepare_dataset_s']:.2f} s = {total:.2f} s, {r['rows']:,} rows, peak "
                  f"{r['peak_rss_mb']:.0f} MiB (tree {r['tree_peak_rss_mb']:.0f})", flush=True)
            rows.append({"what": "trl_sft_prepare", **common, "seconds": round(total, 3),
                         "load_s": round(r["load_s"], 3), "prepare_dataset_s": round(r["prepare_dataset_s"], 3),
                         "rows": r["rows"], "tokens": r["tokens"], "trl_num_proc": r["num_proc"],
                         "peak_rss_mb": round(r["peak_rss_mb"], 1),
                         "tree_peak_rss_mb": round(r["tree_peak_rss_mb"], 1),
                         "notes": f"load {r['load_s']:.2f} + _prepare_dataset {r['prepare_dataset_s']:.2f} s; "
                                  f"{total / prep_s:.1f}x prepare"})
            verdict.append(f"- TRL SFTTrainer dataset preparation: {total:.2f} s = {total / prep_s:.1f}x "
                           f"prepare's time, peak {r['tree_peak_rss_mb']:.0f} MiB")
        lines += ["Targets:", ""] + verdict + [
            "", "Stage seconds of prepare are as its main process sees them (prepare(timings=...)): with workers, "
            "`render` is the time spent handing batches to the workers and waiting for them; the "
            "stage_alone_1core rows split that work into render / tokenize / mask on one core."]
        jsonl, csv_path = write_rows("prepare", rows)
        command = (f"python -m bench.bench_prepare --dialogues {n}" + (" --skip-trl" if args.skip_trl else "")
                   + (" --skip-stages" if args.skip_stages else "")
                   + (f" --repeat {args.repeat}" if args.repeat != 3 else ""))
        md = _write_markdown(rows, lines, command)
        print(f"wrote {jsonl}, {csv_path} and {md}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

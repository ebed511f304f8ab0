"""The register / spill / shared-memory / wgmma table of every Triton kernel, compiled for sm_90 and sm_80.

No GPU needed: ``soulchat.kernels.compile_check`` compiles with the ptxas inside the triton wheel and
reads its ``-v`` report. Writes bench/results/compile.{jsonl,csv} (one row per compile, with machine,
date, commit and versions; the name carries the triton version, ``compile-triton3.9.0``) and
compile.md (the summary per kernel: configs, how many spill, the worst spill, registers, shared
memory, wgmma).

    python -m bench.bench_compile                 # the table for the installed triton
    python -m bench.bench_compile --quick         # the cases tests/test_hopper_compile.py compiles
    python -m bench.bench_compile --processes 4   # compiles in parallel (each takes 0.5-25 s here)
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch

from bench.common import RESULTS_DIR, environment, write_rows


def _cases(quick: bool) -> list[tuple]:
    from soulchat.kernels import compile_check as cc

    if quick:
        sys.path.insert(0, str(RESULTS_DIR.parent.parent / "tests"))
        import test_hopper_compile as t

        return [tuple(p.values) for p in t._cases()]
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    jobs = [(c, 90) for c in cc.attention_cases(90, dtypes=(bf16, fp32), groups=(1, 7))]
    jobs += [(c, 90) for c in cc.attention_cases(90, dtypes=(fp16,), head_dims=(128,), groups=(7,))]
    jobs += [(c, 90) for c in cc.rms_norm_cases() + cc.swiglu_cases() + cc.loss_cases()]
    jobs += [(c, 80) for c in cc.attention_cases(80, dtypes=(bf16, fp32), head_dims=(128,), groups=(7,))]
    return list(dict.fromkeys(jobs))


def _summary(rows: list[dict], env: dict, seconds: float) -> str:
    groups = collections.defaultdict(list)
    for r in rows:
        groups[(r["capability"], r["kernel"])].append(r)
    lines = [
        f"# Triton kernels compiled for sm_90 / sm_80 without a GPU (triton {env.get('triton')})",
        "",
        f"{env['date']}, commit {env['commit']}, {env['cpu']}, torch {env.get('torch')}, python "
        f"{env['python']}; {len(rows)} compiles in {seconds:.0f} s (`python -m bench.bench_compile`).",
        "Every config the launchers may pick at the listed shapes (attention: head dim 64/128, GQA group "
        "1/7, causal / window / window + soft-cap, bf16 and fp32 (3xTF32); fp16 at D=128; sm_80: bf16 and "
        "fp32 at D=128; RMSNorm hidden 128..8192, SwiGLU widths 4864..29568, loss vocabularies 32000.."
        "151936). Spill = ptxas's spill stores per thread; smem = shared memory per block.",
        "",
        "| sm | kernel | compiles | failed | spilling | worst spill (B) | registers | smem (KiB) | wgmma | "
        "TF32 MMA | compile s (max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (cap, kernel), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        ok = [r for r in rs if "error" not in r]
        spilling = [r for r in ok if r["spill_store_bytes"]]
        regs = sorted({r["registers"] for r in ok})
        smem = [r["shared_bytes"] / 1024 for r in ok]
        lines.append(
            f"| {cap} | {kernel} | {len(rs)} | {len(rs) - len(ok)} | {len(spilling)} | "
            f"{max((r['spill_store_bytes'] for r in ok), default=0)} | "
            f"{regs[0] if regs else '-'}-{regs[-1] if regs else '-'} | "
            f"{min(smem, default=0):.0f}-{max(smem, default=0):.0f} | "
            f"{sum(r['wgmma'] for r in ok)} | {sum(r['tf32_tensor_cores'] for r in ok)} | "
            f"{max((r['compile_s'] for r in ok), default=0):.1f} |"
        )
    bad = [r for r in rows if "error" in r or r.get("spill_store_bytes")]
    lines += ["", f"Spilling or failing compiles: {len(bad)}", ""]
    for r in bad[:60]:
        what = r.get("error") or f"{r['spill_store_bytes']} B spilled"
        lines.append(f"- sm_{r['capability']} {r['label']}: {what}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the cases the CI test compiles")
    parser.add_argument("--processes", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--name", default=None, help="results name (default compile-triton<version>)")
    args = parser.parse_args(argv)
    import triton

    from soulchat.kernels import compile_check as cc

    jobs = _cases(args.quick)
    print(f"compiling {len(jobs)} kernels x configs with triton {triton.__version__}, "
          f"{args.processes} processes", flush=True)
    start = time.perf_counter()
    reports = cc.compile_many(jobs, processes=args.processes)
    seconds = time.perf_counter() - start
    rows = []
    for (case, cap), report in zip(jobs, reports):
        rows.append({"capability": cap, "op": case.op, "kernel": case.kernel, "config": case.config,
                     "label": case.label, "num_warps": case.num_warps, "num_stages": case.num_stages,
                     **{k: v for k, v in case.constexprs}, **report})
    name = args.name or f"compile-triton{triton.__version__}"
    env = environment()
    jsonl, csv_path = write_rows(name, rows)
    md = RESULTS_DIR / f"{os.environ.get('SOULCHAT_BENCH_PREFIX', '')}{name}.md"
    md.write_text(_summary(rows, env, seconds), encoding="utf-8")
    print(md.read_text(encoding="utf-8"))
    print(f"wrote {jsonl}, {csv_path}, {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

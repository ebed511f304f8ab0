"""Every Triton kernel compiled for Hopper (sm_90) and Ampere (sm_80) on this CPU machine.

``kernels/compile_check.py`` runs triton's whole pipeline down to a cubin with the ptxas inside the
triton wheel (no driver, no GPU) and reads ptxas's register report. For every configuration a launcher
may pick on that architecture, at the shapes training uses, this asserts: it compiles; its shared
memory fits the card; it spills no register (a spill is a local-memory round trip inside the inner
loop); and tiles of 64 or more rows in bf16/fp16 use wgmma on sm_90 (the Hopper tensor-core
instruction: without it a kernel runs at roughly Ampere speed), while fp32 attention runs on TF32
tensor cores (3xTF32) rather than scalar FMAs.

Each distinct compile runs once per test session (about 1-3 s each here); the full table over every
dtype, head dim and GQA group is bench/bench_compile.py's (bench/results/compile.md).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from soulchat.kernels.dispatch import TRITON_IMPORTABLE

pytestmark = pytest.mark.skipif(not TRITON_IMPORTABLE, reason="triton is not installed")

if TRITON_IMPORTABLE:
    from soulchat.kernels import compile_check as cc
    from soulchat.kernels import varlen_attention as va


def _ptxas_available() -> bool:
    import triton

    try:
        return shutil.which(triton.knobs.nvidia.ptxas.path) is not None
    except Exception:  # no NVIDIA backend in this triton build
        return False


_REPORTS: dict = {}


def _report(case, capability: int) -> dict:
    """The compile report of (case, capability); the first call compiles every parametrized case at once
    (two processes, each distinct compile once)."""
    if not _REPORTS:
        jobs = [tuple(p.values) for p in _cases()]
        _REPORTS.update(zip(jobs, cc.compile_many(jobs, processes=2)))
    return _REPORTS[(case, capability)]


def _attention_cases(capability: int, heavy: bool) -> list:
    # The training shape: head dim 128 (Qwen2.5/Qwen3/Llama/GLM), a GQA group of 7 (Qwen2.5-7B: 28 query
    # heads over 4 kv heads, so 126 of a 128-row tile are used) in bf16, plain causal and, on sm_90,
    # with a window (Qwen2/Mistral), with window + soft-cap (Gemma 2) and in fp32 (3xTF32).
    plain, window, both = (True, False, False), (True, True, False), (True, True, True)
    cases = cc.attention_cases(capability, dtypes=(torch.bfloat16,), head_dims=(128,), groups=(7,),
                               flags=(plain, window, both) if heavy else (plain,))
    if heavy:
        cases += cc.attention_cases(capability, dtypes=(torch.float32,), head_dims=(128,), groups=(7,),
                                    flags=(plain,))
    return cc._distinct(cases)


def _elementwise_cases() -> list:
    # Every distinct tile shape once: a mid hidden size and the largest the launcher accepts, one MLP
    # width per block shape, the largest vocabulary (the elementwise kernels do not depend on the
    # architecture's tensor cores; bench/bench_compile.py covers every size and dtype).
    bf16 = torch.bfloat16
    return cc._distinct(
        cc.rms_norm_cases(hidden_sizes=(3584,), dtypes=((bf16, bf16), (bf16, torch.float32)))
        + cc.swiglu_cases(widths=(18944,), dtypes=(bf16,)) + cc.loss_cases(vocabs=(151936,), dtypes=(bf16,))
    )


def _cases():
    if not TRITON_IMPORTABLE:
        return []
    hopper = _attention_cases(90, True) + _elementwise_cases()
    out = [pytest.param(c, 90, id=f"sm90-{c.label}") for c in hopper]
    out += [pytest.param(c, 80, id=f"sm80-{c.label}") for c in _attention_cases(80, False)]
    return out


def _rows(case) -> int:
    """The M dimension of the kernel's MMAs: query rows for the forward and dQ, key rows for dK/dV."""
    meta = dict(case.constexprs)
    return meta["BLOCK_N"] if case.kernel == "_varlen_attention_bwd_dkdv_kernel" else meta.get("BLOCK_M", 0)


@pytest.mark.skipif(TRITON_IMPORTABLE and not _ptxas_available(), reason="the triton wheel has no ptxas")
@pytest.mark.parametrize("case, capability", _cases())
def test_kernel_compiles_without_spills(case, capability):
    report = _report(case, capability)
    assert "error" not in report, f"{case.label} does not compile for sm_{capability}: {report['error']}"
    assert report["shared_bytes"] <= cc.MAX_SHARED[capability], report
    assert report["spill_store_bytes"] == 0 and report["spill_load_bytes"] == 0, (
        f"{case.label} spills on sm_{capability}: {report}; prune it from the launcher's list or shrink it"
    )
    meta = dict(case.constexprs)
    if case.op == "attention" and "DOT_PRECISION" in meta:
        dtype_is_half = meta["DOT_PRECISION"] == "tf32"  # bf16/fp16 inputs (fp32 takes tf32x3)
        if capability >= 90 and dtype_is_half and _rows(case) >= 64:
            assert report["wgmma"], f"{case.label}: a {_rows(case)}-row bf16 tile without wgmma on sm_90"
        if not dtype_is_half:
            assert report["tf32_tensor_cores"], f"{case.label}: fp32 attention without TF32 tensor cores"
        assert report["wgmma"] or report["mma_sync"], f"{case.label}: no tensor-core instruction"


def test_attention_launch_configs_are_the_compiled_ones():
    # The autotuner's prune and launch_configs are one rule: what the test compiles is what may run.
    for capability in (80, 90):
        for name in ("fwd", "dkdv", "dk", "dv", "dq"):
            for dtype in (torch.bfloat16, torch.float32):
                if name in ("dk", "dv") and not va.split_dkdv(capability, dtype):
                    continue
                for window, softcap in ((False, False), (True, True)):
                    configs = va._configs(va._all_configs(name))
                    meta = dict(HEAD_DIM=128, DOT_PRECISION=va._dot_precision(dtype), HAS_WINDOW=window,
                                HAS_SOFTCAP=softcap)
                    kept = va._prune_for(name, configs, meta, capability)
                    assert [va._config_tuple(c) for c in kept] == va.launch_configs(
                        name, capability, 128, dtype, window=window, softcap=softcap)
                    assert kept, (name, capability, dtype)


def test_parse_ptxas_log():
    log = ("ptxas info    : Function properties for k\n"
           "    496 bytes stack frame, 524 bytes spill stores, 520 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 496 bytes cumulative stack size\n")
    assert cc.parse_ptxas_log(log) == {"registers": 255, "stack_bytes": 496, "spill_store_bytes": 524,
                                       "spill_load_bytes": 520}
    with pytest.raises(ValueError, match="no register report"):
        cc.parse_ptxas_log("ptxas info    : 11 bytes gmem\n")

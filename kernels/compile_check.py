"""Every Triton kernel compiled ahead of time for a GPU this machine need not have.

``triton.compile`` takes a target (``GPUTarget("cuda", 90, 32)``: an H100/H200) and runs the whole
pipeline down to a cubin with the ``ptxas`` shipped inside the triton wheel: no driver, no GPU. That
proves on any Linux machine what would otherwise show only on the card: the kernel compiles for that
architecture, fits its shared memory, keeps its accumulators in registers (ptxas's ``-v`` report:
registers per thread, spill stores/loads, stack frame) and uses the tensor-core instructions meant for
it (``wgmma`` on sm_90, ``mma.sync`` before).

``launch_cases(capability)`` lists each kernel with every configuration its launcher may pick for the
shapes training uses (the autotune lists after pruning for that architecture, the fixed block sizes of
the elementwise kernels), and ``compile_case`` compiles one and reads its report. The signatures
mirror the launches: 16-byte aligned pointers, strides and sizes that are multiples of 16 marked so,
as triton's JIT specialises them (vector width, and so registers, depend on it).

Used by tests/test_hopper_compile.py (a subset, in CI) and bench/bench_compile.py (the full table).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import time

import torch

from soulchat.kernels import linear_cross_entropy as lce
from soulchat.kernels import rms_norm as rn
from soulchat.kernels import swiglu as sg
from soulchat.kernels import varlen_attention as va
from soulchat.kernels.dispatch import triton

# Shared memory a block may use (bytes, the opt-in maximum): sm_80 (A100) 163 KiB, sm_90 (H100/H200)
# 227 KiB (CUDA C programming guide, compute capabilities table).
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# The training shapes the elementwise kernels must cover: hidden sizes (and q/k-norm's head dim 128)
# of the families soulchat targets (Qwen2.5 0.5B..72B, Llama 3, Qwen3, GLM), their MLP widths, and
# vocabularies. Head dims 64 and 128 for attention.
HIDDEN_SIZES = (128, 896, 1536, 2048, 3584, 4096, 5120, 8192)
MLP_WIDTHS = (4864, 8960, 11008, 14336, 18944, 29568)
VOCABS = (32000, 128256, 151936)
HEAD_DIMS = (64, 128)


@dataclasses.dataclass(frozen=True)
class Case:
    """One compile: a kernel, its argument types and compile-time constants, and its launch options."""

    op: str  # "attention", "rms_norm", "swiglu", "loss"
    kernel: str  # the @triton.jit function's name in its module
    pointers: tuple  # ((arg name, triton dtype), ...); other non-constexpr args are scalars
    constexprs: tuple  # ((arg name, value), ...)
    num_warps: int
    num_stages: int
    aligned: tuple = ()  # integer args that are multiples of 16 at every launch
    floats: tuple = ()  # scalar args passed as Python floats
    in_autotune_list: bool = True  # False: a fallback the autotuner may not drop (reported, not asserted)

    @property
    def config(self) -> str:
        c = dict(self.constexprs)
        tiles = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_R", "BLOCK_H", "BLOCK_C", "BLOCK_V")
                         if k in c)
        return f"{tiles}/w{self.num_warps}/s{self.num_stages}"

    @property
    def label(self) -> str:
        flags = ",".join(f"{k}={v}" for k, v in self.constexprs if not k.startswith("BLOCK_"))
        return f"{self.kernel}[{self.config}]({self.pointers[0][1]},{flags})"


_MODULES = {"attention": va, "rms_norm": rn, "swiglu": sg, "loss": lce}


def _jit_function(case: Case):
    return getattr(_MODULES[case.op], case.kernel)


def _signature_and_attrs(case: Case) -> tuple[dict, dict, dict]:
    fn = _jit_function(case)
    pointers, constexprs = dict(case.pointers), dict(case.constexprs)
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif name in case.floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in case.aligned:
                attrs[(index,)] = [["tt.divisibility", 16]]
    missing = set(pointers) - set(fn.arg_names) | set(constexprs) - set(fn.arg_names)
    if missing:
        raise ValueError(f"{case.kernel}: no arguments named {sorted(missing)}")
    return signature, constexprs, attrs


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(log: str) -> dict:
    """Registers per thread, stack frame and spill bytes from ptxas's ``-v`` report of one kernel."""
    regs = _PTXAS_REGS.search(log)
    spills = _PTXAS_SPILLS.search(log)
    if regs is None or spills is None:
        raise ValueError(f"no register report in the ptxas log:\n{log}")
    stack, stores, loads = (int(x) for x in spills.groups())
    return {"registers": int(regs.group(1)), "stack_bytes": stack, "spill_store_bytes": stores,
            "spill_load_bytes": loads}


def compile_case(case: Case, capability: int) -> dict:
    """Compile ``case`` for sm_<capability> and report: registers, spills, stack, shared memory (bytes),
    whether the PTX uses wgmma / mma.sync, and the compile's wall time (s)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _signature_and_attrs(case)
    source = ASTSource(_jit_function(case), signature, constexprs, attrs)
    knobs = triton.knobs
    log = io.StringIO()
    start = time.perf_counter()
    # ptxas's -v report is printed only when it runs: compile afresh (no cache hit) with the dump on.
    with (knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log)):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                  options={"num_warps": case.num_warps, "num_stages": case.num_stages})
    seconds = time.perf_counter() - start
    ptx = compiled.asm["ptx"]
    return {
        **parse_ptxas_log(log.getvalue()),
        "shared_bytes": int(compiled.metadata.shared),
        "wgmma": "wgmma.mma_async" in ptx,
        "mma_sync": "mma.sync" in ptx,
        "tf32_tensor_cores": re.search(r"(mma\.sync|wgmma\.mma_async)[.\w]*\.tf32", ptx) is not None,
        "compile_s": round(seconds, 2),
    }


# --------------------------------------------------------------------------------------------------
# What each launcher may launch
# --------------------------------------------------------------------------------------------------

_ATTENTION_FLAGS = (  # (CAUSAL, HAS_WINDOW, HAS_SOFTCAP): plain causal, Qwen2/Mistral window, Gemma 2
    (True, False, False),
    (True, True, False),
    (True, True, True),
)


def attention_cases(capability: int, dtypes=(torch.bfloat16, torch.float16, torch.float32),
                    head_dims=HEAD_DIMS, groups=(1, 4, 7), flags=_ATTENTION_FLAGS) -> list[Case]:
    """The attention kernels over every autotune config kept for ``capability`` (``va.launch_configs``)."""
    cases = []
    for dtype in dtypes:
        dt = _TRITON_DTYPE[dtype]
        precision = va._dot_precision(dtype)
        for head_dim in head_dims:
            block_d = triton.next_power_of_2(head_dim)
            for causal, window, softcap in flags:
                for group in groups:
                    feature = dict(CAUSAL=causal, HAS_WINDOW=window, HAS_SOFTCAP=softcap,
                                   DOT_PRECISION=precision, HEAD_DIM=head_dim, BLOCK_D=block_d, GROUP=group)
                    dkdv = dict(Q=dt, K=dt, V=dt, DO=dt, LSE="fp32", DELTA="fp32", DK=dt, DV=dt,
                                CU_SEQLENS="i32")
                    backward = ([("dk", "_varlen_attention_bwd_dkdv_kernel", dkdv),
                                 ("dv", "_varlen_attention_bwd_dkdv_kernel", dkdv)]
                                if va.split_dkdv(capability, dtype)
                                else [("dkdv", "_varlen_attention_bwd_dkdv_kernel", dkdv)])
                    for name, kernel, pointers in (
                        ("fwd", "_varlen_attention_fwd_kernel",
                         dict(Q=dt, K=dt, V=dt, O=dt, LSE="fp32", CU_SEQLENS="i32")),
                        *backward,
                        ("dq", "_varlen_attention_bwd_dq_kernel",
                         dict(Q=dt, K=dt, V=dt, DO=dt, LSE="fp32", DELTA="fp32", DQ=dt, CU_SEQLENS="i32")),
                    ):
                        packed = name in ("fwd", "dq")
                        extra = {"PACK": va._forward_pack(group)} if packed else {"PARTS": name}
                        configs = va.launch_configs(name, capability, head_dim, dtype, window, softcap)
                        for m, n, warps, stages in configs:
                            cases.append(Case(
                                "attention", kernel, tuple(pointers.items()),
                                tuple({**feature, **extra, "BLOCK_M": m, "BLOCK_N": n}.items()),
                                warps, stages, aligned=_attention_aligned(kernel, head_dim),
                                floats=("qk_scale", "softmax_scale", "cap_scale", "cap_log2e"),
                            ))
        # The small row kernel of the backward.
        for head_dim in head_dims:
            cases.append(Case(
                "attention", "_varlen_attention_bwd_preprocess_kernel",
                (("O", dt), ("DO", dt), ("DELTA", "fp32")),
                (("HEAD_DIM", head_dim), ("BLOCK_D", triton.next_power_of_2(head_dim)), ("BLOCK_M", 64)),
                4, 3, aligned=_attention_aligned("_varlen_attention_bwd_preprocess_kernel", head_dim),
            ))
    return _distinct(cases)


def _attention_aligned(kernel: str, head_dim: int) -> tuple:
    """Token and head strides are multiples of D (and so of 16 when D is); LSE/DELTA's [Hq, T] head
    stride is T, any number."""
    if head_dim % 16:
        return ()
    fn = getattr(va, kernel)
    unaligned = ("stride_lh", "stride_delta_h")
    return tuple(n for n in fn.arg_names if n.startswith("stride_") and n not in unaligned)


_RMS_NORM_DTYPES = ((torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                    (torch.float32, torch.float32))


def rms_norm_cases(hidden_sizes=HIDDEN_SIZES, max_hidden: bool = True, dtypes=_RMS_NORM_DTYPES) -> list[Case]:
    cases = []
    cuda = torch.device("cuda")
    sizes = list(hidden_sizes) + ([rn.MAX_HIDDEN] if max_hidden else [])
    for hidden in sizes:
        for x_dtype, w_dtype in dtypes:
            x, w = _TRITON_DTYPE[x_dtype], _TRITON_DTYPE[w_dtype]
            y = _TRITON_DTYPE[torch.promote_types(x_dtype, w_dtype)]
            aligned = ("stride_x", "stride_y", "stride_dy", "stride_dx", "H") if hidden % 16 == 0 else ()
            block_r, block_h, warps = rn._blocks(16384, hidden, cuda)
            cases.append(Case(
                "rms_norm", "_rms_norm_fwd_kernel",
                (("x_ptr", x), ("w_ptr", w), ("y_ptr", y), ("rstd_ptr", "fp32")),
                (("BLOCK_R", block_r), ("BLOCK_H", block_h)), warps, 3, aligned=aligned, floats=("eps",),
            ))
            # The backward tiles by rows per program: a long packed row, and a short one (1 row per tile).
            for rows_per_program in (16384 // 528, 1):
                block_r, block_h, warps = rn._blocks(rows_per_program, hidden, cuda)
                for compute_dw in (True, False):
                    cases.append(Case(
                        "rms_norm", "_rms_norm_bwd_kernel",
                        (("dy_ptr", x), ("x_ptr", x), ("w_ptr", w), ("rstd_ptr", "fp32"), ("dx_ptr", x),
                         ("dw_partial_ptr", "fp32")),
                        (("COMPUTE_DW", compute_dw), ("BLOCK_R", block_r), ("BLOCK_H", block_h)), warps, 3,
                        aligned=aligned,
                    ))
    return _distinct(cases)


def swiglu_cases(widths=MLP_WIDTHS, dtypes=(torch.bfloat16, torch.float32)) -> list[Case]:
    cases = []
    cuda = torch.device("cuda")
    for width in widths:
        for dtype in dtypes:
            dt = _TRITON_DTYPE[dtype]
            block_r, block_c, warps = sg._blocks(16384, width, cuda)
            aligned = ("stride_g", "stride_u", "stride_y", "stride_dy", "stride_dg", "stride_du", "I")
            cases.append(Case(
                "swiglu", "_swiglu_fwd_kernel", (("gate_ptr", dt), ("up_ptr", dt), ("y_ptr", dt)),
                (("BLOCK_R", block_r), ("BLOCK_C", block_c)), warps, 3, aligned=aligned,
            ))
            cases.append(Case(
                "swiglu", "_swiglu_bwd_kernel",
                (("dy_ptr", dt), ("gate_ptr", dt), ("up_ptr", dt), ("dgate_ptr", dt), ("dup_ptr", dt)),
                (("BLOCK_R", block_r), ("BLOCK_C", block_c)), warps, 3, aligned=aligned,
            ))
    return _distinct(cases)


def loss_cases(vocabs=VOCABS, dtypes=(torch.bfloat16, torch.float32)) -> list[Case]:
    cases = []
    for vocab in vocabs:
        block_v, warps = lce.row_kernel_blocks(vocab)
        for dtype in dtypes:
            for softcap in (False, True):
                for grad in (True, False):
                    cases.append(Case(
                        "loss", "_linear_cross_entropy_fwd_kernel",
                        (("logits_ptr", _TRITON_DTYPE[dtype]), ("targets_ptr", "i64"),
                         ("token_weight_ptr", "fp32"), ("loss_ptr", "fp32")),
                        (("HAS_SOFTCAP", softcap), ("COMPUTE_GRAD", grad), ("BLOCK_V", block_v)), warps, 3,
                        aligned=("stride_row", "V") if vocab % 16 == 0 else (),
                        floats=("logit_scale", "softcap", "z_loss"),
                    ))
    return _distinct(cases)


def launch_cases(capability: int) -> list[Case]:
    """Every kernel x every configuration its launcher may pick on sm_<capability>, over the training
    shapes (each distinct compile once)."""
    return _distinct(attention_cases(capability) + rms_norm_cases() + swiglu_cases() + loss_cases())


def _distinct(cases: list[Case]) -> list[Case]:
    return list(dict.fromkeys(cases))


# --------------------------------------------------------------------------------------------------
# Many compiles at once, in fresh processes
# --------------------------------------------------------------------------------------------------


def compile_many(jobs: list[tuple[Case, int]], processes: int = 1) -> list[dict]:
    """``compile_case`` for each (case, capability), in ``processes`` fresh Python processes.

    Fresh processes because compiling needs triton's JIT functions: under TRITON_INTERPRET=1 (the CPU
    tests) a process's kernels are interpreter objects that cannot be compiled. A failed compile gives
    ``{"error": message}`` instead of a report.
    """
    import os
    import pickle
    import subprocess
    import sys

    if not jobs:
        return []
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton's default, said explicitly (no warning)
    processes = max(1, min(processes, len(jobs)))
    shares = [jobs[i::processes] for i in range(processes)]
    workers = [
        subprocess.Popen([sys.executable, "-m", "soulchat.kernels.compile_check"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, env=env)
        for _ in shares
    ]
    for worker, share in zip(workers, shares):
        worker.stdin.write(pickle.dumps(share))
        worker.stdin.close()
    results = []
    for worker in workers:
        out = worker.stdout.read()
        if worker.wait() != 0:
            raise RuntimeError(f"compile worker exited with status {worker.returncode}")
        results.append(pickle.loads(out))
    ordered = [None] * len(jobs)
    for i, share_results in enumerate(results):
        for j, report in enumerate(share_results):
            ordered[i + j * processes] = report
    return ordered


def _worker() -> None:
    import pickle
    import sys

    jobs = pickle.loads(sys.stdin.buffer.read())
    reports = []
    for case, capability in jobs:
        try:
            reports.append(compile_case(case, capability))
        except Exception as exc:  # reported per case; the caller asserts on it
            reports.append({"error": f"{type(exc).__name__}: {str(exc)[:2000]}"})
    sys.stdout.flush()
    sys.stdout.buffer.write(pickle.dumps(reports))


if __name__ == "__main__":
    _worker()

"""The model cards' claims in reports/claims.md follow from benchmark rows (synthetic here): the
decode ratio and where it crosses 5x, constant state memory, million-token prefill, the slope of
time against length."""
from __future__ import annotations

from moebench.report.cards import (CONTRADICTED, NOT_AT_BUDGET, NOT_RUN, REPRODUCED, card_claims, decode_speedup,
                                   linear_scaling, million_tokens, scaling_slope, state_memory)

DEV = "NVIDIA H100 80GB HBM3"


def gen(variant, L, tok_s, state, batch=64, status="ok", graph=False, dev=DEV):
    return {"kind": "bench-generate", "device": dev,
            "result": {"variant": variant, "prompt_len": L, "batch": batch, "decode_tokens_per_s": tok_s,
                       "state_bytes": state, "status": status, "impl": {"cuda_graph": graph}}}


def mem(variant, L, t, mode="prefill", status="ok", dev=DEV):
    return {"kind": "bench-memory", "device": dev,
            "result": {"variant": variant, "length": L, "batch": 1, "mode": mode, "status": status,
                       "time_s": {"median": t}}}


def test_decode_ratio_crosses_five_and_takes_each_variants_best_row():
    rows = [gen("Mamba_25M", L, 100.0, 1) for L in (1024, 4096, 16384)]
    rows += [gen("Transformer_25M", 1024, 50.0, 10), gen("Transformer_25M", 4096, 18.0, 40),
             gen("Transformer_25M", 16384, 10.0, 160),
             gen("Mamba_25M", 1024, 40.0, 1, graph=False)]               # a slower row of the same point: ignored
    (c,) = decode_speedup(rows, "Mamba_25M", "Transformer_25M", "5x")
    assert "1k: 2.0x" in c.ours and "4k: 5.6x" in c.ours and "16k: 10.0x" in c.ours
    assert c.verdict.startswith("partly") and "4k" in c.verdict
    fast = [gen("Transformer_25M", L, 10.0, 1) for L in (1024, 4096, 16384)] + rows[:3]
    assert decode_speedup(fast, "Mamba_25M", "Transformer_25M", "5x")[0].verdict == REPRODUCED
    slow = [gen("Transformer_25M", L, 90.0, 1) for L in (1024, 4096)] + rows[:2]
    assert decode_speedup(slow, "Mamba_25M", "Transformer_25M", "5x")[0].verdict == CONTRADICTED
    other_gpu = [gen("Transformer_25M", 1024, 10.0, 1, dev="NVIDIA H200")] + rows[:1]
    assert decode_speedup(other_gpu, "Mamba_25M", "Transformer_25M", "5x") == []     # never across GPUs


def test_state_memory_constant_and_below_the_cache():
    rows = [gen("Mamba_25M", L, 1.0, 72) for L in (1024, 8192)] + [gen("Transformer_25M", L, 1.0, L) for L in (1024, 8192)]
    assert state_memory(rows, "Mamba_25M", "Transformer_25M", "x")[0].verdict == REPRODUCED
    rows[1]["result"]["state_bytes"] = 80
    assert state_memory(rows, "Mamba_25M", "Transformer_25M", "x")[0].verdict == CONTRADICTED


def test_million_tokens():
    rows = [mem("Mamba_25M", 2**20, 3.0), mem("Transformer_25M", 2**17, 1.0), mem("Transformer_25M", 2**18, 0, status="oom")]
    (c,) = million_tokens(rows)
    assert c.verdict == REPRODUCED and "1024k" in c.ours and "out of memory at 256k" in c.ours
    assert million_tokens([mem("Mamba_25M", 2**16, 1.0)])[0].verdict == NOT_RUN
    assert million_tokens([mem("Mamba_25M", 2**19, 1.0), mem("Mamba_25M", 2**20, 0, status="oom")])[0].verdict == CONTRADICTED


def test_slope_over_the_longest_lengths():
    lengths = [2**k for k in range(12, 21)]                          # 4k .. 1M
    assert abs(scaling_slope([(L, 1e-3 + L * 1e-6) for L in lengths]) - 1) < 0.05
    assert abs(scaling_slope([(L, (L / 1e4) ** 2) for L in lengths]) - 2) < 1e-6
    assert scaling_slope([(L, 1.0) for L in (4096, 8192, 16384)]) is None          # spans only 4x
    lin = [mem("Mamba_25M", L, L * 1e-6) for L in lengths]
    quad = [mem("Mamba2_25M", L, (L * 1e-5) ** 2) for L in lengths]
    flat = [mem("MoE-Mamba_25M", L, 1.0 + L * 1e-9) for L in lengths]
    verdicts = {c.claim.split("(")[1].split(",")[0]: c.verdict for c in linear_scaling(lin + quad + flat)}
    assert verdicts == {"Mamba_25M": REPRODUCED, "Mamba2_25M": CONTRADICTED, "MoE-Mamba_25M": NOT_AT_BUDGET}


def test_no_rows_no_claims():
    assert card_claims([]) == []

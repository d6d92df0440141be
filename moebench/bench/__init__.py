"""Speed and memory benchmarks. No CLI, no plots: each benchmark measures point after point and
turns each into one self-describing row of a results folder's bench.jsonl (moebench.results),
written as soon as the point is measured; moebench.cli.bench prints them and moebench.report.bench renders them.

  common.py      timing, memory, autocast, the out-of-memory guard, sessions (rows), model building
  train_step.py  bench_train: whole training steps per variant, with each MoE variant's
                 dense-equivalent and per-expert-loop baselines
  moe_layer.py   bench_moe: one MoE layer (grouped, loop) against one dense FFN, forward and backward
  memory.py      bench_memory: peak memory and time of training and prefill against sequence length
  generate.py    bench_generate: prefill + step decoding against context length; KV-cache bound

Implementations are passed explicitly and recorded with every result, so a slow fallback never
quietly becomes "the Mamba number". Import from the submodules.
"""

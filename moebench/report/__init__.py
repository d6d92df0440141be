"""Reports from results only: the paper's tables (ablation) and the benchmarks (bench), with figures."""

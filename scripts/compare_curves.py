"""Eager against compiled training of the same run (the two newest rows of RESULTS/runs.jsonl that
differ only in compile): the largest gap of the training loss, the smoothed loss and the validation
loss at the same steps, and each one's tokens/s. bf16 rounding differs between the two, so the curves
drift apart by noise; anything systematic shows as a gap that grows.
    python scripts/compare_curves.py results/published/compile_check"""
import csv
import sys
from pathlib import Path

from moebench.results import load_records


def main(folder: str) -> None:
    rows = [r for r in load_records(Path(folder) / "runs.jsonl") if r.get("status") == "done"]
    by = {r["impl"]["compile"]: r for r in rows}       # the newest of each
    if set(by) != {True, False}:
        raise SystemExit(f"{folder}: need a done eager and a done compiled run, have {sorted(by)}")
    curves = {}
    for c, r in by.items():
        with open(Path(folder) / "runs" / r["run_id"] / "curve.csv", newline="") as f:
            curves[c] = {int(x["step"]): x for x in csv.DictReader(f)}
    steps = sorted(curves[True].keys() & curves[False].keys())
    for key in ("loss", "smoothed", "val_loss"):
        gaps = [(s, float(curves[True][s][key]) - float(curves[False][s][key])) for s in steps
                if curves[True][s].get(key) and curves[False][s].get(key)]
        if gaps:
            s, worst = max(gaps, key=lambda g: abs(g[1]))
            print(f"{key}: {len(gaps)} points, compiled - eager: largest {worst:+.4f} at step {s}, "
                  f"last {gaps[-1][1]:+.4f} (step {gaps[-1][0]})")
    for c, r in sorted(by.items()):
        m = r["metrics"]
        print(f"{'compiled' if c else 'eager'}: {m['tokens_per_s']:,.0f} tok/s, final smoothed {m['final_smoothed_loss']:.4f}, "
              f"val {m['val_loss']:.4f}, {r['env']['device_name']}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/published/compile_check")

"""Smoothed training loss and the paper's speedup (appendix D)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class EMA:
    """Exponential moving average of the training log-perplexity, alpha per step (paper: 0.001).
    Debiased as in Adam (starts from 0, divided by 1 - (1 - alpha)^t) so early values are not
    pulled towards an arbitrary start."""

    def __init__(self, alpha: float, value: float = 0.0, n: int = 0):
        self.alpha, self.value, self.n = alpha, value, n

    def update(self, x: float) -> float:
        self.n += 1
        self.value = (1 - self.alpha) * self.value + self.alpha * x
        return self.get()

    def get(self) -> float:
        return self.value / (1 - (1 - self.alpha) ** self.n) if self.n else math.nan

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "value": self.value, "n": self.n}


def tokens_to_reach(tokens, losses, target: float) -> float | None:
    """First token count at which the curve reaches `target`, interpolated linearly between the
    two points that straddle it; None when it never gets there."""
    t, y = np.asarray(tokens, float), np.asarray(losses, float)
    below = np.nonzero(y <= target)[0]
    if len(below) == 0:
        return None
    i = below[0]
    if i == 0:
        return float(t[0])
    t0, t1, y0, y1 = t[i - 1], t[i], y[i - 1], y[i]
    return float(t0 + (t1 - t0) * (y0 - target) / (y0 - y1))


def loss_at(tokens, losses, at: float) -> float | None:
    t, y = np.asarray(tokens, float), np.asarray(losses, float)
    if len(t) == 0 or at < t[0] or at > t[-1]:
        return None
    return float(np.interp(at, t, y))


@dataclass
class Speedup:
    value: float | None        # tokens B trained / tokens A needed for B's final loss
    reason: str                # why value is None, or how it was computed
    target_loss: float
    loss_a_at_b_end: float | None


def speedup(tokens_a, loss_a, tokens_b, loss_b) -> Speedup:
    """speedup(A over B), as the paper's tables define it: B trains for T_B tokens and ends at its
    final smoothed loss; A reaches that loss after T_A tokens (its first crossing, interpolated);
    speedup = T_B / T_A. T_B is B's whole budget, not B's own first crossing of its final loss: a
    smoothed curve that flattens or wobbles near its end crosses that level earlier, which would
    understate the speedup."""
    target = float(loss_b[-1])
    t_b = float(tokens_b[-1])
    t_a = tokens_to_reach(tokens_a, loss_a, target)
    at_b_end = loss_at(tokens_a, loss_a, t_b)
    if t_a is None:
        return Speedup(None, f"A never reached B's final loss {target:.4f} "
                             f"(A's best {float(np.min(loss_a)):.4f})", target, at_b_end)
    return Speedup(t_b / t_a, "B's training tokens over A's tokens to B's final loss (smoothed curves)",
                   target, at_b_end)


def speedup_curve(tokens_a, loss_a, tokens_b, loss_b, n: int = 50):
    """speedup(l) over the losses l both curves reach: (tokens B took to reach l, ratio)."""
    lo = max(float(np.min(loss_a)), float(np.min(loss_b)))
    hi = min(float(loss_a[0]), float(loss_b[0]))
    out = []
    for l in np.linspace(hi, lo, n)[1:]:
        ta, tb = tokens_to_reach(tokens_a, loss_a, l), tokens_to_reach(tokens_b, loss_b, l)
        if ta and tb:
            out.append((tb, tb / ta))
    return out

"""The paper's speedup (appendix D) on synthetic curves with known answers, linear interpolation
between curve points, "never reached", loss_at, and the debiased EMA of the training loss."""
import math

import numpy as np
import pytest

from moebench.metrics import EMA, loss_at, speedup, speedup_curve, tokens_to_reach


def f(t):
    """A decreasing loss curve (the shape of a real one: fast at first, then slow)."""
    return 3.0 + 7.0 / (1.0 + np.asarray(t, float) / 2000.0)


# --- tokens_to_reach and loss_at ------------------------------------------------------------------
def test_tokens_to_reach_interpolates_between_points():
    tokens, losses = [0, 100, 200, 300], [10.0, 8.0, 6.0, 5.0]
    assert tokens_to_reach(tokens, losses, 7.0) == pytest.approx(150.0, abs=1e-9)
    assert tokens_to_reach(tokens, losses, 5.5) == pytest.approx(250.0, abs=1e-9)
    assert tokens_to_reach(tokens, losses, 8.0) == 100.0           # exactly on a point
    assert tokens_to_reach(tokens, losses, 11.0) == 0.0            # already below at the first point
    assert tokens_to_reach(tokens, losses, 4.9) is None            # never reached


def test_tokens_to_reach_takes_the_first_crossing_of_a_noisy_curve():
    tokens, losses = [0, 10, 20, 30, 40], [9.0, 7.0, 8.0, 6.0, 7.5]
    assert tokens_to_reach(tokens, losses, 7.5) == pytest.approx(7.5, abs=1e-9)
    assert tokens_to_reach(tokens, losses, 6.5) == pytest.approx(27.5, abs=1e-9)


def test_loss_at_interpolates_and_refuses_to_extrapolate():
    tokens, losses = [100, 200, 400], [9.0, 7.0, 6.0]
    assert loss_at(tokens, losses, 150) == pytest.approx(8.0, abs=1e-12)
    assert loss_at(tokens, losses, 300) == pytest.approx(6.5, abs=1e-12)
    assert loss_at(tokens, losses, 400) == 6.0
    assert loss_at(tokens, losses, 100) == 9.0
    assert loss_at(tokens, losses, 99) is None
    assert loss_at(tokens, losses, 401) is None
    assert loss_at([], [], 0) is None


# --- speedup --------------------------------------------------------------------------------------
def test_speedup_is_exactly_two_when_a_learns_twice_as_fast():
    # B(t) = f(t), A(t) = f(2t) on the same token grid: A reaches B's final loss f(T) at T/2
    t = np.arange(0, 10_001, 100)
    s = speedup(t, f(2 * t), t, f(t))
    assert s.value == pytest.approx(2.0, rel=1e-12), s
    assert s.target_loss == pytest.approx(float(f(10_000)))
    assert s.loss_a_at_b_end == pytest.approx(float(f(20_000)))    # A's loss where B's curve ends
    assert s.reason


def test_speedup_interpolates_between_a_coarse_curve_points():
    # B is linear 10 -> 5 over 1000 tokens; A is linear 10 -> 0 over 1000 tokens but logged only every
    # 300 tokens, so B's final loss 5 falls between A's points 300 (7.0) and 600 (4.0): A gets there at 500
    tb = np.arange(0, 1001, 100)
    lb = 10.0 - 5.0 * tb / 1000
    ta = np.array([0, 300, 600, 900])
    la = 10.0 - 10.0 * ta / 1000
    s = speedup(ta, la, tb, lb)
    assert s.value == pytest.approx(1000 / 500, rel=1e-12), s
    # and a ratio that is no integer: A falls 10 -> 4 over 700 tokens, so it reaches 5 at 700 * 5/6
    ta2 = np.array([0, 700])
    la2 = np.array([10.0, 4.0])
    assert speedup(ta2, la2, tb, lb).value == pytest.approx(1000 / (700 * 5 / 6), rel=1e-12)


def test_speedup_counts_the_baselines_whole_budget():
    # B reaches 5.0 at 600 tokens, wobbles and ends at 5.0 after 1000: the paper divides B's 1000
    # training tokens, not its first crossing at 600, by the 500 tokens A needs
    tb = np.array([0, 200, 400, 600, 800, 1000])
    lb = np.array([10.0, 8.0, 6.0, 5.0, 5.1, 5.0])
    ta = np.arange(0, 1001, 100)
    la = 10.0 - 10.0 * ta / 1000
    assert speedup(ta, la, tb, lb).value == pytest.approx(1000 / 500, rel=1e-12)


def test_speedup_below_one_when_a_is_slower():
    t = np.arange(0, 10_001, 100)
    a_t = np.arange(0, 20_001, 100)
    s = speedup(a_t, f(a_t / 2), t, f(t))                          # A(t) = f(t/2): half as fast
    assert s.value == pytest.approx(0.5, rel=1e-12), s


def test_speedup_never_reached_gives_none_and_a_reason():
    t = np.arange(0, 10_001, 100)
    a_loss = f(t / 4)                                              # A stops well above B's final loss
    s = speedup(t, a_loss, t, f(t))
    assert s.value is None
    assert "never reached" in s.reason and f"{float(f(10_000)):.4f}" in s.reason, s.reason
    assert s.target_loss == pytest.approx(float(f(10_000)))
    assert s.loss_a_at_b_end == pytest.approx(float(a_loss[-1]))


def test_speedup_curve_is_two_at_every_loss_both_reach():
    # linear curves are interpolated exactly, so every level gives the same ratio
    t = np.arange(0, 10_001, 100)
    b = 10.0 - 5.0 * t / 10_000
    a = 10.0 - 10.0 * np.minimum(t, 5_000) / 10_000                # A(t) = B(2t), flat after it hits 5
    pts = speedup_curve(t, a, t, b, n=21)
    assert len(pts) == 20
    tb = [p[0] for p in pts]
    assert tb == sorted(tb) and tb[-1] == pytest.approx(10_000)
    for tokens_b, ratio in pts:
        assert ratio == pytest.approx(2.0, rel=1e-9), (tokens_b, ratio)


# --- EMA ------------------------------------------------------------------------------------------
def test_ema_debiased_constant_input_is_that_constant_from_the_first_step():
    for alpha in (0.001, 0.1, 0.9):
        ema = EMA(alpha)
        assert math.isnan(ema.get())
        for n in range(1, 6):
            assert ema.update(4.2) == pytest.approx(4.2, rel=1e-12), (alpha, n)


def test_ema_matches_the_debiased_formula():
    alpha, xs = 0.001, [10.0, 9.0, 8.5, 8.0, 7.0]
    ema = EMA(alpha)
    for n, x in enumerate(xs, 1):
        got = ema.update(x)
        weights = [alpha * (1 - alpha) ** (n - 1 - i) for i in range(n)]
        want = sum(w * v for w, v in zip(weights, xs[:n])) / sum(weights)   # normalised weights
        assert got == pytest.approx(want, rel=1e-12)
    # without debiasing, alpha 0.001 would report about 0.04 here, not about 8.5
    assert 7.0 < ema.get() < 10.0


def test_ema_state_round_trip_continues_identically():
    a = EMA(0.05)
    for x in (5.0, 4.0, 3.5):
        a.update(x)
    b = EMA(**a.state_dict())
    for x in (3.0, 2.9, 2.5):
        assert a.update(x) == b.update(x)
    assert a.state_dict() == b.state_dict()

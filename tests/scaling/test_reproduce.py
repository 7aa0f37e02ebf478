"""reproduce-tiny's judging rules on synthetic seed-level rows (holds / does not hold / inconclusive for each rule),
and how a claim's sweep is put under a recipe arm with its training seeds."""

import math
from pathlib import Path

import pytest

from diffperc.scaling.claims import (
    CLAIMS,
    FAILS,
    HOLDS,
    UNSURE,
    combine,
    judge_cosine,
    judge_decreasing,
    judge_e2e,
    judge_upcycling,
    seed_of,
)
from diffperc.scaling.reproduce import ARMS, arm_sweep
from diffperc.scaling.reproduce_report import first_timesteps, point_means
from diffperc.scaling.spec import expand, load_sweep

ROOT = Path(__file__).resolve().parents[2]
SEED_NOISE = {0: 1.0, 1: 1.03, 2: 0.97}  # multiplicative seed effects: +-3%


def _law_rows(b: float, seed_noise=SEED_NOISE, xs=(1e9, 2e9, 4e9, 8e9)) -> list[dict]:
    return [{"x": x, "m": 0.3 * (x / 1e9) ** b * f, "seed_everything": s} for x in xs for s, f in seed_noise.items()]


def test_power_law_rule_uses_every_seed_run_and_its_spread():
    holds = judge_decreasing(_law_rows(-0.1), "m", "x")
    assert holds.verdict == HOLDS
    assert "n = 12" in holds.fit and "per seed b = -0.1, -0.1, -0.1" in holds.fit  # each seed alone is exact
    assert holds.measured.startswith("0.3 at 1e+09 -> 0.2437 at 8e+09 (mean of 3 seeds)")  # 0.3 * 8^-0.1
    assert judge_decreasing(_law_rows(+0.1), "m", "x").verdict == FAILS
    # The same -0.05 slope: clear with +-3% seed effects, lost in +-30% ones (the seed spread widens the interval).
    assert judge_decreasing(_law_rows(-0.05), "m", "x").verdict == HOLDS
    assert judge_decreasing(_law_rows(-0.05, {0: 1.0, 1: 1.3, 2: 0.7}), "m", "x").verdict == UNSURE
    # -0.02 with +-3% seed effects is lost among independent runs, but not when each seed is one model tested at
    # every x (a test-time sweep): one intercept per model, and the exponent is exact.
    assert judge_decreasing(_law_rows(-0.02), "m", "x").verdict == UNSURE
    within = judge_decreasing(_law_rows(-0.02), "m", "x", within=seed_of)
    assert within.verdict == HOLDS and within.fit.startswith("b = -0.02 [-0.02, -0.02] within 3 models, n = 12")
    # Seeds of one x only, or too few runs: no fit.
    assert judge_decreasing(_law_rows(-0.1, xs=(1e9,)), "m", "x").verdict == UNSURE
    assert judge_decreasing(_law_rows(-0.1)[:2], "m", "x").verdict == UNSURE


def test_seed_of_reads_the_run_then_its_upstream():
    assert seed_of({"seed_everything": 2}) == 2
    assert seed_of({"from/seed_everything": 1}) == 1
    assert seed_of({}) == 0


def _upcycling_rows(gains: dict[int, float]) -> list[dict]:
    """Dense continuation 0.2 * seed effect; upcycled runs at ``1 - gain`` of their own seed's dense run."""
    rows = []
    for s, f in SEED_NOISE.items():
        rows.append({"model.backbone.name": "t1", "model.upcycle": None, "m": 0.2 * f, "seed_everything": s})
        for experts, gain in gains.items():
            rows.append(
                {
                    "model.backbone.name": "t1",
                    "model.upcycle.num_experts": experts,
                    "seed_everything": s,
                    "compute/total_train_macs": experts * 1e9,
                    "m": 0.2 * f * (1 - gain),
                }
            )
    return rows


def test_upcycling_pairs_each_run_with_the_dense_run_of_its_seed():
    # 5, 10 and 15% better than the own seed's dense run at 4, 8 and 16 experts: holds, although seeds differ by 3%.
    verdict = judge_upcycling(_upcycling_rows({4: 0.05, 8: 0.10, 16: 0.15}), "m")
    assert verdict.verdict == HOLDS, verdict.measured
    assert verdict.measured.startswith("mean gain over dense +10.1% [+6.7%, +13.4%] (9 runs)")  # log-mean of 5-15%
    # 6, 5 and 4% worse: dense wins, whatever the (falling) fit says.
    assert judge_upcycling(_upcycling_rows({4: -0.06, 8: -0.05, 16: -0.04}), "m").verdict == FAILS
    # Gains of +10% and -10% around 0: no verdict either way.
    rows = _upcycling_rows({4: 0.1, 8: -0.1, 16: 0.0})
    assert judge_upcycling(rows, "m").verdict == UNSURE
    assert judge_upcycling([r for r in rows if r.get("model.upcycle", 0) is not None], "m").verdict == UNSURE


def _schedule_rows(cosine_ratio: float, spread: float = 0.0) -> list[dict]:
    rows = []
    for s, f in SEED_NOISE.items():
        for i, steps in enumerate((1, 2, 5, 10)):
            wobble = 1 + spread * (-1) ** (i + s)
            rows.append(
                {
                    "model.diffusion.beta_schedule": "linear",
                    "model.inference.num_steps": steps,
                    "from/seed_everything": s,
                    "m": 0.3 * f,
                }
            )
            rows.append(
                {
                    "model.diffusion.beta_schedule": "squaredcos_cap_v2",
                    "model.inference.num_steps": steps,
                    "from/seed_everything": s,
                    "m": 0.3 * f * cosine_ratio * wobble,
                }
            )
    return rows


def test_cosine_rule_pairs_schedules_by_steps_and_seed():
    holds = judge_cosine(_schedule_rows(0.9), "m")
    assert holds.verdict == HOLDS and "n = 12" in holds.fit
    assert holds.fit.startswith(f"mean log(cos/lin) = {math.log(0.9):.3g}")
    assert judge_cosine(_schedule_rows(1.1), "m").verdict == FAILS
    assert judge_cosine(_schedule_rows(1.0, spread=0.2), "m").verdict == UNSURE
    one_step = [r for r in _schedule_rows(0.9) if r["model.inference.num_steps"] == 1]
    assert judge_cosine(one_step, "m").verdict == UNSURE  # one step count: nothing to average over


def _e2e_rows(best_ratio: float, spread: float = 0.0) -> list[dict]:
    """One-step runs at 0.25 * seed effect; diffusion at 1 x 1 (worse) and 5 x 1 (best_ratio of the one-step)."""
    rows = []
    for s, f in SEED_NOISE.items():
        rows.append(
            {
                "kind": "e2e",
                "seed_everything": s,
                "m": 0.25 * f,
                "compute/test_macs_per_sample": 1e6,
                "compute/train_macs": 3e12,
            }
        )
        for steps, ratio in ((1, 1.3), (5, best_ratio * (1 + spread * (-1) ** s))):
            rows.append(
                {
                    "from/seed_everything": s,
                    "model.inference.num_steps": steps,
                    "model.inference.ensemble_size": 1,
                    "m": 0.25 * f * ratio,
                    "compute/test_macs_per_sample": steps * 1e6,
                    "compute/train_macs": 3e12,
                }
            )
    return rows


def test_one_step_control_rule():
    holds = judge_e2e(_e2e_rows(0.9), "m")
    assert holds.verdict == HOLDS, holds.measured
    assert "diffusion best 0.225 at 5 steps x 1 (5e+06 MACs/image, 5x)" in holds.measured
    assert "beats it from 5e+06 MACs/image" in holds.measured and "training MACs ratio max/min 1" in holds.measured
    assert judge_e2e(_e2e_rows(1.1), "m").verdict == FAILS  # even the best diffusion setting loses
    assert judge_e2e(_e2e_rows(1.0, spread=0.3), "m").verdict == UNSURE
    assert judge_e2e([r for r in _e2e_rows(0.9) if r.get("kind") != "e2e"], "m").verdict == UNSURE


def test_a_claim_holds_only_when_every_metric_agrees():
    assert combine([HOLDS, HOLDS]) == HOLDS
    assert combine([FAILS, FAILS]) == FAILS
    assert combine([HOLDS, FAILS]) == UNSURE
    assert combine([]) == UNSURE


def test_arms_and_seeds_go_to_the_stage_that_trains():
    claims = {c.sweep: c for c in CLAIMS}
    paper, tuned = ARMS
    # A sweep that trains its points: seeds and the paper's training and test settings on the points themselves.
    sweep = arm_sweep(load_sweep(ROOT / "sweeps/tiny/model_size.yaml"), paper, (0, 1, 2), claims["model_size"])
    _, points = expand(sweep, "/tmp/x")
    assert len(points) == 9 and sorted({p.overrides["seed_everything"] for p in points}) == [0, 1, 2]  # 3 sizes
    assert {p.overrides["model.init_args.diffusion.prediction_type"] for p in points} == {"epsilon"}
    assert {p.overrides["model.init_args.inference.timestep_spacing"] for p in points} == {"leading"}
    # Pretraining is shared by the arms: seeds there, the arm only on the fine-tunes, which inherit the seed.
    sweep = arm_sweep(load_sweep(ROOT / "sweeps/tiny/pretrain_steps.yaml"), paper, (0, 1, 2), claims["pretrain_steps"])
    ups, points = expand(sweep, "/tmp/x", "/tmp/up")
    tuned_ups, _ = expand(
        arm_sweep(load_sweep(ROOT / "sweeps/tiny/pretrain_steps.yaml"), tuned, (0, 1, 2), claims["pretrain_steps"]),
        "/tmp/y",
        "/tmp/up",
    )
    assert [u.id for u in ups] == [u.id for u in tuned_ups] and len(ups) == 9  # 3 lengths x 3 seeds, shared
    assert all("model.init_args.diffusion.prediction_type" not in u.overrides for u in ups)
    assert all(p.overrides["seed_everything"] == p.upstream.overrides["seed_everything"] for p in points)
    assert {p.overrides["model.init_args.diffusion.prediction_type"] for p in points} == {"epsilon"}
    # A test-time sweep: the arm trains the upstream model and sets the test; the claim's grid values win.
    sweep = arm_sweep(
        load_sweep(ROOT / "sweeps/tiny/inference_steps.yaml"), paper, (0, 1, 2), claims["inference_steps"]
    )
    ups, points = expand(sweep, "/tmp/x", "/tmp/up")
    assert {u.overrides["model.init_args.diffusion.prediction_type"] for u in ups} == {"epsilon"} and len(ups) == 3
    assert sorted({p.overrides["model.init_args.inference.num_steps"] for p in points}) == [1, 2, 5, 10, 20]
    assert {p.overrides["model.init_args.inference.reducer"] for p in points} == {"median_compilation"}
    # ... and the test builds the model as it was trained (an epsilon checkpoint refuses a v-prediction config).
    assert {p.overrides["model.init_args.diffusion.prediction_type"] for p in points} == {"epsilon"}
    # The tuned arm is the sweep file as shipped, with seeds.
    sweep = arm_sweep(load_sweep(ROOT / "sweeps/tiny/ensemble_size.yaml"), tuned, (0, 1, 2), claims["ensemble_size"])
    ups, points = expand(sweep, "/tmp/x", "/tmp/up")
    assert len(ups) == 3 and len(points) == 12
    assert all("model.init_args.inference.num_steps" not in p.overrides for p in points)  # the quickstart's 2


def test_the_measured_reason_of_the_steps_claim():
    # diffusers' rule: leading spacing starts k steps at (k - 1) * (1000 // k); trailing always at 999.
    assert first_timesteps("leading", (1, 2, 5, 10, 20)) == {1: 0, 2: 500, 5: 800, 10: 900, 20: 950}
    assert set(first_timesteps("trailing", (1, 2, 5, 10, 20)).values()) == {999}


def test_point_means_group_seeds_of_one_point():
    rows = [
        {"model.inference.num_steps": k, "m": v, "from/seed_everything": s}
        for k, vals in ((1, (0.2, 0.4)), (2, (0.3, 0.3)))
        for s, v in enumerate(vals)
    ]
    means = point_means(rows, "m")
    assert means["steps 1"] == pytest.approx((0.3, math.sqrt(0.02), 2))
    assert means["steps 2"] == pytest.approx((0.3, 0.0, 2))

import json
import math

import pytest
from scipy import stats

from diffperc.scaling.laws import describe_model, format_plan, load_rows, main, plan

# Synthetic laws: abs_rel = 5 * C^-0.2 over training MACs (models tested with 2 passes), and, for one checkpoint
# whose network pass costs 1e6 MACs, abs_rel = 0.3 * c^-0.1 over test MACs per image.
_PER_PASS = {"A": 1e6, "B": 4e6, "C": 1.6e7}
_METRIC = "test/depth/abs_rel"
_LAW = "law/val/depth/abs_rel/"


def _train_rows() -> list[dict]:
    rows = []
    for i, (name, per_pass) in enumerate(_PER_PASS.items()):
        macs = 100 * 1e3 * per_pass  # 100 steps at 1000x the pass cost per step
        noise = (1.01, 0.99, 1.005)[i]  # a little scatter, so the fit has a band
        rows.append(
            {
                "point": name,
                "status": "ok",
                "overrides": {"model.init_args.backbone.name": name},
                "model.backbone.name": name,
                "model.backbone.hidden_size": 64 * (i + 1),
                "model.backbone.depth": 2 * (i + 1),
                "compute/train_macs": macs,
                "trainer.global_step": 100,
                "model.inference.num_steps": 2,
                "model.inference.ensemble_size": 1,
                "compute/test_macs_per_sample": 2 * per_pass,
                _METRIC: 5 * macs**-0.2 * noise,
            }
        )
    return rows


def _tts_rows(noise: float = 0.002) -> list[dict]:
    rows = []
    for steps in (1, 2, 5, 10, 20):
        for members in (1, 3):
            c = steps * members * 1e6
            rows.append(
                {
                    "point": f"s{steps}n{members}",
                    "status": "ok",
                    "model.inference.num_steps": steps,
                    "model.inference.ensemble_size": members,
                    "compute/test_macs_per_sample": c,
                    _METRIC: 0.3 * c**-0.1 * (1 + noise if steps % 2 else 1 - noise),
                }
            )
    return rows


def _choice_half(result, passes: float) -> float:
    """The test-time part of a candidate's band (log units): t * se(b_I) * |log(passes / P0)|."""
    law = result.test_law
    return stats.t.ppf(0.975, law.dof) * math.sqrt(law.param_cov[1][1]) * abs(math.log(passes / 2))


def test_plan_picks_the_model_that_affords_the_most_passes():
    # Budget 3e7 MACs/image: model A (1e6 per pass) affords 30 passes -> (10 steps, 3 members); B affords 7.5 -> 6
    # passes; C affords 1.875 -> 1 pass. Both laws fall with compute, so A with 30 passes predicts the lowest error.
    result = plan(_train_rows(), _tts_rows(), train_budget=1e13, inference_budget=3e7, metric=_METRIC)
    best = result.best
    assert best.row["point"] == "A" and (best.num_steps, best.ensemble_size, best.passes) == (10, 3, 30)
    assert best.model == "A (hidden 64, depth 2)"
    assert best.test_macs == pytest.approx(3e7)
    assert best.train_steps == 10_000  # 1e13 MACs / (1e11 MACs / 100 steps)
    # metric = L_T(1e13) * (30 / 2)^b_I with the fitted laws (close to 5 * 1e13^-0.2 * 15^-0.1).
    expected = float(result.train_law.predict(1e13)) * 15**result.test_law.b
    assert best.predicted == pytest.approx(expected, rel=1e-12)
    assert best.predicted == pytest.approx(5 * 1e13**-0.2 * 15**-0.1, rel=0.03)
    assert best.low < best.predicted < best.high
    by_model = {c.row["point"]: max(x.passes for x in result.candidates if x.row is c.row) for c in result.candidates}
    assert by_model == {"A": 30, "B": 6, "C": 1}


def test_plan_is_decided_when_the_runner_up_lies_outside_the_band_for_the_choice():
    result = plan(_train_rows(), _tts_rows(), 1e13, 3e7, _METRIC)
    best, rival = result.candidates[:2]
    # One law for all sizes: the band the choice is judged by is b_I's part only, t * se * log(30 / 2) = 0.32%.
    half = _choice_half(result, 30)
    assert half == pytest.approx(0.0032, abs=0.0002)
    assert best.choice_high == pytest.approx(best.predicted * math.exp(half), rel=1e-12)
    # The runner-up, A with 20 x 1 passes, predicts (20 / 30)^b_I = 4.2% more: outside.
    assert (rival.model, rival.num_steps, rival.ensemble_size) == ("A (hidden 64, depth 2)", 20, 1)
    assert rival.predicted / best.predicted == pytest.approx((20 / 30) ** result.test_law.b, rel=1e-12)
    assert result.decided and result.close == ()
    assert result.reason == (
        f"the runner-up (A (hidden 64, depth 2); num_steps=20, ensemble_size=1) predicts {rival.predicted:.4g}, "
        f"outside the best's 95% band for the choice [{best.choice_low:.4g}, {best.choice_high:.4g}]"
    )
    assert not result.per_model and result.one_law_why == (
        "3 of 3 training runs lack `law/val/depth/abs_rel/b` with n >= 3 (A, B, C)"
    )


def test_plan_is_undecided_when_the_training_exponent_interval_contains_0():
    rows = _train_rows()
    for row, wobble in zip(rows, (1.0, 1.2, 0.8), strict=True):
        row[_METRIC] = 0.1 * wobble  # flat with +-20% scatter: b's interval straddles 0
    result = plan(rows, _tts_rows(), 1e13, 3e7, _METRIC)
    low, high = result.train_law.b_ci
    assert low < 0 < high
    assert not result.decided and result.close == ()
    assert result.reason == f"the training law's exponent 95% interval [{low:.3g}, {high:.3g}] contains 0"
    text = format_plan(result, rows)
    assert text.endswith(
        "VERDICT: UNDECIDED: too uncertain to choose between A (hidden 64, depth 2); num_steps=10, ensemble_size=3 "
        f"(ranked first) and the {len(result.candidates) - 1} other candidates\n  why: {result.reason}."
    )


def test_plan_is_undecided_when_another_setting_lies_inside_the_band():
    # +-5% scatter on the test-time sweep: b_I = -0.12 [-0.149, -0.091], whose part of the band at 30 passes
    # (t * se * log 15 = 8.2%) covers A with 20 x 1 passes (5% worse) but not A with 5 x 3 (8.6% worse).
    result = plan(_train_rows(), _tts_rows(noise=0.05), 1e13, 3e7, _METRIC)
    assert result.test_law.b_ci[1] < 0
    best = result.best
    assert math.log(best.choice_high / best.predicted) == pytest.approx(_choice_half(result, 30), rel=1e-12)
    assert [(c.num_steps, c.ensemble_size) for c in result.close] == [(20, 1)]
    assert not result.decided
    assert result.reason == (
        f"1 other candidate predicts a value inside the best's 95% band for the choice "
        f"[{best.choice_low:.4g}, {best.choice_high:.4g}]"
    )
    assert "VERDICT: UNDECIDED: too uncertain to choose between 2 candidates:\n" in format_plan(result, _train_rows())


def test_plan_is_undecided_between_models_that_one_law_cannot_tell_apart():
    # 1e9 MACs/image: every model affords the most passes (20 x 3), and one law for all sizes predicts the same.
    result = plan(_train_rows(), _tts_rows(), 1e13, 1e9, _METRIC)
    assert [(c.row["point"], c.passes) for c in (result.best, *result.close)] == [("A", 60), ("B", 60), ("C", 60)]
    assert not result.decided
    assert result.reason.endswith("; one law for all sizes predicts the same for every model at the same passes")


def _per_model_rows(b_interval: float = 0.002) -> list[dict]:
    """Runs carrying their own val law: A flattens (b = -0.05), B falls fast (two seeds, b = -0.29 and -0.31), C in
    between (b = -0.2); each val law is twice its run's test metric at the run's MACs (the ratio 0.5 carries it)."""
    rows = _train_rows()
    own = {"A": -0.05, "B": -0.29, "C": -0.2}
    for row in rows:
        b = own[row["point"]]
        macs = row["compute/train_macs"]
        row.update({_LAW + "a": 2 * row[_METRIC] / macs**b, _LAW + "b": b, _LAW + "n": 8, _LAW + "x_max": macs})
        row.update({_LAW + "b_low": b - b_interval, _LAW + "b_high": b + b_interval})
    seed = {**rows[1], "point": "B1", "seed_everything": 1, _METRIC: rows[1][_METRIC] * 0.98}
    seed.update({_LAW + "b": -0.31, _LAW + "b_low": -0.31 - b_interval, _LAW + "b_high": -0.31 + b_interval})
    seed[_LAW + "a"] = 2 * seed[_METRIC] / seed["compute/train_macs"] ** -0.31
    return [*rows, seed]


def test_plan_uses_each_models_own_law_when_every_run_has_one():
    rows = _per_model_rows()
    result = plan(rows, _tts_rows(), 1e13, 3e7, _METRIC)
    assert result.per_model and result.one_law_why == ""
    laws = {law.model: law for law in result.model_laws}
    assert list(laws) == ["A (hidden 64, depth 2)", "B (hidden 128, depth 4)", "C (hidden 192, depth 6)"]
    # B's two seeds, averaged in log space: test * (1e13 / 4e11)^b per run (the val law's a cancels in the ratio).
    b_runs = [rows[1], rows[3]]
    expected_b = math.exp(sum(math.log(r[_METRIC] * 25 ** r[_LAW + "b"]) for r in b_runs) / 2)
    assert laws["B (hidden 128, depth 4)"].predicted == pytest.approx(expected_b, rel=1e-12)
    assert laws["B (hidden 128, depth 4)"].b == pytest.approx(-0.3) and len(laws["B (hidden 128, depth 4)"].rows) == 2
    assert laws["A (hidden 64, depth 2)"].predicted == pytest.approx(rows[0][_METRIC] * 100**-0.05, rel=1e-12)
    # B wins although A affords 30 passes: A's own law flattens (0.0193 with 30 passes against B's 0.0080 with 6).
    best = result.best
    assert (best.model, best.num_steps, best.ensemble_size) == ("B (hidden 128, depth 4)", 2, 3)
    assert best.predicted == pytest.approx(expected_b * 3**result.test_law.b, rel=1e-12)
    # Its band: b's interval (+-0.002) times log(25), with b_I's part for 6 / 2 passes.
    half = math.hypot(0.002 * math.log(25), _choice_half(result, 6))
    assert math.log(best.high / best.predicted) == pytest.approx(half, rel=1e-9)
    assert result.decided, result.reason
    text = format_plan(result, rows)
    assert "model size that wins: B (hidden 128, depth 4)" in text and "one law for all sizes" not in text


def test_plan_per_model_is_undecided_when_the_winners_own_exponent_interval_contains_0():
    rows = _per_model_rows()
    for row in rows:
        if row["point"].startswith("B"):
            row[_LAW + "b_high"] = 0.01  # B's own law: b in [~-0.3, 0.01]
    result = plan(rows, _tts_rows(), 1e13, 3e7, _METRIC)
    assert result.best.model == "B (hidden 128, depth 4)" and not result.decided
    assert result.reason.startswith(
        "B (hidden 128, depth 4)'s own law's exponent 95% interval [-0.302, 0.01] contains 0"
    )


def test_plan_falls_back_to_one_law_when_a_run_lacks_its_own(tmp_path, capsys):
    rows = _per_model_rows()
    rows[3][_LAW + "n"] = 2  # B1's law was fitted on 2 validations only
    result = plan(rows, _tts_rows(), 1e13, 3e7, _METRIC)
    assert not result.per_model and result.best.row["point"] == "A"
    assert result.one_law_why == "1 of 4 training runs lack `law/val/depth/abs_rel/b` with n >= 3 (B1)"
    for name, rows_ in (("train", rows), ("tts", _tts_rows())):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_))
    main(["plan", "--train_report", str(tmp_path / "train"), "--tts_report", str(tmp_path / "tts"),
          "--train_budget", "1e13", "--inference_budget", "3e7"])  # fmt: skip
    out = capsys.readouterr().out
    assert "  one law for all sizes: the model choice follows inference cost only (1 of 4 training runs" in out


def test_describe_model_names_the_size():
    assert describe_model({"model.backbone.name": "t2"}) == "t2 (hidden 128, depth 4)"  # the preset's sizes
    row = {"model.backbone.name": "t1", "model.backbone.hidden_size": 96, "model.backbone.depth": 3}
    assert describe_model(row) == "t1 (hidden 96, depth 3)"
    assert describe_model({"model.backbone.name": "t3-4E2A"}) == "t3-4E2A (hidden 192, depth 6)"
    assert describe_model({"model.backbone.name": "custom"}) == "custom"
    overrides = {"seed_everything": 3, "model.init_args.lr": 1e-4}
    assert describe_model({"point": "p0", "overrides": overrides}) == "model.init_args.lr=0.0001"


def test_plan_band_widens_with_extrapolation():
    near = plan(_train_rows(), _tts_rows(), 1e12, 3e7, _METRIC).best
    far = plan(_train_rows(), _tts_rows(), 1e18, 3e7, _METRIC).best
    assert math.log(far.high / far.low) > math.log(near.high / near.low)


def test_plan_rejects_a_budget_below_one_pass():
    with pytest.raises(ValueError, match=r"`--inference_budget` 5e\+05 MACs/image is below one network pass"):
        plan(_train_rows(), _tts_rows(), 1e13, 5e5, _METRIC)


def test_laws_plan_cli_prints_the_plan(tmp_path, capsys):
    for name, rows in (("train", _train_rows()), ("tts", _tts_rows())):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn')
    assert len(load_rows(tmp_path / "train")) == 3
    main(["plan", "--train_report", str(tmp_path / "train"), "--tts_report", str(tmp_path / "tts"),
          "--train_budget", "1e13", "--inference_budget", "3e7"])  # fmt: skip
    out = capsys.readouterr().out
    assert "EXTRAPOLATION" in out and "best: A (hidden 64, depth 2) trained for 10000 steps" in out
    assert "num_steps=10, ensemble_size=3 (30 passes" in out
    assert "\nVERDICT: decided: A (hidden 64, depth 2) with num_steps=10, ensemble_size=3: the runner-up" in out


def _law_rows(b: float, noise: tuple) -> list[dict]:
    return [{"x": 10.0**k, "m": 2 * 10.0 ** (k * b) * e} for k, e in zip(range(1, 6), noise, strict=True)]


def test_reproduce_verdict_follows_the_sign_of_b_and_its_interval():
    from diffperc.scaling.reproduce import FAILS, HOLDS, UNSURE, judge_decreasing

    wobble = (1.0, 1.01, 0.99, 1.005, 0.995)
    assert judge_decreasing(_law_rows(-0.1, wobble), "m", "x").verdict == HOLDS
    assert judge_decreasing(_law_rows(0.1, wobble), "m", "x").verdict == FAILS
    # b = -0.001 with +-20% scatter: the interval straddles 0.
    assert judge_decreasing(_law_rows(-0.001, (1.0, 1.2, 0.8, 1.2, 0.8)), "m", "x").verdict == UNSURE
    assert judge_decreasing(_law_rows(-0.1, wobble)[:2], "m", "x").verdict == UNSURE  # too few runs


def test_reproduce_cosine_and_upcycling_rules():
    from diffperc.scaling.reproduce import FAILS, HOLDS, UNSURE, judge_cosine, judge_upcycling

    rows = [
        {"model.diffusion.beta_schedule": sched, "model.inference.num_steps": s, "m": base * s**-0.1}
        for s in (1, 2, 5, 10)
        for sched, base in (("linear", 0.3), ("squaredcos_cap_v2", 0.25 + 0.001 * s))
    ]
    assert judge_cosine(rows, "m").verdict == HOLDS  # cosine is 13-16% lower at every step count

    def upcycling_rows(errors):
        rows = [{"model.backbone.name": "t1", "model.upcycle": None, "m": 0.2}]
        return rows + [
            {"model.backbone.name": "t1", "model.upcycle.num_experts": e, "compute/total_train_macs": c, "m": m}
            for e, c, m in zip((4, 8, 16), (1e9, 2e9, 4e9), errors)
        ]

    # Dense wins by 5, 4.75 and 4.5%: the interval of the mean log-ratio is above 0, whatever the (falling) fit says.
    verdict = judge_upcycling(upcycling_rows((0.21, 0.2095, 0.209)), "m")
    assert verdict.verdict == FAILS, verdict.measured
    assert verdict.measured.startswith("mean gain over dense -4.7% [-5.4%, -4.1%] (3 runs)")  # log-mean 1 - 1.0475
    # Upcycling wins by 2.25, 2.5 and 2.75% and error falls with compute: holds.
    assert judge_upcycling(upcycling_rows((0.1955, 0.195, 0.1945)), "m").verdict == HOLDS
    # Losses of 5%, 2.5% and 1%: the t-interval over three runs (t = 4.3) straddles 0, so no verdict either way.
    assert judge_upcycling(upcycling_rows((0.21, 0.205, 0.202)), "m").verdict == UNSURE

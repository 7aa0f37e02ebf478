import json
import math

import pytest

from diffperc.scaling.laws import load_rows, main, plan

# Synthetic laws: abs_rel = 5 * C^-0.2 over training MACs (models tested with 2 passes), and, for one checkpoint
# whose network pass costs 1e6 MACs, abs_rel = 0.3 * c^-0.1 over test MACs per image.
_PER_PASS = {"A": 1e6, "B": 4e6, "C": 1.6e7}


def _train_rows() -> list[dict]:
    rows = []
    for i, (name, per_pass) in enumerate(_PER_PASS.items()):
        macs = 100 * 1e3 * per_pass  # 100 steps at 1000x the pass cost per step
        noise = (1.01, 0.99, 1.005)[i]  # a little scatter, so the fit has a band
        rows.append({
            "point": name, "status": "ok", "overrides": {"model.init_args.backbone.name": name},
            "compute/train_macs": macs, "trainer.global_step": 100,
            "model.inference.num_steps": 2, "model.inference.ensemble_size": 1,
            "compute/test_macs_per_sample": 2 * per_pass, "test/depth/abs_rel": 5 * macs**-0.2 * noise,
        })
    return rows


def _tts_rows() -> list[dict]:
    rows = []
    for steps in (1, 2, 5, 10, 20):
        for members in (1, 3):
            c = steps * members * 1e6
            rows.append({"point": f"s{steps}n{members}", "status": "ok", "model.inference.num_steps": steps,
                         "model.inference.ensemble_size": members, "compute/test_macs_per_sample": c,
                         "test/depth/abs_rel": 0.3 * c**-0.1 * (1.002 if steps % 2 else 0.998)})
    return rows


def test_plan_picks_the_model_that_affords_the_most_passes():
    # Budget 3e7 MACs/image: model A (1e6 per pass) affords 30 passes -> (10 steps, 3 members); B affords 7.5 -> 6
    # passes; C affords 1.875 -> 1 pass. Both laws fall with compute, so A with 30 passes predicts the lowest error.
    result = plan(_train_rows(), _tts_rows(), train_budget=1e13, inference_budget=3e7, metric="test/depth/abs_rel")
    best = result.best
    assert best.row["point"] == "A" and (best.num_steps, best.ensemble_size, best.passes) == (10, 3, 30)
    assert best.test_macs == pytest.approx(3e7)
    assert best.train_steps == 10_000  # 1e13 MACs / (1e11 MACs / 100 steps)
    # metric = L_T(1e13) * (30 / 2)^b_I with the fitted laws (close to 5 * 1e13^-0.2 * 15^-0.1).
    expected = float(result.train_law.predict(1e13)) * 15 ** result.test_law.b
    assert best.predicted == pytest.approx(expected, rel=1e-12)
    assert best.predicted == pytest.approx(5 * 1e13**-0.2 * 15**-0.1, rel=0.03)
    assert best.low < best.predicted < best.high
    by_model = {c.row["point"]: max(x.passes for x in result.candidates if x.row is c.row) for c in result.candidates}
    assert by_model == {"A": 30, "B": 6, "C": 1}


def test_plan_band_widens_with_extrapolation():
    near = plan(_train_rows(), _tts_rows(), 1e12, 3e7, "test/depth/abs_rel").best
    far = plan(_train_rows(), _tts_rows(), 1e18, 3e7, "test/depth/abs_rel").best
    assert math.log(far.high / far.low) > math.log(near.high / near.low)


def test_plan_rejects_a_budget_below_one_pass():
    with pytest.raises(ValueError, match=r"`--inference_budget` 5e\+05 MACs/image is below one network pass"):
        plan(_train_rows(), _tts_rows(), 1e13, 5e5, "test/depth/abs_rel")


def test_laws_plan_cli_prints_the_plan(tmp_path, capsys):
    for name, rows in (("train", _train_rows()), ("tts", _tts_rows())):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn')
    assert len(load_rows(tmp_path / "train")) == 3
    main(["plan", "--train_report", str(tmp_path / "train"), "--tts_report", str(tmp_path / "tts"),
          "--train_budget", "1e13", "--inference_budget", "3e7"])
    out = capsys.readouterr().out
    assert "EXTRAPOLATION" in out and "model.init_args.backbone.name=A" in out
    assert "num_steps=10, ensemble_size=3 (30 passes" in out


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

    rows = [{"model.diffusion.beta_schedule": sched, "model.inference.num_steps": s, "m": base * s**-0.1}
            for s in (1, 2, 5, 10) for sched, base in (("linear", 0.3), ("squaredcos_cap_v2", 0.25 + 0.001 * s))]
    assert judge_cosine(rows, "m").verdict == HOLDS  # cosine is 13-16% lower at every step count
    def upcycling_rows(errors):
        rows = [{"model.backbone.name": "t1", "model.upcycle": None, "m": 0.2}]
        return rows + [{"model.backbone.name": "t1", "model.upcycle.num_experts": e, "compute/total_train_macs": c,
                        "m": m} for e, c, m in zip((4, 8, 16), (1e9, 2e9, 4e9), errors)]

    # Dense wins by 5, 4.75 and 4.5%: the interval of the mean log-ratio is above 0, whatever the (falling) fit says.
    verdict = judge_upcycling(upcycling_rows((0.21, 0.2095, 0.209)), "m")
    assert verdict.verdict == FAILS, verdict.measured
    assert verdict.measured.startswith("mean gain over dense -4.7% [-5.4%, -4.1%] (3 runs)")  # log-mean 1 - 1.0475
    # Upcycling wins by 2.25, 2.5 and 2.75% and error falls with compute: holds.
    assert judge_upcycling(upcycling_rows((0.1955, 0.195, 0.1945)), "m").verdict == HOLDS
    # Losses of 5%, 2.5% and 1%: the t-interval over three runs (t = 4.3) straddles 0, so no verdict either way.
    assert judge_upcycling(upcycling_rows((0.21, 0.205, 0.202)), "m").verdict == UNSURE

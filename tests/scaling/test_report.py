import csv

import numpy as np
import pytest

from diffperc.scaling import fit_power_law, plot_fit, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sweep_rows():
    """Six runs on abs_rel = 0.23 * MACs^-0.0098 and loss = 2 + 5e3 * MACs^-0.2; t3 lacks abs_rel, t5 has a nan loss."""
    macs = np.geomspace(1e15, 1e19, 6)
    rows = [
        {
            "point": f"t{i + 1}",
            "train_macs": float(c),
            "val/depth/abs_rel": 0.23 * float(c) ** -0.0098,
            "loss": 2 + 5e3 * float(c) ** -0.2,
        }
        for i, c in enumerate(macs)
    ]
    del rows[2]["val/depth/abs_rel"]  # t3 crashed before validation
    rows[4]["loss"] = float("nan")
    rows[5]["seed"] = 1  # a key only one row has
    rows[5]["const"] = rows[4]["const"] = rows[3]["const"] = rows[0]["const"] = 0.5
    return rows


def test_write_report_writes_table_csv_and_pngs(tmp_path):
    rows = _sweep_rows()
    out = tmp_path / "report"
    spec = [("train_macs", "val/depth/abs_rel", False), ("train_macs", "loss", True), ("train_macs", "const", True)]
    path = write_report(rows, spec, out)

    assert path == out / "report.md"
    text = path.read_text()
    # 5 usable rows on an exact law -> a, b recovered, n = 5; t3 is skipped with a note
    assert "| `val/depth/abs_rel` | `train_macs` | 0.23 | -0.0098 | [-0.0098, -0.0098] |  | 1 | 5 |" in text
    assert "- row 2 (point=t3): missing `val/depth/abs_rel`" in text
    # the offset law on loss from 6 - 1 (nan) = 5 rows: x^b spans 4 decades so e, a, b are all recovered
    assert "| `loss` | `train_macs` | 5000 | -0.2 | [-0.2, -0.2] | 2 | 1 | 5 |" in text
    assert "- row 4 (point=t5): bad value `loss` = nan" in text
    # a constant metric cannot take an offset law: reported, not raised, and no PNG
    assert "| `const` | `train_macs` | not fitted: `y` is constant," in text
    assert "- row 1 (point=t2): missing `const`" in text
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["fit_00_val_depth_abs_rel_vs_train_macs.png", "fit_01_loss_vs_train_macs_offset.png"]
    assert f"![val/depth/abs_rel vs train_macs]({pngs[0]})" in text
    assert (out / pngs[0]).read_bytes()[:8] == PNG_MAGIC

    with open(out / "rows.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["point", "train_macs", "val/depth/abs_rel", "loss", "const", "seed"]
    assert len(table) == 7
    assert table[3][:3] == ["t3", repr(float(np.geomspace(1e15, 1e19, 6)[2])), ""]
    assert table[6][5] == "1" and table[1][5] == "" and table[1][4] == "0.5" and table[5][3] == "nan"
    # atomic writes leave no temporary files behind
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.md", "rows.csv", *pngs])


def test_write_report_reports_fit_that_cannot_be_made(tmp_path):
    rows = [{"point": "a", "x": 1.0, "y": 2.0}, {"point": "b", "x": 10.0, "y": 1.0}, {"point": "c", "x": 100.0}]
    path = write_report(rows, [("x", "y", False)], tmp_path)
    text = path.read_text()
    assert (
        "| `y` | `x` | not fitted: `x` and `y` need at least 3 points with offset=False; got 2 | | | | | 2 | |" in text
    )
    assert "- row 2 (point=c): missing `y`" in text
    assert not list(tmp_path.glob("*.png"))


def test_write_report_skips_non_positive_value_without_offset(tmp_path):
    x = [1.0, 10.0, 100.0, 1000.0]
    rows = [{"x": xi, "y": 3.0 * xi**-0.5} for xi in x] + [{"x": 1e4, "y": 0.0}, {"x": 1e5, "y": "n/a"}]
    text = write_report(rows, [("x", "y", False)], tmp_path).read_text()
    assert "- row 4: bad value `y` = 0.0" in text
    assert "- row 5: bad value `y` = 'n/a'" in text
    assert "| `y` | `x` | 3 | -0.5 |" in text and "| 4 |" in text


def test_plot_fit_writes_png_atomically(tmp_path):
    x = np.geomspace(1.0, 1e4, 8)
    y = 0.1 + 2 * x**-0.5
    fit = fit_power_law(x, y, offset=True)
    path = plot_fit(x, y, fit, tmp_path / "sub" / "loss.png", xlabel="MACs", ylabel="loss")
    assert path == tmp_path / "sub" / "loss.png"
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in path.parent.iterdir()] == ["loss.png"]


def test_write_report_rejects_malformed_spec(tmp_path):
    with pytest.raises(ValueError, match=r"`fits_spec\[0\]`"):
        write_report([{"x": 1.0}], [("x", "y")], tmp_path)


def test_plot_groups_overlays_groups_on_log_axes(tmp_path):
    from matplotlib import image

    from diffperc.scaling.fit import fit_power_law
    from diffperc.scaling.plots import plot_groups

    x = np.array([1e9, 1e10, 1e11, 1e12])
    small, large = 0.5 * x**-0.05, 0.4 * x**-0.07
    series = [("size=S", x, small, fit_power_law(x, small)), ("size=L", x, large, fit_power_law(x, large)),
              ("size=XL", x[:1], large[:1], None)]  # one point: drawn, not fitted
    path = plot_groups(series, tmp_path / "groups.png", xlabel="training MACs", ylabel="AbsRel")
    pixels = image.imread(path)
    assert pixels.shape[:2] == (420, 600) and not list(tmp_path.glob(".*"))  # 6 x 4.2 in at 100 dpi, no temp file
    # Both fitted laws recover their exponents, so the lines drawn are the true ones.
    assert [round(s[3].b, 6) for s in series[:2]] == [-0.05, -0.07]


def test_sweep_report_overlays_its_groups_in_one_figure_linked_from_the_report(tmp_path):
    import json

    from diffperc.scaling.spec import expand, parse_sweep
    from diffperc.scaling.sweep import report

    base = tmp_path / "base.yaml"
    base.write_text("model: {}\n")
    sweep = parse_sweep({
        "base": str(base), "x": "compute/train_macs", "metrics": ["test/depth/abs_rel"],
        "grid": {"model.backbone.name": ["t1", "t2"], "trainer.max_steps": [10, 100, 1000]},
        "group_by": ["model.backbone.name"],
    })
    out = tmp_path / "sweep"
    _, points = expand(sweep, out)
    rows = []
    for point in points:  # ok rows as a finished sweep holds them: AbsRel falls as a power of the MACs per size
        steps, size = point.overrides["trainer.max_steps"], point.overrides["model.backbone.name"]
        macs = steps * (1e9 if size == "t1" else 4e9)
        rows.append({"point": point.id, "status": "ok", **point.overrides, "compute/train_macs": macs,
                     "test/depth/abs_rel": (0.9 if size == "t1" else 0.7) * macs**-0.05})
    out.mkdir(parents=True)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = report(sweep, out, echo=lambda *_: None).read_text()
    figure = "groups_00_test_depth_abs_rel_vs_compute_train_macs.png"
    assert "](" + figure + ")" in text and (out / "report" / figure).is_file()
    assert sorted(p.name for p in (out / "report").iterdir() if p.is_dir()) == ["name-t1", "name-t2"]

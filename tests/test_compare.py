"""`tierquant compare` from `dvc exp show --json`-shaped data: names, columns, widths."""

from __future__ import annotations

import copy
import csv
import io
import json

import pytest

from tests.conftest import REPO
from tierquant.config import compose
from tierquant.report.compare import (
    SORT_KEYS,
    budget_label,
    change_name,
    experiment_rows,
    original_line,
    recipe_default_tiers,
    render_csv,
    render_markdown,
    render_table,
    sort_rows,
)
from tierquant.report.headline import COLUMNS

BASE = compose([])  # main's params (params.yaml's composition)
RECIPE_TIERS = recipe_default_tiers(REPO / "conf")


def _params(*overrides: str) -> dict:
    return compose(list(overrides))


def _data(params: dict, **metrics) -> dict:
    """One rev's `data` as `dvc exp show --json` gives it (DVC 3.67)."""
    quality = {k: metrics[k] for k in ("passed", "bpw", "GiB", "kld_mean", "top1") if k in metrics}
    model = {
        k: metrics[k] for k in ("gen_tok_s", "prefill_tok_s", "peak_memory_gib") if k in metrics
    }
    return {
        "rev": "x",
        "params": {"params.yaml": {"data": params}},
        "metrics": {
            "metrics/headline/quality.json": {"data": quality},
            "metrics/headline/model.json": {"data": model},
            "metrics/headline/original.json": {
                "data": {
                    "orig_gen_tok_s": 164.81,
                    "orig_prefill_tok_s": 350.75,
                    "orig_peak_memory_gib": 0.0068,
                }
            },
        },
    }


def _m(bpw, kld, top1, passed=True):
    return dict(
        passed=passed,
        bpw=bpw,
        GiB=0.0016,
        kld_mean=kld,
        top1=top1,
        gen_tok_s=84.89,
        prefill_tok_s=101.48,
        peak_memory_gib=0.0063,
    )


EXPERIMENTS = [
    ("experts=4", ["tiers.experts=4"], _m(4.77, 0.41, 0.57)),
    ("mixed_3_6", ["recipe=mixed_3_6"], _m(3.99, 1.02, 0.38)),
    ("attention=6 experts=4", ["tiers.attention=6", "tiers.experts=4"], _m(4.81, 0.39, 0.58)),
    ("auto 3.3 bpw", ["recipe=auto", "budget.bits_per_weight=3.3"], _m(3.29, 0.9, 0.45)),
    ("mixed_3_6 router=8", ["recipe=mixed_3_6", "tiers.router=8"], _m(4.0, 1.0, 0.39)),
    (
        "auto 4.0 bpw router=8",
        ["recipe=auto", "budget.bits_per_weight=4.0", "budget.router=8"],
        _m(3.99, 0.5, 0.53),
    ),
    (
        "auto fit 64 GiB@32768",
        ["recipe=auto", "budget.fit.memory_gib=64", "budget.fit.context=32768"],
        _m(7.0, 0.02, 0.9),
    ),
    (
        "experts=2 no gate",
        ["tiers.experts=2"]
        + [
            f"validate.{k}=null"
            for k in ("kld_mean_max", "kld_p99_max", "top1_min", "ppl_ratio_max")
        ],
        _m(3.0, 1.3, 0.3, passed=False),
    ),
    ("group_size=32", ["quant.group_size=32"], _m(4.6, 0.5, 0.52)),
    ("as main", [], _m(4.3441, 0.5878, 0.5148)),
]


def _exp_show() -> list[dict]:
    return json.loads(
        json.dumps(
            [
                {
                    "rev": "workspace",
                    "name": None,
                    "data": _data(_params("tiers.experts=4"), **_m(4.77, 0.41, 0.57)),
                    "error": None,
                    "experiments": None,
                },
                {
                    "rev": "6dface91aa",
                    "name": "main",
                    "data": _data(BASE, **_m(4.3441, 0.5878, 0.5148)),
                    "error": None,
                    "experiments": [
                        {
                            "name": f"exp-{i}",
                            "executor": None,
                            "revs": [{"rev": f"d{i}", "data": _data(_params(*ov), **metrics)}],
                        }
                        for i, (_, ov, metrics) in enumerate(EXPERIMENTS)
                    ]
                    + [
                        {
                            "name": "queued-one",
                            "executor": {"state": "queued"},
                            "revs": [{"rev": "q1", "data": _data(_params("tiers.experts=5"))}],
                        }
                    ],
                },
            ]
        )
    )


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return experiment_rows(_exp_show(), recipe_tiers=RECIPE_TIERS)


def test_names_say_what_each_experiment_changed(rows):
    names = [r["name"] for r in rows]
    assert names[:2] == ["workspace: experts=4", "main"]
    assert names[2:-1] == [name for name, _, _ in EXPERIMENTS]
    assert names[-1] == "experts=5" and rows[-1]["passed"] == "queued"
    assert [r["experiment"] for r in rows[:3]] == ["workspace", "main", "exp-0"]


def test_table_at_120_columns_has_the_headline_and_readable_names(rows):
    table = render_table(rows, width=120)
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 120, table
    header = lines[0].split()
    for column in (*COLUMNS, "name", "experiment"):
        assert column in header, (column, lines[0])
    for line, (name, _, _) in zip(lines[3:], EXPERIMENTS, strict=False):
        assert line.startswith(name[:20]), (line, name)
    by_name = {r["name"]: line for r, line in zip(rows, lines[1:], strict=True)}
    assert "NO" in by_name["experts=2 no gate"].split()
    assert "0.4100" in by_name["experts=4"] and "84.9" in by_name["experts=4"]
    assert "0.0063" in by_name["experts=4"]  # peak_memory_gib
    # narrower: the name is cut with an ellipsis, the metrics stay
    narrow = render_table(rows, width=105).splitlines()
    assert max(len(line) for line in narrow) <= 105
    assert any("…" in line for line in narrow) and "peak_memory_gib" in narrow[0]


def test_wide_adds_tiers_and_budget(rows):
    header = render_table(rows, width=300, wide=True).splitlines()[0].split()
    assert header[-2:] == ["tiers", "budget"]
    table = render_table(rows, width=300, wide=True)
    assert "control=bf16 sensitive=6 attention=4 experts=4" in table
    assert "3.3 bpw" in table and "hand recipe" in table


def test_csv_and_markdown_keep_every_name_whole(rows):
    parsed = list(csv.DictReader(io.StringIO(render_csv(rows, wide=True))))
    assert [p["name"] for p in parsed] == [r["name"] for r in rows]
    assert parsed[2]["kld_mean"] == "0.41" and parsed[-1]["kld_mean"] == ""
    md = render_markdown(rows).splitlines()
    assert md[0].startswith("| name | bpw |") and md[1].startswith("|---|---:|")
    assert len(md) == len(rows) + 2 and "| auto fit 64 GiB@32768 |" in md[-5]


def test_sort_puts_missing_values_last(rows):
    by_kld = sort_rows(rows, key="kld_mean")
    klds = [r["kld_mean"] for r in by_kld]
    assert klds[:-1] == sorted(klds[:-1]) and klds[-1] is None
    assert sort_rows(rows, key="top1", reverse=True)[0]["top1"] == 0.9
    assert "kld_mean" in SORT_KEYS


def test_original_line(rows):
    assert original_line(rows) == (
        "original (workspace): gen_tok_s 164.8, prefill_tok_s 350.8, peak_memory_gib 0.0068"
    )
    assert original_line([]) == "original: not benchmarked"


def test_change_name_details():
    assert change_name(params=BASE, base=BASE) == ""
    other = copy.deepcopy(BASE)
    other["recipe"]["edge_layers"] = "1/8"
    assert change_name(params=other, base=BASE) == "recipe edited"
    # without the recipes' default tiers a recipe change names the recipe only
    assert change_name(params=_params("recipe=mixed_3_6"), base=BASE) == "mixed_3_6"
    assert budget_label({"gib": 40}) == "40 GiB"
    assert budget_label({"fit": {"memory_gib": 64, "context": 4096, "wired_limit": "default"}}) == (
        "fit 64 GiB@4096 default"
    )

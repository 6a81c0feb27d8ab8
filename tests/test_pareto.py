"""The sweep's points from `dvc exp show --json`, and where a model sits among them."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from tierquant.errors import TierquantError
from tierquant.report.pareto import HEADLINE_QUALITY, curve_position, sweep_points, write_sweep


def _data(recipe: str, bpw: float, kld: float, budget: dict | None = None) -> dict:
    """One rev's `data` as `dvc exp show --json` gives it (DVC 3.x shape)."""
    params = {"recipe": {"name": recipe}, "budget": budget or {"bits_per_weight": None}}
    return {
        "rev": "x",
        "params": {"params.yaml": {"data": params}},
        "metrics": {HEADLINE_QUALITY: {"data": {"bpw": bpw, "kld_mean": kld, "top1": 0.5}}},
    }


EXP_SHOW = [
    {
        "rev": "workspace",
        "name": None,
        "data": _data("seed", 4.3441, 0.6415),
        "error": None,
        "experiments": None,
    },
    {
        "rev": "6dface91aa",
        "name": "main",
        "data": _data("seed", 4.3441, 0.6415),  # the same point as the workspace: once
        "experiments": [
            {
                "name": "auto-3",
                "revs": [{"rev": "d1", "data": _data("auto", 2.99, 1.9, {"bits_per_weight": 3.0})}],
            },
            {"name": "mixed", "revs": [{"rev": "d2", "data": _data("mixed_3_6", 3.9868, 1.1238)}]},
            {"name": "failed", "revs": [{"rev": "d3", "data": {"rev": "d3"}}]},  # no metrics
        ],
    },
]


def test_sweep_points_from_exp_show():
    points = sweep_points(json.loads(json.dumps(EXP_SHOW)))
    assert [(p["name"], p["recipe"], p["budget"]) for p in points] == [
        ("auto-3", "auto", "3.0 bpw"),
        ("mixed", "mixed_3_6", "hand recipe"),
        ("workspace", "seed", "hand recipe"),
    ]
    assert [p["bits_per_weight"] for p in points] == sorted(p["bits_per_weight"] for p in points)


def test_no_points_is_an_error_and_writes_nothing(tmp_path):
    out = tmp_path / "sweep.json"
    with pytest.raises(TierquantError, match="run the sweep first"):
        write_sweep([{"rev": "workspace", "data": {}, "experiments": None}], out)
    assert not out.exists()


@pytest.mark.parametrize("seed", range(5))
def test_curve_position_against_brute_force(seed):
    """On the front iff no point is at least as small and strictly better: checked by
    brute force over every pair of a random sweep."""
    rng = random.Random(seed)
    points = [
        {
            "name": str(i),
            "bits_per_weight": rng.choice([3.0, 3.5, 4.0, 4.5]),
            "kld_mean": rng.choice([0.1, 0.2, 0.3, 0.5]),
        }
        for i in range(8)
    ]
    front = {
        p["name"]
        for p in points
        if not any(
            q["bits_per_weight"] <= p["bits_per_weight"] and q["kld_mean"] < p["kld_mean"]
            for q in points
        )
    }
    for p, q in itertools.product(points, points):
        where = curve_position(points, p["bits_per_weight"], p["kld_mean"])
        assert where["on_front"] == (p["name"] in front)
        beats = q["bits_per_weight"] >= p["bits_per_weight"] and q["kld_mean"] > p["kld_mean"]
        assert (q in where["beats"]) == beats

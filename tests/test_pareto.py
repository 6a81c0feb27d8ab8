"""The sweep's points from `dvc exp show --json`, named by what each changed; its table,
charts and queue handling (tierquant.report.sweep, without DVC: tests/test_sweep.py runs
it for real); where a model sits on the curve (tierquant.report.pareto)."""

from __future__ import annotations

import itertools
import json
import random
import subprocess

import pytest

from tierquant.errors import TierquantError
from tierquant.report.pareto import curve_position, front
from tierquant.report.sweep import (
    HEADLINE_QUALITY,
    NO_GATE,
    check_planned,
    plan_sweep,
    queue_status,
    queue_workers,
    render_table,
    run_sweep,
    sweep_points,
    write_sweep,
)

GATE = {"kld_mean_max": 0.065, "kld_p99_max": 0.47, "top1_min": 0.8, "ppl_ratio_max": 1.07}
NOGATE = dict.fromkeys(GATE)


def _data(
    recipe: str,
    bpw: float,
    kld: float,
    budget: dict | None = None,
    *,
    gate: dict | None = None,
    tiers: dict | None = None,
) -> dict:
    """One rev's `data` as `dvc exp show --json` gives it (DVC 3.x shape)."""
    params = {
        "recipe": {"name": recipe},
        "budget": budget or {"bits_per_weight": None},
        "validate": gate if gate is not None else GATE,
        "tiers": tiers or {},
    }
    return {
        "rev": "x",
        "params": {"params.yaml": {"data": params}},
        "metrics": {HEADLINE_QUALITY: {"data": {"bpw": bpw, "kld_mean": kld, "top1": 0.5}}},
    }


SEED_TIERS = {"control": "bf16", "sensitive": 6, "attention": 4, "experts": 3}
RECIPE_TIERS = {"seed": SEED_TIERS, "mixed_3_6": {"experts": 3}, "auto": {}}


def _exp(name: str, data: dict) -> dict:
    return {"name": name, "revs": [{"rev": name[:2], "data": data}]}


# A sweep on main (the seed recipe, gated): two budgets, both hand recipes ungated, an
# experts=4 run, and a failed one; the workspace is main's model.
EXP_SHOW = [
    {
        "rev": "workspace",
        "name": None,
        "data": _data("seed", 4.3441, 0.0190, tiers=SEED_TIERS),
        "error": None,
        "experiments": None,
    },
    {
        "rev": "6dface91aa",
        "name": "main",
        "data": _data("seed", 4.3441, 0.0190, tiers=SEED_TIERS),
        "experiments": [
            _exp("rathe-trug", _data("auto", 2.99, 0.19, {"bits_per_weight": 3.0}, gate=NOGATE)),
            _exp("bumpy-tops", _data("auto", 3.98, 0.05, {"bits_per_weight": 4.0}, gate=NOGATE)),
            _exp("mixed-one", _data("mixed_3_6", 3.9868, 0.036, gate=NOGATE)),
            # the seed recipe ungated: main's own model, one point named as the experiment
            _exp("seedy-seed", _data("seed", 4.3441, 0.0190, gate=NOGATE, tiers=SEED_TIERS)),
            _exp("four-bits", _data("seed", 4.8, 0.012, tiers={**SEED_TIERS, "experts": 4})),
            {"name": "no-metrics", "revs": [{"rev": "d3", "data": {"rev": "d3"}}]},
            # a failed one: DVC shows it with the metrics of the workspace it was queued from
            {
                **_exp("failed-one", _data("auto", 2.99, 0.19, {"bits_per_weight": 1.2})),
                "executor": {"state": "failed"},
            },
        ],
    },
]


def test_sweep_points_are_named_by_what_they_changed():
    points = sweep_points(json.loads(json.dumps(EXP_SHOW)), recipe_tiers=RECIPE_TIERS)
    assert [(p["name"], p["experiment"]) for p in points] == [
        ("auto 3.0 bpw", "rathe-trug"),
        ("auto 4.0 bpw", "bumpy-tops"),
        ("mixed_3_6", "mixed-one"),
        ("seed", "seedy-seed"),
        ("seed experts=4", "four-bits"),
    ]
    assert [p["bits_per_weight"] for p in points] == sorted(p["bits_per_weight"] for p in points)
    assert points[0]["budget"] == "3.0 bpw" and points[2]["budget"] == "hand recipe"


def test_equal_names_get_dvc_s_name():
    show = json.loads(json.dumps(EXP_SHOW))
    show[1]["experiments"].append(_exp("again-seed", _data("seed", 4.3441, 0.02, gate=NOGATE)))
    names = [p["name"] for p in sweep_points(show, recipe_tiers=RECIPE_TIERS)]
    assert "seed (seedy-seed)" in names and "seed (again-seed)" in names


def test_table_and_charts(tmp_path):
    points = sweep_points(json.loads(json.dumps(EXP_SHOW)), recipe_tiers=RECIPE_TIERS)
    table = render_table(points)
    lines = table.splitlines()
    assert lines[0].startswith("| point | bits/weight |")
    row = next(line for line in lines if line.startswith("| auto 3.0 bpw |"))
    assert "| 2.9900 |" in row and "| 0.1900 |" in row and "`rathe-trug`" in row
    assert [p["name"] for p in front(points)] == [
        "auto 3.0 bpw",
        "auto 4.0 bpw",
        "mixed_3_6",
        "seed",
        "seed experts=4",
    ]
    written = write_sweep(points, tmp_path)
    assert [p.name for p in written] == ["points.json", "table.md", "kld.png", "top1.png"]
    assert json.loads((tmp_path / "points.json").read_text()) == points
    for png in ("kld.png", "top1.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    again = tmp_path / "again"
    write_sweep(points, again)  # offline and deterministic: the same points, the same bytes
    assert (again / "kld.png").read_bytes() == (tmp_path / "kld.png").read_bytes()


def test_no_points_is_an_error_and_writes_nothing(tmp_path):
    out = tmp_path / "sweep.json"
    with pytest.raises(TierquantError, match="run the sweep first"):
        write_sweep(sweep_points([{"rev": "workspace", "data": {}, "experiments": None}]), out)
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


def test_plan_sweep_switches_the_gate_off():
    planned = plan_sweep([3.0, 3.557], ["seed"], ["model=tiny"])
    assert [p.label for p in planned] == [
        "auto 3.0 bpw model=tiny",
        "auto 3.557 bpw model=tiny",
        "seed model=tiny",
    ]
    assert planned[1].overrides == (
        "recipe=auto",
        "budget.bits_per_weight=3.557",
        *NO_GATE,
        "model=tiny",
    )
    assert all(f"validate.{k}=null" in NO_GATE for k in GATE)
    from tierquant.config import compose, validate

    def check(overrides):
        validate(compose(overrides))

    with pytest.raises(TierquantError, match=r"auto 0.5 bpw: .*budget.bits_per_weight"):
        check_planned(plan_sweep([0.5], []), check)  # out of range: refused before queueing
    with pytest.raises(TierquantError, match="mixed_3_6 quant.no_such_key=1: .*no_such_key"):
        check_planned(plan_sweep([], ["mixed_3_6"], ["quant.no_such_key=1"]), check)
    with pytest.raises(TierquantError, match="nothing to sweep"):
        plan_sweep([], [])


QUEUE_STATUS = """\
Task     Name         Created    Status
4a5c2e1  rathe-trug   09:12 PM   Success
b0f3d22  bumpy-tops   09:12 PM   Failed
c1d2e3f  mixed-one    09:13 PM   Running
d4e5f60  other        Dec 01     Queued

Worker status: 1 active, 0 idle
"""


def test_queue_status_parses_dvc_s_table():
    assert queue_status(QUEUE_STATUS) == {
        "rathe-trug": "Success",
        "bumpy-tops": "Failed",
        "mixed-one": "Running",
        "other": "Queued",
    }
    assert queue_status("No experiment tasks in the queue.\n\nWorker status: 0 active") == {}
    assert queue_workers(QUEUE_STATUS) == 1 and queue_workers("") is None


def _one_experiment_queue(status_at_poll):
    """(dvc, clock, sleep) for run_sweep: a queue holding one experiment, 'one-exp', whose
    status at the n-th `dvc queue status` (from 1) is `status_at_poll(n)`, with no worker
    counted; each sleep advances the clock 30 s."""
    now, polls = [0.0], [0]

    def dvc(cmd):
        out = ""
        if cmd[:3] == ["exp", "run", "--queue"]:
            out = "Queued experiment 'one-exp' for future execution.\n"
        elif cmd[:2] == ["queue", "status"]:
            polls[0] += 1
            status = status_at_poll(polls[0])
            out = f"Task  Name  Created  Status\nabc  one-exp  09:12 PM  {status}\n\n"
            out += "Worker status: 0 active, 0 idle\n"
        return subprocess.CompletedProcess(cmd, 0, out, "")

    def sleep(s):
        now[0] += 30

    return dvc, (lambda: now[0]), sleep


def test_run_sweep_gives_up_when_no_worker_runs():
    """Workers stopped (`dvc queue stop`) with tasks queued: an error, not a wait forever."""
    dvc, clock, sleep = _one_experiment_queue(lambda _n: "Queued")
    with pytest.raises(TierquantError, match="no queue worker has run for 120 s with 1 of"):
        run_sweep(plan_sweep([], ["seed"]), dvc=dvc, log=lambda _: None, clock=clock, sleep=sleep)


def test_run_sweep_waits_for_its_own_tasks_and_reports_failures():
    """A fake `dvc`: two tasks queued; the status table moves on at each poll; a task
    of another sweep that stays Queued is not waited for."""
    planned = plan_sweep([3.0], ["seed"])
    names = iter(["rathe-trug", "seedy-seed"])
    polls = [
        {"rathe-trug": "Queued", "seedy-seed": "Queued"},
        {"rathe-trug": "Running", "seedy-seed": "Queued"},
        {"rathe-trug": "Success", "seedy-seed": "Running"},
        {"rathe-trug": "Success", "seedy-seed": "Failed"},
    ]
    calls = []

    def dvc(cmd):
        calls.append(cmd)
        out = ""
        if cmd[:3] == ["exp", "run", "--queue"]:
            out = f"Queued experiment '{next(names)}' for future execution.\n"
        elif cmd[:2] == ["queue", "status"]:
            rows = {**polls.pop(0), "other": "Queued"}
            out = "Task  Name  Created  Status\n" + "".join(
                f"abc  {n}  09:12 PM  {s}\n" for n, s in rows.items()
            )
        return subprocess.CompletedProcess(cmd, 0, out, "")

    logs = []
    run = run_sweep(planned, dvc=dvc, jobs=2, poll_s=0, log=logs.append, sleep=lambda s: None)
    assert list(run.queued) == ["rathe-trug", "seedy-seed"] and run.failed == ["seedy-seed"]
    assert ["queue", "start", "-j", "2"] in calls and not polls
    assert any("1/2 done (0 failed); running: seed (seedy-seed)" in line for line in logs)
    assert logs[-1].endswith("2/2 done (1 failed); running: none")
    queued = [c for c in calls if c[:3] == ["exp", "run", "--queue"]]
    assert queued[0][3:] == [x for o in planned[0].overrides for x in ("-S", o)]


def test_a_queue_refusal_is_an_error():
    def dvc(cmd):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: unexpected error - bad override")

    with pytest.raises(TierquantError, match="auto 3.0 bpw.*bad override"):
        run_sweep(plan_sweep([3.0], []), dvc=dvc, log=lambda _: None)


def test_run_sweep_waits_while_an_experiment_runs_though_no_worker_is_counted():
    """celery's inspect can miss a busy worker (0 counted) while the queue's own files
    say our experiment is Running: the sweep waits for it instead of giving up."""
    # Running for 10 minutes at 30 s a poll, then done
    dvc, clock, sleep = _one_experiment_queue(lambda n: "Running" if n < 20 else "Success")
    run = run_sweep(plan_sweep([], ["seed"]), dvc=dvc, log=lambda _: None, clock=clock, sleep=sleep)
    assert run.status == {"one-exp": "Success"} and clock() > 120

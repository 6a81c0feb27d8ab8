"""The allocator against brute force, budgets, and recipe=auto's plan on real shapes."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from tests.headers import real_spec, write_header_only_checkpoint
from tierquant.config import compose, validate
from tierquant.core.gptoss import shape_of_checkpoint
from tierquant.errors import TierquantError
from tierquant.plan import allocate, footprint
from tierquant.plan.budget import BudgetRequest, FitRequest, check_budget, resolve_budget
from tierquant.plan.footprint import MemoryModel
from tierquant.quality.damage import allocation_groups


def brute_force(options, max_bytes, min_bytes=None):
    """(least damage, bytes) over every choice with min_bytes <= bytes <= max_bytes."""
    best = None
    for choice in itertools.product(*(range(len(o)) for o in options)):
        b = sum(options[g][k][0] for g, k in enumerate(choice))
        d = sum(options[g][k][1] for g, k in enumerate(choice))
        if b > max_bytes or (min_bytes is not None and b < min_bytes):
            continue
        if best is None or d < best[0] - 1e-12:
            best = (d, b)
    return best


def instance(rng: random.Random, groups: int = 6, choices: int = 4):
    options = []
    for _ in range(groups):
        size = rng.randint(50, 400)
        bits = sorted(rng.sample(range(2, 9), choices))
        scale = rng.uniform(0.1, 2.0)
        options.append([(size * b, scale * 2.0 ** (-b) + rng.uniform(0, 0.01)) for b in bits])
    return options


@pytest.mark.parametrize("seed", range(12))
def test_exact_dp_equals_brute_force(seed):
    rng = random.Random(seed)
    options = instance(rng)
    lo = sum(min(b for b, _ in o) for o in options)
    hi = sum(max(b for b, _ in o) for o in options)
    budget = rng.randint(lo, hi)
    sol = allocate.solve(options, budget, resolution=1)
    want = brute_force(options, budget)
    assert sol.nbytes <= budget
    assert sol.damage == pytest.approx(want[0], abs=1e-12)
    # with a lower bound too (a bits-per-weight budget's tolerance)
    floor = budget - (hi - lo) // 10
    want = brute_force(options, budget, floor)
    if want is None:
        with pytest.raises(TierquantError):
            allocate.solve(options, budget, min_bytes=floor, resolution=1)
    else:
        sol = allocate.solve(options, budget, min_bytes=floor, resolution=1)
        assert floor <= sol.nbytes <= budget
        assert sol.damage == pytest.approx(want[0], abs=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_rounded_dp_never_exceeds_and_is_within_its_proven_gap(seed):
    """Coarse units: the size stays within budget, and the damage lies between the exact
    optimum at B and the exact optimum at B − G·(r − 1) (tierquant.plan.allocate's bound)."""
    rng = random.Random(100 + seed)
    options = instance(rng)
    lo = sum(min(b for b, _ in o) for o in options)
    hi = sum(max(b for b, _ in o) for o in options)
    budget = rng.randint(lo + (hi - lo) // 4, hi)
    r = rng.choice([7, 50, 128])
    sol = allocate.solve(options, budget, resolution=r)
    assert sol.nbytes <= budget
    exact = brute_force(options, budget)[0]
    shrunk = brute_force(options, budget - len(options) * (r - 1))
    assert sol.damage >= exact - 1e-12
    if shrunk is not None:
        assert sol.damage <= shrunk[0] + 1e-12
    print(f"r={r}: gap to brute force {sol.damage - exact:.3g}")


def test_no_fit_is_an_error_naming_the_budget():
    options = [[(100, 1.0), (200, 0.5)], [(100, 1.0), (300, 0.1)]]
    with pytest.raises(TierquantError, match="smallest candidates take 200"):
        allocate.solve(options, 150)


def test_groups_cover_the_matrices_once():
    from tierquant.core.gptoss import GptOssShape
    from tierquant.source.synthetic import config_json

    spec = validate(compose()).model.synthetic
    shape = GptOssShape.from_config(config_json(spec))
    groups, fixed = allocation_groups(shape)
    assert len(groups) == 4 * shape.num_hidden_layers + 2
    names = [w.name for g in groups for w in g.weights] + [w.name for w in fixed]
    assert len(names) == len(set(names))
    assert {w.kind for w in fixed} == {"norm", "bias", "sinks", "router"}


def _fit_budget(memory, context, rule):
    return BudgetRequest(fit=FitRequest(memory_gib=memory, context=context, wired_limit=rule))


@pytest.fixture(scope="module")
def gpt_oss_120b(tmp_path_factory) -> Path:
    return write_header_only_checkpoint(
        tmp_path_factory.mktemp("h") / "gpt-oss-120b", real_spec("gpt-oss-120b")
    )


def _fake_measure(out: Path, original: Path, group_size: int = 64) -> Path:
    """A damage table shaped like the measure stage's, damage 4^-bits × size (no model
    run: these tests are about the budget arithmetic on real shapes)."""
    from tierquant.core.precision import parse_precision
    from tierquant.quality.damage import DAMAGE, MEASURE_FORMAT

    shape = shape_of_checkpoint(original)
    groups, _ = allocation_groups(shape)
    cands = [2, 3, 4, 5, 6, 8, "mxfp4"]
    table = {}
    for g in groups:
        n = sum(w.numel for w in g.weights)
        dmg = {}
        for c in cands:
            p = parse_precision(c, "x", group_size)
            if g.allows(p):
                dmg[p.label] = 0.0 if p.mode == "mxfp4" else n * 4.0 ** (-p.bits) / 1e9
        table[g.name] = {"kind": g.kind, "layer": g.layer, "damage": dmg}
    out.mkdir(parents=True, exist_ok=True)
    (out / DAMAGE).write_text(
        json.dumps(
            {
                "format": MEASURE_FORMAT,
                "group_size": group_size,
                "candidates": cands,
                "groups": table,
            }
        )
    )
    return out


def test_fit_64gib_32k_on_gpt_oss_120b_fits_the_raised_limit(gpt_oss_120b, tmp_path):
    from tierquant.plan.autoplan import auto_plan
    from tierquant.plan.predict import predict

    cfg = validate(compose(["model=gpt-oss-120b"]))
    measure_dir = _fake_measure(tmp_path / "measure", gpt_oss_120b)
    budget = _fit_budget(64, 32768, "raised")
    report = auto_plan(
        original=gpt_oss_120b,
        measure_dir=measure_dir,
        budget=budget,
        memory=cfg.memory,
        group_size=64,
        out=tmp_path / "plan",
    )
    tiers = validate(
        compose(["model=gpt-oss-120b", "recipe=auto", "budget.bits_per_weight=3.5"])
    ).tiers
    size = predict(
        plan_dir=tmp_path / "plan",
        original=gpt_oss_120b,
        tiers=tiers,
        group_size=64,
        out=tmp_path / "predicted.json",
    )
    weights = size["total"]["bytes"]
    assert weights == report["total_bytes"]
    assert size["budget"]["slack_bytes"] >= 0
    shape = shape_of_checkpoint(gpt_oss_120b)
    fit = footprint.fit_table(weights, shape, 131072, cfg.memory)["sizes"]["64"]
    assert fit["fits_raised"] and fit["max_context_raised"] >= 32768
    kv = footprint.kv_cache_bytes(shape, 32768)
    limit = (64 - cfg.memory.os_reserve_gib - cfg.memory.overhead_gib) * 2**30
    assert weights + kv <= limit
    assert limit - (weights + kv) < 0.01 * limit  # the budget is used, not wasted
    # ... and the card states it, from the same prediction file
    from tierquant.report.card import _allocation

    card = _allocation(json.loads((tmp_path / "predicted.json").read_text()))
    assert card["budget"] == "fit a 64 GB Mac with a 32,768-token context (raised wired limit)"
    assert (
        card["fit"]["fits"]
        and card["fit"]["limit_gib"] == f"{limit / 2**30 + cfg.memory.overhead_gib:.3f}"
    )
    assert card["fit"]["kv_gib"] == f"{kv / 2**30:.3f}"
    assert card["weights_gib"] == f"{weights / 2**30:.3f}"
    print(
        f"gpt-oss-120b fit 64 GiB / 32k raised: {weights / 2**30:.2f} GiB weights, "
        f"{size['total']['bits_per_weight']:.3f} bpw, KV {kv / 2**30:.2f} GiB"
    )


@pytest.mark.parametrize("bpw", [3.0, 3.3, 3.557, 4.5])
def test_bits_per_weight_budget_is_met_within_0_01(gpt_oss_120b, tmp_path, bpw):
    from tierquant.plan.autoplan import auto_plan

    cfg = validate(compose(["model=gpt-oss-120b"]))
    report = auto_plan(
        original=gpt_oss_120b,
        measure_dir=_fake_measure(tmp_path / "m", gpt_oss_120b),
        budget=BudgetRequest(bits_per_weight=bpw),
        memory=cfg.memory,
        group_size=64,
        out=tmp_path / "plan",
    )
    assert bpw - 0.01 <= report["bits_per_weight"] <= bpw
    assert report["slack_bytes"] >= 0


def test_budget_needs_exactly_one_and_names_keys():
    shape = None
    kw = dict(shape=shape, total_params=10**6, max_positions=4096, memory=MemoryModel())
    with pytest.raises(TierquantError, match="exactly one budget"):
        check_budget(BudgetRequest())
    with pytest.raises(TierquantError, match="exactly one budget"):
        resolve_budget(BudgetRequest(bits_per_weight=3.0, gib=1.0), **kw)
    with pytest.raises(TierquantError, match="budget.fit.wired_limit"):
        check_budget(_fit_budget(64, 1024, "max"))
    with pytest.raises(TierquantError, match="budget.fit.context"):
        resolve_budget(_fit_budget(64, 10**6, "raised"), **kw)
    b = resolve_budget(BudgetRequest(gib=1.5), **kw)
    assert b.max_bytes == 3 * 2**29 and b.min_bytes is None


def test_auto_recipe_config_errors_name_the_key(tiny_original, tmp_path):
    from tierquant.plan.autoplan import auto_plan

    with pytest.raises(TierquantError, match="recipe.tiers must be empty"):
        validate(compose(["recipe=auto", "+recipe.tiers.x=[{kinds: [norm]}]"]))
    with pytest.raises(TierquantError, match="exactly one budget"):
        validate(compose(["recipe=auto"]))  # refused at load, before any stage works
    cfg = validate(compose(["recipe=auto", "budget.gib=1"]))
    measure_dir = _fake_measure(tmp_path / "m", tiny_original)
    with pytest.raises(TierquantError, match="exactly one budget"):
        auto_plan(
            original=tiny_original,
            measure_dir=measure_dir,
            budget=BudgetRequest(),
            memory=cfg.memory,
            group_size=64,
            out=tmp_path / "plan",
        )
    assert not (tmp_path / "plan").exists()
    with pytest.raises(TierquantError, match="group size 64, but quant.group_size is 32"):
        auto_plan(
            original=tiny_original,
            measure_dir=measure_dir,
            budget=BudgetRequest(bits_per_weight=4.0),
            memory=cfg.memory,
            group_size=32,
            out=tmp_path / "plan",
        )

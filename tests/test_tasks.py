"""Random seeds (-1): drawn once, recorded, reused on resume, marked on each image; fixed seeds unchanged."""

from __future__ import annotations

import pytest

from conftest import run_config
from pipeline.manifest import PromptRow
from pipeline.tasks import SAMPLER_SEED_KEY, SEED_RANGE, draw_random_seeds, expand

IDENT = {"model": "test"}


def rows(*seeds, num_images=1):
    return [PromptRow(index=i, line=i + 1, prompt=f"prompt {i}", id=f"r{i}", seed=s, num_images=num_images)
            for i, s in enumerate(seeds)]


@pytest.fixture(scope="module")
def cfgs():
    """Composed once: (index policy, fixed policy), both with sampler.seed=-1, and a fixed-seed config."""
    return (run_config(["sampler.seed=-1"]), run_config(["sampler.seed=-1", "sampler.seed_policy=fixed"]),
            run_config(["sampler.seed=10"]))


def test_drawn_seeds_differ_between_calls_and_are_in_a1111_range():
    rs = rows(-1, -1, 5, None)
    draws = [draw_random_seeds(rs, -1) for _ in range(4)]
    assert all(set(d) == {"r0", "r1", SAMPLER_SEED_KEY} for d in draws)  # r2 has its own seed
    assert all(0 <= v < SEED_RANGE for d in draws for v in d.values())
    assert len({d["r0"] for d in draws}) > 1 and len({d[SAMPLER_SEED_KEY] for d in draws}) > 1
    assert draw_random_seeds(rows(1, None), 0) == {}  # nothing random: nothing drawn
    assert draw_random_seeds(rows(1, 2), -1) == {}  # every row has its own seed: no base seed needed


def test_previous_seeds_are_reused_and_only_missing_ones_drawn():
    rs = rows(-1, -1, None)
    previous = {"r0": 123, SAMPLER_SEED_KEY: 7, "gone": 9, "r1": "junk"}
    got = draw_random_seeds(rs, -1, previous)
    assert got["r0"] == 123 and got[SAMPLER_SEED_KEY] == 7 and "gone" not in got
    assert isinstance(got["r1"], int) and 0 <= got["r1"] < SEED_RANGE  # unusable value: drawn afresh


def test_row_with_random_seed_and_three_images_gets_consecutive_seeds(cfgs):
    index_cfg, _, fixed_seed_cfg = cfgs
    rs = rows(-1, num_images=3)
    tasks = list(expand(rs, fixed_seed_cfg, IDENT, random_seeds={"r0": 1000}))
    assert [t.seed for t in tasks] == [1000, 1001, 1002]
    assert all(t.seed_drawn and t.params()["seed_drawn"] is True for t in tasks)
    assert [t.stem for t in tasks] == ["r0_1000", "r0_1001", "r0_1002"]


def test_sampler_seed_random_goes_through_the_seed_policy(cfgs):
    index_cfg, fixed_cfg, _ = cfgs
    rs = rows(None, 42, None, -1)
    seeds = {SAMPLER_SEED_KEY: 500, "r3": 9000}
    tasks = list(expand(rs, index_cfg, IDENT, random_seeds=seeds))
    assert [t.seed for t in tasks] == [500, 42, 502, 9000]  # base + row index; a row's own seed wins
    assert [t.seed_drawn for t in tasks] == [True, False, True, True]
    assert "seed_drawn" not in tasks[1].params()
    assert [t.seed for t in expand(rs, fixed_cfg, IDENT, random_seeds=seeds)] == [500, 42, 500, 9000]


def test_same_recorded_seeds_give_the_same_tasks_and_hashes(cfgs):
    """What resume relies on: the recorded mapping reproduces the stems and settings hashes."""
    index_cfg = cfgs[0]
    rs = rows(-1, None)
    first = draw_random_seeds(rs, -1)
    again = draw_random_seeds(rs, -1, previous=first)
    assert again == first
    a, b = (list(expand(rs, index_cfg, IDENT, random_seeds=s)) for s in (first, again))
    assert [(t.stem, t.settings_hash) for t in a] == [(t.stem, t.settings_hash) for t in b]


def test_fixed_seeds_are_unchanged_and_never_marked_drawn(cfgs):
    fixed_seed_cfg = cfgs[2]
    tasks = list(expand(rows(None, 42, None), fixed_seed_cfg, IDENT))
    assert [t.seed for t in tasks] == [10, 42, 12] and not any(t.seed_drawn for t in tasks)
    assert all("seed_drawn" not in t.params() for t in tasks)


def test_a_mapping_without_a_needed_seed_is_refused_and_none_draws_unrecorded(cfgs):
    index_cfg = cfgs[0]
    with pytest.raises(ValueError, match="random_seeds has no 'r0'"):
        list(expand(rows(-1), index_cfg, IDENT, random_seeds={}))
    tasks = list(expand(rows(-1, None), index_cfg, IDENT))  # no mapping: drawn here (not resumable)
    assert all(t.seed_drawn and 0 <= t.seed < SEED_RANGE + 1 for t in tasks)


def test_recorded_seeds_are_read_back_from_an_earlier_run_json(tmp_path):
    import json

    from pipeline.tasks import recorded_random_seeds

    run_json = tmp_path / "run.json"
    assert recorded_random_seeds(run_json) == {}  # no earlier run
    run_json.write_text("{not json")
    assert recorded_random_seeds(run_json) == {}  # a run.json cut off by a crash
    run_json.write_text(json.dumps({"status": "interrupted", "random_seeds": {"r0": 77, SAMPLER_SEED_KEY: 5}}))
    previous = recorded_random_seeds(run_json)
    assert draw_random_seeds(rows(-1, None), -1, previous) == {"r0": 77, SAMPLER_SEED_KEY: 5}


def test_a_row_named_like_the_sampler_key_keeps_its_own_seed(cfgs):
    rs = [PromptRow(index=0, line=1, prompt="p", id="sampler.seed", seed=-1), *rows(None)]
    seeds = draw_random_seeds(rs, -1)
    assert set(seeds) == {"sampler.seed", SAMPLER_SEED_KEY}
    tasks = list(expand(rs, cfgs[0], IDENT, random_seeds={"sampler.seed": 1, SAMPLER_SEED_KEY: 100}))
    assert [t.seed for t in tasks] == [1, 100]

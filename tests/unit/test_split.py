"""The sticky A/B split (hashing/split.py): shares follow the weights, keys only move where weights grew."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from hashing.split import choose_version, unit_hash

ROOT = Path(__file__).resolve().parents[2]
KEYS = [f"user-{i}" for i in range(10_000)]

versions = st.text(alphabet="0123456789", min_size=1, max_size=3)
weight = st.floats(min_value=0.01, max_value=1000, allow_nan=False)
splits = st.dictionaries(versions, weight, min_size=1, max_size=5)
keys = st.lists(st.text(max_size=40), min_size=1, max_size=50)


def shares(split: dict[str, float]) -> dict[str, float]:
    counts = Counter(choose_version(key, split) for key in KEYS)
    return {v: counts[v] / len(KEYS) for v in split}


@pytest.mark.parametrize(
    "split",
    [
        {"1": 90, "2": 10},
        {"1": 50, "2": 50},
        {"1": 1, "2": 1, "3": 1},
        {"1": 99, "2": 1},
        {"1": 0.7, "2": 0.2, "3": 0.1},
    ],
)
def test_shares_are_within_one_point_of_the_split_over_10000_keys(split: dict[str, float]) -> None:
    total = sum(split.values())
    for version, share in shares(split).items():
        assert share == pytest.approx(split[version] / total, abs=0.01), (version, share)


def test_raising_a_share_moves_keys_only_towards_it() -> None:
    before = {key: choose_version(key, {"1": 90, "2": 10}) for key in KEYS}
    after = {key: choose_version(key, {"1": 80, "2": 20}) for key in KEYS}
    moved = [key for key in KEYS if before[key] != after[key]]
    assert all(before[key] == "1" and after[key] == "2" for key in moved)
    assert len(moved) == pytest.approx(0.10 * len(KEYS), abs=0.01 * len(KEYS))  # no more than the share moved


def test_the_same_split_gives_every_key_the_same_version_in_another_process() -> None:
    """The choice is a pure function of key and split: a fresh interpreter (another hash seed) agrees."""
    split = {"1": 90, "2": 10}
    here = [choose_version(key, split) for key in KEYS]
    program = (
        "import json, sys; from hashing.split import choose_version; "
        f"print(json.dumps([choose_version(f'user-{{i}}', {split!r}) for i in range({len(KEYS)})]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    run = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    there = json.loads(run.stdout)
    changed = sum(a != b for a, b in zip(here, there, strict=True))
    assert changed == 0


@given(splits, keys)
def test_the_choice_is_a_version_with_weight(split: dict[str, float], chosen_for: list[str]) -> None:
    for key in chosen_for:
        version = choose_version(key, split)
        assert version in split and split[version] > 0
        assert choose_version(key, dict(reversed(list(split.items())))) == version  # order does not matter


@given(splits, keys, st.data())
def test_raising_one_weight_only_moves_keys_to_that_version(
    split: dict[str, float], chosen_for: list[str], data: st.DataObject
) -> None:
    raised = data.draw(st.sampled_from(sorted(split)))
    factor = data.draw(st.floats(min_value=1.0, max_value=100.0))
    higher = {**split, raised: split[raised] * factor}
    for key in chosen_for:
        before, after = choose_version(key, split), choose_version(key, higher)
        assert after == before or after == raised


@given(splits, keys, versions, weight)
def test_adding_a_version_only_takes_keys_for_itself(
    split: dict[str, float], chosen_for: list[str], new: str, new_weight: float
) -> None:
    assume(new not in split)
    grown = {**split, new: new_weight}
    for key in chosen_for:
        assert choose_version(key, grown) in (choose_version(key, split), new)


@given(splits, keys, st.floats(min_value=0.001, max_value=1000))
def test_scaling_every_weight_changes_nothing(split: dict[str, float], chosen_for: list[str], scale: float) -> None:
    scaled = {v: w * scale for v, w in split.items()}
    for key in chosen_for:
        assert choose_version(key, scaled) == choose_version(key, split)


@given(st.text(max_size=100), versions)
def test_unit_hash_is_strictly_between_zero_and_one(key: str, version: str) -> None:
    u = unit_hash(key, version)
    assert 0 < u < 1 and math.isfinite(-math.log(u))


def test_zero_weights_get_nothing_and_a_split_needs_some_weight() -> None:
    assert {choose_version(key, {"1": 0, "2": 5}) for key in KEYS[:500]} == {"2"}
    with pytest.raises(ValueError, match="weight > 0"):
        choose_version("k", {"1": 0})
    with pytest.raises(ValueError, match="finite number >= 0"):
        choose_version("k", {"1": -1.0})
    with pytest.raises(ValueError, match="finite number >= 0"):
        choose_version("k", {"1": math.inf})

"""Retention: select_deletions is a pure function of the candidates and a policy.

Unit tests for each rule, then a hypothesis property test: whatever the candidates and
the policy, the newest valid, the best valid, pinned and invalid checkpoints survive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptguard._manager.retention import Candidate, RetentionPolicy, select_deletions


def _c(
    step: int, *, valid: bool = True, metric: float | None = None, pinned: bool = False
) -> Candidate:
    return Candidate(f"checkpoint-{step}", step, valid, metric, pinned)


def _names(*steps: int) -> list[str]:
    return [f"checkpoint-{s}" for s in steps]


def _kept(candidates: Sequence[Candidate], policy: RetentionPolicy) -> set[int]:
    deleted = set(select_deletions(candidates, policy))
    return {c.step for c in candidates if c.name not in deleted}


# -- keep_last ---------------------------------------------------------------------------------
def test_keep_last_keeps_the_newest_n_and_deletes_oldest_first() -> None:
    candidates = [_c(s) for s in (5, 1, 4, 2, 3)]  # order of the input does not matter
    assert select_deletions(candidates, RetentionPolicy(keep_last=2)) == _names(1, 2, 3)


def test_keep_last_none_keeps_everything() -> None:
    candidates = [_c(s) for s in range(1, 10)]
    assert select_deletions(candidates, RetentionPolicy(keep_last=None)) == []


def test_keep_last_larger_than_the_number_of_checkpoints() -> None:
    candidates = [_c(1), _c(2)]
    assert select_deletions(candidates, RetentionPolicy(keep_last=5)) == []


def test_no_candidates_and_no_valid_candidates() -> None:
    assert select_deletions([], RetentionPolicy(keep_last=1)) == []
    invalid = [_c(1, valid=False), _c(2, valid=False)]
    assert select_deletions(invalid, RetentionPolicy(keep_last=1)) == []


def test_keep_last_counts_only_valid_checkpoints() -> None:
    # checkpoint-4 and -5 are corrupt: the two newest *valid* ones are 2 and 3.
    candidates = [_c(1), _c(2), _c(3), _c(4, valid=False), _c(5, valid=False)]
    assert select_deletions(candidates, RetentionPolicy(keep_last=2)) == _names(1)


# -- invalid and pinned ------------------------------------------------------------------------
def test_invalid_entries_are_never_deleted() -> None:
    candidates = [_c(1, valid=False), _c(2), _c(3, valid=False), _c(4)]
    deleted = select_deletions(candidates, RetentionPolicy(keep_last=1))
    assert deleted == _names(2)


def test_pinned_checkpoints_are_kept() -> None:
    candidates = [_c(1, pinned=True), _c(2), _c(3, pinned=True), _c(4), _c(5)]
    assert select_deletions(candidates, RetentionPolicy(keep_last=1)) == _names(2, 4)


def test_pinned_does_not_count_towards_keep_last() -> None:
    candidates = [_c(1), _c(2), _c(3, pinned=True)]
    # keep_last=2 keeps 2 and 3; 3 is also pinned, so only 1 goes.
    assert select_deletions(candidates, RetentionPolicy(keep_last=2)) == _names(1)


# -- keep_best ---------------------------------------------------------------------------------
def test_keep_best_min() -> None:
    metrics = {1: 0.9, 2: 0.1, 3: 0.5, 4: 0.7, 5: 0.8}
    candidates = [_c(s, metric=m) for s, m in metrics.items()]
    policy = RetentionPolicy(keep_last=1, keep_best=1, best_metric="loss", best_mode="min")
    assert select_deletions(candidates, policy) == _names(1, 3, 4)


def test_keep_best_max() -> None:
    metrics = {1: 0.9, 2: 0.1, 3: 0.5, 4: 0.7, 5: 0.8}
    candidates = [_c(s, metric=m) for s, m in metrics.items()]
    policy = RetentionPolicy(keep_last=1, keep_best=1, best_metric="acc", best_mode="max")
    assert select_deletions(candidates, policy) == _names(2, 3, 4)


def test_keep_best_k() -> None:
    metrics = {1: 3.0, 2: 1.0, 3: 2.0, 4: 5.0, 5: 4.0}
    candidates = [_c(s, metric=m) for s, m in metrics.items()]
    policy = RetentionPolicy(keep_last=1, keep_best=2, best_metric="loss")
    assert _kept(candidates, policy) == {2, 3, 5}


def test_keep_best_zero_still_keeps_the_single_best() -> None:
    candidates = [_c(1, metric=0.1), _c(2, metric=0.5), _c(3, metric=0.9)]
    policy = RetentionPolicy(keep_last=1, keep_best=0, best_metric="loss")
    assert _kept(candidates, policy) == {1, 3}


def test_without_best_metric_metrics_are_ignored() -> None:
    candidates = [_c(1, metric=0.0), _c(2, metric=9.0), _c(3, metric=9.0)]
    assert _kept(candidates, RetentionPolicy(keep_last=1, best_metric=None)) == {3}


def test_ties_go_to_the_newer_checkpoint() -> None:
    candidates = [_c(1, metric=0.5), _c(2, metric=0.5), _c(3, metric=0.5), _c(4, metric=0.9)]
    for mode in ("min", "max"):
        best_mode: Literal["min", "max"] = "min" if mode == "min" else "max"
        policy = RetentionPolicy(keep_last=1, best_metric="m", best_mode=best_mode)
        expected = {3, 4} if mode == "min" else {4}
        assert _kept(candidates, policy) == expected, mode


def test_non_finite_and_missing_metrics_are_never_best() -> None:
    candidates = [
        _c(1, metric=float("nan")),
        _c(2, metric=float("-inf")),
        _c(3, metric=None),
        _c(4, metric=2.0),
        _c(5, metric=float("inf")),
        _c(6, metric=3.0),
    ]
    policy_min = RetentionPolicy(keep_last=1, best_metric="loss", best_mode="min")
    assert _kept(candidates, policy_min) == {4, 6}
    policy_max = RetentionPolicy(keep_last=1, best_metric="acc", best_mode="max")
    assert _kept(candidates, policy_max) == {6}


def test_best_among_valid_only() -> None:
    # The corrupt checkpoint-2 has the best metric: it is kept (invalid), but it does not
    # displace the best *valid* one.
    candidates = [_c(1, metric=0.3), _c(2, metric=0.1, valid=False), _c(3, metric=0.5), _c(4)]
    policy = RetentionPolicy(keep_last=1, best_metric="loss")
    assert _kept(candidates, policy) == {1, 2, 4}


# -- keep_every --------------------------------------------------------------------------------
def test_keep_every() -> None:
    candidates = [_c(s) for s in range(11)]
    policy = RetentionPolicy(keep_last=2, keep_every=4)
    assert _kept(candidates, policy) == {0, 4, 8, 9, 10}


def test_keep_every_never_keeps_an_invalid_one_by_accident_of_counting() -> None:
    candidates = [_c(2), _c(3), _c(4, valid=False), _c(5), _c(6)]
    policy = RetentionPolicy(keep_last=1, keep_every=2)
    assert select_deletions(candidates, policy) == _names(3, 5)


def test_all_rules_together() -> None:
    candidates = [
        _c(10, metric=0.9),
        _c(20, metric=0.2),  # best
        _c(30, metric=0.5, pinned=True),
        _c(40, metric=0.6),  # keep_every
        _c(50, metric=0.7, valid=False),
        _c(60, metric=0.4),
        _c(70, metric=0.8),  # newest valid
    ]
    policy = RetentionPolicy(keep_last=1, keep_best=1, best_metric="loss", keep_every=40)
    assert select_deletions(candidates, policy) == _names(10, 60)


# -- policy validation -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep_last": 0}, "keep_last"),
        ({"keep_last": -3}, "keep_last"),
        ({"keep_best": -1}, "keep_best"),
        ({"best_mode": "median"}, "best_mode"),
        ({"keep_every": 0}, "keep_every"),
        ({"keep_every": -2}, "keep_every"),
    ],
)
def test_policy_rejects_invalid_settings(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RetentionPolicy(**kwargs)


def test_policy_defaults_and_accepted_edges() -> None:
    default = RetentionPolicy()
    assert (default.keep_last, default.keep_best, default.best_metric) == (3, 1, None)
    assert (default.best_mode, default.keep_every) == ("min", None)
    RetentionPolicy(keep_last=None, keep_best=0, best_mode="max", keep_every=1)
    RetentionPolicy(keep_last=1)


# -- property ----------------------------------------------------------------------------------
_metrics = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1.0, 1.0, 2.0]),  # frequent ties
)


@st.composite
def _candidates(draw: st.DrawFn) -> list[Candidate]:
    steps = draw(st.lists(st.integers(0, 60), unique=True, max_size=15))
    return [
        Candidate(
            f"checkpoint-{step}",
            step,
            valid=draw(st.integers(0, 3)) != 0,  # mostly valid
            metric=draw(_metrics),
            pinned=draw(st.integers(0, 4)) == 0,
        )
        for step in steps
    ]


_policies = st.builds(
    RetentionPolicy,
    keep_last=st.one_of(st.none(), st.integers(1, 6)),
    keep_best=st.integers(0, 3),
    best_metric=st.one_of(st.none(), st.just("loss")),
    best_mode=st.sampled_from(["min", "max"]),
    keep_every=st.one_of(st.none(), st.integers(1, 12)),
)


def _score(c: Candidate, mode: str) -> float | None:
    """Lower is better; None when the metric cannot be compared."""
    if c.metric is None or not math.isfinite(c.metric):
        return None
    return c.metric if mode == "min" else -c.metric


@settings(max_examples=400, deadline=None)
@given(candidates=_candidates(), policy=_policies)
def test_retention_properties(candidates: list[Candidate], policy: RetentionPolicy) -> None:
    deleted = select_deletions(candidates, policy)
    by_name = {c.name: c for c in candidates}
    valid = sorted((c for c in candidates if c.valid), key=lambda c: c.step)
    kept = [c for c in candidates if c.name not in set(deleted)]

    # Deletions are distinct, valid, unpinned names of candidates, oldest first.
    assert len(set(deleted)) == len(deleted)
    assert set(deleted) <= {c.name for c in valid}
    assert all(not by_name[n].pinned for n in deleted)
    assert [by_name[n].step for n in deleted] == sorted(by_name[n].step for n in deleted)
    if policy.keep_last is None:
        assert deleted == []
    if not valid:
        return

    # The newest valid, and at least min(keep_last, #valid) newest valid ones.
    assert valid[-1] in kept
    if policy.keep_last is not None:
        assert all(c in kept for c in valid[-policy.keep_last :])
    # Every multiple of keep_every.
    if policy.keep_every is not None:
        assert all(c in kept for c in valid if c.step % policy.keep_every == 0)
    # The best valid one by the metric (ties: the newest of the best), and each deleted
    # scored one has at least max(1, keep_best) kept ones at least as good.
    if policy.best_metric is not None:
        scored = [(s, c) for c in valid if (s := _score(c, policy.best_mode)) is not None]
        if scored:
            best = min(s for s, _ in scored)
            newest_best = max((c for s, c in scored if s == best), key=lambda c: c.step)
            assert newest_best in kept
            kept_scored = [s for s, c in scored if c in kept]
            for s, c in scored:
                if c.name in deleted:
                    at_least_as_good = sum(1 for k in kept_scored if k <= s)
                    assert at_least_as_good >= max(1, policy.keep_best)

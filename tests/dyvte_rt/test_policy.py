import math

import numpy as np
import pytest

from dyvte_rt.errors import PolicyError
from dyvte_rt.runtime.policy import (
    FixedLayerExit,
    NeverExit,
    RouterExit,
    check_policy_fits,
    exit_probability,
    parse_policy,
)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("never", NeverExit()),
        ("router", RouterExit(0.5)),
        ("layer:15", FixedLayerExit(15)),
        (" Layer:3 ", FixedLayerExit(3)),
    ],
)
def test_parse_policy(spec, expected):
    assert parse_policy(spec) == expected


@pytest.mark.parametrize("spec", ["", "always", "layer:", "layer:-1", "layer:x", "router:0.3"])
def test_bad_policy_is_a_policy_error_with_hint(spec):
    with pytest.raises(PolicyError) as info:
        parse_policy(spec)
    assert "layer:K" in info.value.one_line()


@pytest.mark.parametrize("threshold", [-0.1, 1.5, math.nan])
def test_threshold_outside_unit_interval_is_refused(threshold):
    with pytest.raises(PolicyError):
        RouterExit(threshold)


def test_router_threshold_semantics():
    logits = np.array([[0.0, math.log(3.0)]])  # p(exit) = 0.75
    assert exit_probability(logits) == pytest.approx(0.75)
    assert RouterExit(0.5).decide(3, 0.75)
    assert RouterExit(0.75).decide(3, 0.75)  # >= threshold exits
    assert not RouterExit(0.8).decide(3, 0.75)
    with pytest.raises(PolicyError):
        RouterExit().decide(3, None)


def test_exit_probability_is_stable_for_huge_logits():
    assert exit_probability(np.array([0.0, 1e4])) == 1.0
    assert exit_probability(np.array([1e4, 0.0])) == 0.0


def test_exit_probability_is_the_softmax_exit_class():
    rng = np.random.default_rng(0)
    for logits in rng.normal(0, 8, size=(200, 1, 2)).astype(np.float32):
        shifted = logits.astype(np.float64) - logits.max()
        softmax = np.exp(shifted) / np.exp(shifted).sum()
        assert exit_probability(logits) == pytest.approx(softmax[0, 1], rel=1e-12, abs=1e-300)
    with pytest.raises(ValueError, match="2 values"):
        exit_probability(np.zeros((2, 2)))


def test_fixed_layer_must_be_a_candidate():
    check_policy_fits(FixedLayerExit(2), 8, (1, 2, 3))
    with pytest.raises(PolicyError, match=r"1\.\.3"):
        check_policy_fits(FixedLayerExit(7), 8, (1, 2, 3))

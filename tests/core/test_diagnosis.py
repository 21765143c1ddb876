"""Diagnosis and metrics on plain numpy: the evidence per layer, the verdict it supports, the output-level
comparison. Every expected value is computed here from its definition. Needs no framework."""

import itertools

import numpy as np
import pytest

from bnrepair import metrics
from bnrepair.diagnosis import compare, inspect_layers, output_evidence, verdicts
from bnrepair.graph import BNLayer, ModelGraph

rng = np.random.default_rng(3)
DATA_MEAN, DATA_VAR = rng.normal(0, 2, 16), rng.uniform(0.5, 4.0, 16)


def layer(name, mean, var, frozen=False, momentum=0.99):
    return BNLayer(name, len(mean), -1, 1e-3, momentum, True, True, frozen, np.asarray(mean, float),
                   np.asarray(var, float))


def graph(*layers):
    return ModelGraph("keras", "m.h5", list(layers))


def test_compare_follows_its_definitions():
    stored_mean, stored_var = DATA_MEAN + 0.3, DATA_VAR * 2
    e = compare(layer("bn", stored_mean, stored_var), DATA_MEAN, DATA_VAR, 0.5)
    shift = 0.3 / np.sqrt(DATA_VAR + 1e-3)
    ratio = np.log((stored_var + 1e-3) / (DATA_VAR + 1e-3))
    assert e.mean_shift_max == pytest.approx(shift.max()) and e.mean_shift_median == pytest.approx(np.median(shift))
    assert e.log_var_ratio_max == pytest.approx(np.abs(ratio).max())
    assert e.share_off == pytest.approx(np.mean((shift > 0.5) | (np.abs(ratio) > 0.5)))


def test_each_cause_gets_its_verdict():
    fraction = 0.1  # an EMA that kept 10% of the data's statistics and 90% of its 0 / 1 start
    stale = layer("stale", fraction * DATA_MEAN, fraction * DATA_VAR + (1 - fraction))
    never = layer("never", np.zeros(16), np.ones(16))
    other = layer("other", DATA_MEAN + rng.normal(0, 3, 16), DATA_VAR * rng.uniform(3, 6, 16), frozen=True)
    healthy = layer("ok", DATA_MEAN, DATA_VAR)
    for bn, cause in ((stale, "stale"), (never, "never_updated"), (other, "domain_shift"), (healthy, "healthy")):
        evidence = [compare(bn, DATA_MEAN, DATA_VAR, 0.5)]
        found = verdicts(graph(bn), evidence, "bnrepair recalibrate m.h5 --data d")
        assert [v.cause for v in found] == [cause], (bn.id, found)
        assert (found[0].fix != "") == (cause != "healthy")


def test_inspect_flags_what_the_stored_values_show():
    flags = inspect_layers(graph(layer("zero", np.zeros(4), np.ones(4)),
                                 layer("nan", np.array([0, np.nan, 0, 0.]), np.ones(4)),
                                 layer("neg", np.ones(4), np.array([1, -1, 1, 1.])),
                                 layer("slow", np.ones(4), np.ones(4) * 2, momentum=0.999)),
                           calls={"zero": 1, "nan": 0, "neg": 2, "slow": 1})
    codes = {(f.layer, f.code) for f in flags}
    assert {("zero", "never_updated"), ("nan", "non_finite"), ("neg", "non_positive_var"), ("slow", "slow_momentum"),
            ("nan", "unreached"), ("neg", "reused")} <= codes


def test_auc_equals_the_pairwise_definition():
    score, positive = rng.normal(size=40).round(1), rng.random(40) > 0.4  # rounding makes ties
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0)
             for p, n in itertools.product(score[positive], score[~positive])]
    assert metrics.auc(score, positive) == pytest.approx(np.mean(pairs))


def test_output_evidence_compares_predictions_and_accuracy():
    labels = rng.integers(0, 3, 60)
    right = np.eye(3)[labels] + rng.normal(0, 0.1, (60, 3))
    wrong = np.eye(3)[(labels + 1) % 3]
    out = output_evidence(wrong, right, right, labels)
    assert out["agreement_inference_vs_training"] == 0.0
    assert out["accuracy"] == {"inference": 0.0, "training": 1.0, "recalibrated": 1.0}
    assert out["expected_gain"] == 1.0
    assert out["output_change_inference_vs_training"] == pytest.approx(
        np.linalg.norm(wrong - right) / np.linalg.norm(right))
    assert "accuracy" not in output_evidence(wrong, right, right, None)


def test_evidence_lists_say_when_they_are_cut_and_frozen_speaks_the_frameworks_words():
    never = [layer(f"bn{k}", np.zeros(16), np.ones(16)) for k in range(6)]
    found = verdicts(graph(*never), [compare(bn, DATA_MEAN, DATA_VAR, 0.5) for bn in never], "fix")
    assert found[0].evidence[0].endswith("bn0, bn1, bn2, bn3, bn4, ...")
    five = verdicts(graph(*never[:5]), [compare(bn, DATA_MEAN, DATA_VAR, 0.5) for bn in never[:5]], "fix")
    assert five[0].evidence[0].endswith("bn3, bn4")  # nothing left out, no ellipsis
    other = layer("other", DATA_MEAN + rng.normal(0, 3, 16), DATA_VAR * rng.uniform(3, 6, 16), frozen=True, momentum=0)
    torch_graph = ModelGraph("torch", "m.pt", [other], momentum_is_decay=False, frozen_means="momentum 0")
    (verdict,) = verdicts(torch_graph, [compare(other, DATA_MEAN, DATA_VAR, 0.5)], "fix")
    assert verdict.cause == "domain_shift" and not any("trainable=False" in line for line in verdict.evidence)
    assert any("frozen (momentum 0)" in line for line in verdict.evidence)

"""Folding math and rules without any framework: numpy layers against their folded versions."""

import numpy as np

from bnrepair.folding import (
    OUTPUT,
    Decision,
    Op,
    Params,
    apply,
    axis_index,
    bn_affine,
    fold_backward,
    fold_forward,
    plan,
)


def bn(x, mean, var, eps, gamma, beta):
    """Inference BN on the last axis, written out."""
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def stats(rng, c):
    return rng.normal(0, 0.5, c), rng.uniform(0.5, 2, c), rng.uniform(0.5, 1.5, c), rng.normal(0, 0.5, c)


def test_dense_backward_and_forward_are_exact():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 5))
    w, b = rng.normal(size=(5, 3)), rng.normal(size=3)
    mean, var, gamma, beta = stats(rng, 3)
    scale, shift = bn_affine(mean, var, 1e-3, gamma, beta)
    p = Params(w, b, axis_index(w.shape, 1), axis_index(w.shape, 0))
    fw, fb = fold_backward(p, scale, shift)
    np.testing.assert_allclose(x @ fw + fb, bn(x @ w + b, mean, var, 1e-3, gamma, beta), atol=1e-12)

    mean, var, gamma, beta = stats(rng, 5)
    scale, shift = bn_affine(mean, var, 1e-5, gamma, beta)
    fw, fb = fold_forward(p, scale, shift)
    np.testing.assert_allclose(x @ fw + fb, bn(x, mean, var, 1e-5, gamma, beta) @ w + b, atol=1e-12)


def test_missing_bias_and_affine_parts():
    rng = np.random.default_rng(1)
    x, w = rng.normal(size=(8, 4)), rng.normal(size=(4, 2))
    mean, var = rng.normal(size=2), rng.uniform(0.5, 2, 2)
    scale, shift = bn_affine(mean, var, 1e-5)
    fw, fb = fold_backward(Params(w, None, axis_index(w.shape, 1)), scale, shift)
    np.testing.assert_allclose(x @ fw + fb, bn(x @ w, mean, var, 1e-5, np.ones(2), np.zeros(2)), atol=1e-12)


def test_concat_split_per_branch_and_both_sides_of_one_layer():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 4))
    w1, w2, w3 = rng.normal(size=(4, 2)), rng.normal(size=(4, 3)), rng.normal(size=(5, 2))
    mean, var, gamma, beta = stats(rng, 5)
    later = stats(rng, 2)
    params = {n: Params(w, None, axis_index(w.shape, 1), axis_index(w.shape, 0))
              for n, w in (("a", w1), ("b", w2), ("c", w3))}
    decisions = [Decision("bn", "concat", ["a", "b"], axis=1), Decision("bn_c_in", None),
                 Decision("bn_c", "backward", ["c"], axis=1)]
    affine = {"bn": bn_affine(mean, var, 1e-3, gamma, beta), "bn_c": bn_affine(*later[:2], 1e-3, *later[2:])}
    apply(decisions, affine, params)
    want = bn(bn(np.concatenate([x @ w1, x @ w2], 1), mean, var, 1e-3, gamma, beta) @ w3, *later[:2], 1e-3,
              *later[2:])
    got = np.concatenate([x @ params[n].weight + params[n].bias for n in "ab"], 1) @ params["c"].weight \
        + params["c"].bias
    np.testing.assert_allclose(got, want, atol=1e-12)


def graph(*ops):
    return {op.name: op for op in ops}


def test_rules_accept_and_refuse_with_reasons():
    conv = {"kind": "conv", "type": "Conv2D", "out_axis": 3, "in_axis": 3}
    ops = graph(
        Op("x", "input", "Input", users=["c1", "bn_in", "c4", "c5", "c7"]),
        Op("c1", inputs=["x"], users=["bn1"], **conv),
        Op("bn1", "bn", "BN", ["c1"], [OUTPUT], out_axis=3),
        Op("bn_in", "bn", "BN", ["x"], ["c2"], out_axis=3),
        Op("c2", inputs=["bn_in"], users=[OUTPUT], **conv),
        Op("c4", inputs=["x"], users=["relu"], **conv),
        Op("relu", "activation", "ReLU", ["c4"], ["bn_act"]),
        Op("bn_act", "bn", "BN", ["relu"], ["c_pad"], out_axis=3),
        Op("c_pad", inputs=["bn_act"], users=[OUTPUT], padded=True, **conv),
        Op("c5", inputs=["x"], users=["bn_shared", OUTPUT], **conv),
        Op("bn_shared", "bn", "BN", ["c5"], [OUTPUT], out_axis=3),
        Op("c7", inputs=["x"], users=["bn_fused"], activation="relu", **conv),
        Op("bn_fused", "bn", "BN", ["c7"], ["c_grp"], out_axis=3),
        Op("c_grp", inputs=["bn_fused"], users=[OUTPUT], groups=2, **conv),
        Op("d", "dense", "Dense", ["x"], ["bn_axis"], out_axis=2, in_axis=2),
        Op("bn_axis", "bn", "BN", ["d"], [OUTPUT], out_axis=1),
        Op("bn_batch", "bn", "BN", ["x"], [OUTPUT], out_axis=3, stats=False),
    )
    decisions = {d.bn: d for d in plan(ops, [n for n, op in ops.items() if op.kind == "bn"])}
    assert (decisions["bn1"].how, decisions["bn1"].into) == ("backward", ["c1"])
    assert (decisions["bn_in"].how, decisions["bn_in"].into) == ("forward", ["c2"])
    refused = {name: d.reason for name, d in decisions.items() if d.how is None}
    assert set(refused) == {"bn_act", "bn_shared", "bn_fused", "bn_axis", "bn_batch"}
    assert "activation relu (ReLU) sits between c4 and BN" in refused["bn_act"]
    assert "c_pad pads its input" in refused["bn_act"]
    assert "also used by <output>" in refused["bn_shared"]
    assert "applies activation 'relu'" in refused["bn_fused"] and "groups=2" in refused["bn_fused"]
    assert "acts on axis 1" in refused["bn_axis"]
    assert "batch statistics" in refused["bn_batch"]

"""The recalibration loop on a numpy runner: exact pooling over uneven batches, PreciseBN in train mode, the
inference-consistent fixed point in eval mode, layer selection and its errors. Needs no framework."""

import re

import numpy as np
import pytest

import bnrepair
from bnrepair.data import IterableCalibration as calibration
from bnrepair.errors import BnrepairError, InputError
from bnrepair.protocols import Runner
from bnrepair.recalibration import run

from .fake_runner import EPS, ChainRunner

rng = np.random.default_rng(7)
X = rng.normal([2.0, -1.0, 5.0], [1.0, 3.0, 0.5], (203, 3))


def batches(sizes):
    starts = np.cumsum([0, *sizes])
    return [X[a:b] for a, b in zip(starts[:-1], starts[1:])]


def hidden(runner, x, mean, var):
    return np.maximum((x - mean) / np.sqrt(var + EPS) * runner.w + runner.b, 0.0)


def test_the_fake_runner_is_a_runner():
    assert isinstance(ChainRunner(), Runner)


@pytest.mark.parametrize("sizes", [[203], [64, 64, 64, 11], [1, 100, 2, 100]])
def test_train_mode_pools_each_batch_normalised_with_its_own_statistics(sizes):
    runner = ChainRunner()
    report = bnrepair.recalibrate(runner, batches(sizes), mode="train")
    assert report.passes == 1 and report.samples == 203
    reference = np.concatenate([hidden(runner, b, b.mean(0), b.var(0)) for b in batches(sizes)])
    np.testing.assert_allclose(runner.graph.layer("bn1").mean, X.mean(0), rtol=1e-12)
    np.testing.assert_allclose(runner.graph.layer("bn1").var, X.var(0), rtol=1e-12)  # biased, as Keras stores
    np.testing.assert_allclose(runner.graph.layer("bn2").mean, reference.mean(0), rtol=1e-12)
    np.testing.assert_allclose(runner.graph.layer("bn2").var, reference.var(0), rtol=1e-12)


def test_eval_mode_reaches_the_inference_consistent_fixed_point_whatever_the_batching():
    results = []
    for sizes in ([203], [10] * 20 + [3]):
        runner = ChainRunner()
        report = bnrepair.recalibrate(runner, batches(sizes), mode="eval")
        assert report.converged and report.passes <= 3
        results.append(runner)
    m1, v1 = X.mean(0), X.var(0)
    h = hidden(results[0], X, m1, v1)
    for runner in results:
        np.testing.assert_allclose(runner.graph.layer("bn1").mean, m1, rtol=1e-10)
        np.testing.assert_allclose(runner.graph.layer("bn2").mean, h.mean(0), rtol=1e-10)
        np.testing.assert_allclose(runner.graph.layer("bn2").var, h.var(0), rtol=1e-10)


def test_unbiased_convention_is_followed():
    runner = ChainRunner()
    runner.graph.unbiased_var = True
    bnrepair.recalibrate(runner, batches([100, 103]))
    np.testing.assert_allclose(runner.graph.layer("bn1").var, X.var(0, ddof=1), rtol=1e-12)


def test_layers_and_skip_choose_by_id():
    runner = ChainRunner()
    outcome = run(runner, calibration(batches([203])), layers="bn", skip="2$")
    assert [bn.id for bn in outcome.layers] == ["bn1"]
    np.testing.assert_array_equal(runner.graph.layer("bn2").mean, np.zeros(3))


@pytest.mark.parametrize("kwargs, message", [
    ({"layers": "("}, "--layers '(': not a valid regular expression"),
    ({"skip": "bn"}, "--skip 'bn' leave(s) none of the 2 BN layer(s) to recalibrate"),
    ({"layers": "x", "skip": "y"}, "--layers 'x' and --skip 'y' leave(s) none of the 2 BN layer(s)"),
    ({"mode": "evel"}, "--mode must be one of train, eval"),
    ({"tol": float("nan")}, "--tol must be a number >= 0"),
    ({"mode": "eval", "eval_batch_size": 0}, "--eval-batch-size must be at least 1, got 0"),
])
def test_bad_choices_are_refused(kwargs, message):
    with pytest.raises(BnrepairError, match=re.escape(message)):
        run(ChainRunner(), calibration(batches([203])), **kwargs)


def test_too_few_or_non_finite_samples_are_refused():
    with pytest.raises(InputError, match="at least 2 calibration samples"):
        run(ChainRunner(), calibration([X[:1]]))
    bad = X[:10].copy()
    bad[3, 1] = np.inf
    with pytest.raises(InputError, match="NaN or infinite activations"):
        run(ChainRunner(), calibration([bad]))


def test_samples_is_reported_and_the_model_in_memory_is_updated_in_place():
    runner = ChainRunner()
    report = bnrepair.recalibrate(runner, batches([50, 50]))
    assert report.samples == 100 and report.output is None
    assert {layer.id for layer in report.layers} == {"bn1", "bn2"}


def test_the_library_validates_preprocess_and_data_paths_for_every_kind_of_data(tmp_path):
    with pytest.raises(InputError, match="--preprocess must be one of unit, raw, tf, caffe, imagenet"):
        bnrepair.recalibrate(ChainRunner(), X, preprocess="bogus")  # arrays ignore the scaling, but a typo is a typo
    with pytest.raises(InputError, match="no such file or folder"):
        bnrepair.recalibrate(ChainRunner(), tmp_path / "missing")


def test_layers_that_keep_no_statistics_are_named_as_the_reason():
    runner = ChainRunner()
    for bn in runner.graph.bn_layers:
        bn.tracks_stats = False
    with pytest.raises(BnrepairError, match="none of its 2 BN layer.s. keeps running statistics"):
        run(runner, calibration(batches([203])))


def test_eval_mode_starts_from_precise_bn_and_stops_at_its_pass_limit():
    runner = ChainRunner()
    outcome = run(runner, calibration(batches([100, 103])), mode="eval", max_passes=2, tol=0.0)
    assert outcome.passes == 2 and not outcome.converged
    np.testing.assert_allclose(runner.graph.layer("bn1").mean, X.mean(0), rtol=1e-12)  # right from the first pass
    with pytest.raises(BnrepairError, match="--max-passes must be at least 2"):
        run(runner, calibration(batches([203])), mode="eval", max_passes=1)


def test_a_dead_channel_cannot_dominate_the_change():
    from bnrepair.moments import relative_change

    old, new = (np.zeros(2), np.array([1.0, 0.0])), (np.array([0.0, 1e-6]), np.array([1.0, 1e-30]))
    assert relative_change(old, new, 1e-3) < 1e-4


def deep_chain(corrected: bool) -> ChainRunner:
    runner = ChainRunner(depth=12, seed=3, counted=corrected)
    runner.links = [(w, b + 2.0) for w, b in runner.links]  # few dead units: every link carries its input on
    return runner


def test_drift_corrected_passes_reach_the_fixed_point_of_the_whole_set_in_fewer_passes():
    """The inference fixed point is what one train-mode batch of the whole set measures (the reference);
    plain inference passes need about one pass per layer in depth to get there."""
    reference = deep_chain(True)
    seen = reference._forward(X, "train")[1]
    chunks = [X[i:i + 16] for i in range(0, len(X), 16)]
    outcomes = {}
    for corrected in (True, False):
        runner = deep_chain(corrected)
        outcomes[corrected] = run(runner, calibration(chunks), mode="eval", eval_batch_size=16, tol=1e-4)
        exact = run(runner, calibration(chunks), mode="eval", eval_batch_size=16, tol=1e-9)
        assert exact.converged
        for name, x in seen.items():
            np.testing.assert_allclose(runner.graph.layer(name).mean, x.mean(0), atol=1e-7)
            np.testing.assert_allclose(runner.graph.layer(name).var, x.var(0), rtol=1e-7)
    assert outcomes[True].converged and outcomes[False].converged
    assert outcomes[True].passes < outcomes[False].passes - 2


def test_a_corrected_pass_carries_statistics_exactly_through_affine_links():
    """Where a change reaches a layer through per-channel affine ops only, the batch's std ratio and mean shift
    carry the target exactly: one corrected pass after the start and its plain baseline lands on the fixed
    point (a batch's plain shift, F(A) + (m_b - c_b), missed it by 5e-5)."""
    chunks = [X[i:i + 16] for i in range(0, len(X), 16)]
    runner = ChainRunner(depth=12, seed=3, relu=False)
    outcome = run(runner, calibration(chunks), mode="eval", eval_batch_size=16, tol=0.0, max_passes=3)
    assert outcome.passes == 3
    seen = ChainRunner(depth=12, seed=3, relu=False)._forward(X, "train")[1]
    for name, x in seen.items():
        np.testing.assert_allclose(runner.graph.layer(name).mean, x.mean(0), atol=1e-9)
        np.testing.assert_allclose(runner.graph.layer(name).var, x.var(0), rtol=1e-6)


def test_eval_stops_after_a_corrected_pass_its_contraction_places_within_tol():
    chunks = [X[i:i + 16] for i in range(0, len(X), 16)]
    runner = deep_chain(True)
    outcome = run(runner, calibration(chunks), mode="eval", eval_batch_size=16, tol=1e-3)
    assert outcome.converged and outcome.passes == 5 and 0 < outcome.estimated_error < 1e-3  # no 6th, plain pass
    seen = deep_chain(True)._forward(X, "train")[1]
    for name, x in seen.items():  # the prediction holds: within tol of the fixed point
        scale = np.sqrt(x.var(0) + EPS)
        assert np.max(np.abs(runner.graph.layer(name).mean - x.mean(0)) / scale) < 1e-3


class Reshuffled:
    """A re-iterable that is not a list: it may give other batches each pass, so eval mode makes plain passes."""

    def __init__(self, chunks):
        self.chunks = chunks

    def __iter__(self):
        return iter(self.chunks)


def test_a_stream_not_known_to_repeat_gets_plain_passes():
    chunks = [X[i:i + 16] for i in range(0, len(X), 16)]
    plain = run(deep_chain(False), calibration(chunks), mode="eval", eval_batch_size=16)
    unknown = run(deep_chain(True), calibration(Reshuffled(chunks)), mode="eval", eval_batch_size=16)
    assert unknown.change_per_pass == plain.change_per_pass


def test_a_stream_that_gives_more_batches_on_a_later_pass_is_refused():
    class Growing(list):
        def __iter__(self):
            self.append(X[16 * len(self):16 * len(self) + 16])
            return super().__iter__()

    with pytest.raises(InputError, match="more batches on a later pass"):
        run(deep_chain(True), calibration(Growing([])), mode="eval", eval_batch_size=16)


class Chaotic(ChainRunner):
    """Each pass's moments jitter by about 1e-3 std with the exact bits of the statistics it ran at, as a
    deep float32 net's do: the fixed point cannot be resolved finer than that."""

    def collect(self, inputs, mode, ids, batch_stats=frozenset(), corrections=None):
        moments = super().collect(inputs, mode, ids, batch_stats, corrections)
        bits = sum(float(np.sum(self.graph.layer(i).mean)) for i in ids)
        for m in moments.values():
            m.mean = m.mean + 1e-3 * np.sin(1e9 * bits + np.arange(len(m.mean)))
        return moments


def test_passes_that_stop_shrinking_the_change_end_at_the_measured_noise_floor():
    chunks = [X[i:i + 50] for i in range(0, len(X), 50)]
    outcome = run(Chaotic(), calibration(chunks), mode="eval", tol=1e-6, max_passes=30)
    assert outcome.converged and outcome.passes < 30
    assert 1e-4 < outcome.noise_floor < 1e-2  # the jitter, measured, not assumed
    assert outcome.change_per_pass[-1] <= 2 * outcome.noise_floor
    steady = run(ChainRunner(), calibration(chunks), mode="eval", tol=1e-6)
    assert steady.converged and steady.noise_floor is None


def test_a_graph_built_from_symbols_computes_the_correction_numpy_computes():
    """The graph wings build ``drift.corrected`` by handing it ``Symbol``s: here a graph of recorded nodes, then
    evaluated, must give what the formula gives on arrays (and use only the ops a wing maps)."""
    from bnrepair.drift import Symbol, corrected

    rng = np.random.default_rng(0)
    mean, var, offset = rng.normal(size=4), rng.uniform(0.5, 2, 4), rng.normal(size=4)
    then, target = rng.uniform(0.5, 2, 4), rng.uniform(0.5, 2, 4)
    nodes = []

    def emit(op, inputs):
        nodes.append((op, inputs))
        return f"n{len(nodes) - 1}"

    def evaluate(value, feeds):
        if not isinstance(value, str):
            return value
        if value in feeds:
            return feeds[value]
        op, inputs = nodes[int(value[1:])]
        args = [evaluate(x, feeds) for x in inputs]
        return {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
                "sqrt": np.sqrt}[op](*args)

    feeds = {"mean": mean, "var": var, "offset": offset, "then": then, "target": target, "eps": 1e-3}
    built = corrected(Symbol("mean", emit), Symbol("var", emit),
                      [Symbol(name, emit) for name in ("offset", "then", "target")], Symbol("eps", emit))
    want = corrected(mean, var, (offset, then, target), 1e-3)
    for got, expected in zip(built, want):
        np.testing.assert_allclose(evaluate(got.value, feeds), expected, rtol=1e-12)
    assert {op for op, _ in nodes} <= {"add", "sub", "mul", "div", "sqrt"}
    with pytest.raises(ValueError, match="square roots only"):
        Symbol("x", emit) ** 2


def test_eval_mode_keeps_to_its_limit_on_passes_probe_and_retries_included():
    chunks = [X[i:i + 50] for i in range(0, len(X), 50)]
    for limit in range(2, 12):
        outcome = run(Chaotic(), calibration(chunks), mode="eval", tol=1e-9, max_passes=limit)
        assert outcome.passes <= limit, (limit, outcome.passes)


def test_eval_passes_join_batches_into_larger_forwards_and_reach_the_same_fixed_point_in_fewer_passes():
    """After the PreciseBN start (at the caller's batches), eval mode's passes join consecutive batches: the
    fixed point does not depend on batching, and larger forwards shrink the batch-to-batch spread that limits
    its corrected passes. By default as many samples as the memory budget holds (here: all of them)."""
    chunks = [X[i:i + 16] for i in range(0, len(X), 16)]
    seen = deep_chain(True)._forward(X, "train")[1]
    outcomes = {}
    for joined in (None, 48, 16):
        runner = deep_chain(True)
        outcomes[joined] = run(runner, calibration(chunks), mode="eval", tol=1e-6, eval_batch_size=joined)
        assert outcomes[joined].converged
        for name, x in seen.items():
            np.testing.assert_allclose(runner.graph.layer(name).mean, x.mean(0), atol=1e-5)
            np.testing.assert_allclose(runner.graph.layer(name).var, x.var(0), rtol=1e-5)
    assert outcomes[None].eval_batch == len(X) and outcomes[48].eval_batch == 48
    assert outcomes[None].passes < outcomes[48].passes <= outcomes[16].passes


def test_joined_batches_keep_their_samples_order_and_structure():
    from bnrepair.data.stream import Batch, Joined

    torch = pytest.importorskip("torch")
    parts = [{"x": torch.arange(6.0).reshape(3, 2) + 10 * k, "flag": True} for k in range(3)]
    got = list(Joined(calibration(parts), 7))
    assert [b.size for b in got] == [6, 3]
    assert torch.equal(got[0].inputs["x"], torch.cat([parts[0]["x"], parts[1]["x"]])) and got[0].inputs["flag"]
    tuples = list(Joined([Batch((X[:5], X[5:10]), np.arange(5)), Batch((X[10:12], X[12:14]), np.arange(2))], 100))
    assert len(tuples) == 1 and len(tuples[0].inputs) == 2
    np.testing.assert_array_equal(tuples[0].inputs[1], np.concatenate([X[5:10], X[12:14]]))
    np.testing.assert_array_equal(tuples[0].labels, [0, 1, 2, 3, 4, 0, 1])

"""Folding real Keras models: every pattern folds exactly, every refusal is refused with its reason,
the folded model saves and loads, and its ONNX export matches Keras in onnxruntime."""

import numpy as np
import pytest

import bnrepair
from bnrepair.frameworks.tf_runtime import import_keras

onnx = pytest.importorskip("onnx", reason="folding tests export ONNX: pip install '.[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="folding tests run ONNX: pip install '.[onnx]'")
keras, tf = import_keras()
L = keras.layers
numpy = keras.ops.convert_to_numpy
FOLDED_2D = {"bn_conv": "backward", "bn_dw": "backward", "bn_grp": "backward", "bn_sep": "backward",
             "bn_tr": "backward", "bn_cat": "concat", "bn_fwd": "forward"}
REFUSED_2D = {"bn_act": "activation relu_a (ReLU) sits between conv_a and BN",
              "bn_fused": "conv_f applies activation 'relu'",
              "bn_shared": "the output of conv_s is also used by",
              "bn_pad": "conv_p pads its input",
              "bn_fgrp": "conv_g has groups=2"}
FOLDED_ND = {"bn_c1": "backward", "bn_t1": "backward", "bn_c3": "backward", "bn_dense": "backward",
             "bn_dfwd": "forward", "bn_cf": "backward"}
REFUSED_ND = {"bn_axis": "BN acts on axis 1 but dense_r's channels are on axis 2"}


def randomise_bn(model, seed=0):
    """Statistics and affine far from 0 / 1, so a wrong fold cannot hide."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, L.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, c).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 2, c).astype(np.float32))
            layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype(np.float32))
            layer.beta.assign(rng.normal(0, 0.5, c).astype(np.float32))
    return model


def zoo_2d():
    """One branch per 2-D pattern, all from one input, one output each."""
    keras.utils.set_random_seed(0)
    x = keras.Input((8, 8, 4), name="image")

    def bn(name):
        return L.BatchNormalization(name=name)

    outs = [
        bn("bn_conv")(L.Conv2D(6, 3, padding="same", use_bias=True, name="conv_b")(x)),
        bn("bn_dw")(L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(x)),
        bn("bn_grp")(L.Conv2D(6, 3, groups=2, padding="same", use_bias=False, name="grouped")(x)),
        bn("bn_sep")(L.SeparableConv2D(5, 3, padding="same", name="sep")(x)),
        bn("bn_tr")(L.Conv2DTranspose(3, 3, strides=2, padding="same", name="tr")(x)),
        bn("bn_cat")(L.Concatenate(name="cat")([L.Conv2D(3, 1, name="cat_a")(x),
                                                L.Conv2D(2, 3, padding="same", name="cat_b")(x)])),
        L.Conv2D(4, 3, name="after_fwd")(bn("bn_fwd")(x)),
        bn("bn_act")(L.ReLU(name="relu_a")(L.Conv2D(4, 3, padding="same", name="conv_a")(x))),
        bn("bn_fused")(L.Conv2D(4, 3, padding="same", activation="relu", name="conv_f")(x)),
    ]
    shared = L.Conv2D(4, 3, padding="same", name="conv_s")(x)
    outs += [bn("bn_shared")(shared), L.Add(name="also")([shared, x])]
    relu = L.ReLU(name="relu_in")(x)
    outs += [L.Conv2D(4, 3, padding="same", name="conv_p")(bn("bn_pad")(relu)),
             L.Conv2D(4, 3, groups=2, name="conv_g")(bn("bn_fgrp")(relu))]
    return randomise_bn(keras.Model(x, outs, name="zoo_2d"))


def zoo_nd():
    """1-D, 3-D, dense, forward into dense, channels_first, and a dense whose channels BN does not act on."""
    keras.utils.set_random_seed(1)
    x = keras.Input((4, 4, 4, 2), name="volume")
    seq = L.Reshape((16, 8), name="as_seq")(x)
    flat = L.Flatten(name="flat")(x)
    outs = [
        L.BatchNormalization(name="bn_c1")(L.Conv1D(5, 3, padding="same", name="c1")(seq)),
        L.BatchNormalization(name="bn_t1")(L.Conv1DTranspose(4, 2, strides=3, padding="same", name="t1")(seq)),
        L.BatchNormalization(name="bn_c3")(L.Conv3D(3, 2, use_bias=False, name="c3")(x)),
        L.BatchNormalization(name="bn_dense")(L.Dense(6, name="dense")(flat)),
        L.Dense(3, name="dense_fwd")(L.BatchNormalization(name="bn_dfwd")(L.ReLU(name="relu_f")(flat))),
        L.BatchNormalization(axis=1, name="bn_cf")(
            L.Conv2D(4, (3, 1), data_format="channels_first", name="conv_cf")(L.Reshape((8, 8, 2), name="cf")(x))),
        L.BatchNormalization(axis=1, name="bn_axis")(L.Dense(5, name="dense_r")(seq)),
    ]
    return randomise_bn(keras.Model(x, outs, name="zoo_nd"), seed=1)


@pytest.fixture(scope="module", params=["2d", "nd"])
def case(request):
    model = zoo_2d() if request.param == "2d" else zoo_nd()
    x = np.random.default_rng(2).random((16, *model.inputs[0].shape[1:]), dtype=np.float32)
    report = bnrepair.fold(model, data=x, batch_size=8)
    expected = (FOLDED_2D, REFUSED_2D, "grouped") if request.param == "2d" else (FOLDED_ND, REFUSED_ND, "c3")
    return model, x, report, expected


def test_each_pattern_folds_and_each_refusal_is_refused(case):
    _, _, report, (folded, refused, _) = case
    assert {row.bn: row.how for row in report.folded} == folded
    reasons = {r.bn: r.reason for r in report.refused}
    assert set(reasons) == set(refused)
    for name, reason in refused.items():
        assert reason in reasons[name]
    left = {layer.name for layer in report.model._flatten_layers(include_self=False)
            if isinstance(layer, L.BatchNormalization)}
    assert left == set(refused)


def test_folded_outputs_match_within_1e5(case):
    model, x, report, _ = case
    fresh = np.random.default_rng(3).normal(0, 1, x.shape).astype(np.float32)
    for inputs in (x, fresh):
        before, after = model(inputs, training=False), report.model(inputs, training=False)
        scale = max(float(np.max(np.abs(numpy(b)))) for b in before)
        assert 0.3 < scale < 30
        assert max(float(np.max(np.abs(numpy(a) - numpy(b)))) for a, b in zip(after, before)) <= 1e-5
    assert all(row.max_abs <= 1e-5 for row in report.folded)


def test_gained_bias_and_refused_layers_untouched(case):
    model, _, report, (_, refused, unbiased) = case
    assert report.model.get_layer(unbiased).use_bias and not model.get_layer(unbiased).use_bias
    for name in refused:
        for a, b in zip(report.model.get_layer(name).weights, model.get_layer(name).weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("fold", [False, True])
def test_onnx_of_every_layer_kind_matches_keras(case, tmp_path, fold):
    model, x, _, (folded, refused, _) = case
    report = bnrepair.export(model, tmp_path / "zoo.onnx", fold=fold, data=x, batch_size=8)
    proto = onnx.load(tmp_path / "zoo.onnx")
    batch_norms = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    assert batch_norms == (len(refused) if fold else len(folded) + len(refused))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image" if "image" in [i.name for i in session.get_inputs()] else "volume": x[:5]})
    want = model(x[:5], training=False)
    assert max(float(np.max(np.abs(g - numpy(w)))) for g, w in zip(got, want)) <= 1e-4
    assert all(c.max_abs <= 1e-4 for c in report.checks)


def test_save_and_reload_h5_and_keras(case, tmp_path):
    model, x, _, (_, refused, _) = case
    for suffix in (".h5", ".keras"):
        path = tmp_path / f"folded{suffix}"
        bnrepair.fold(model, path, data=x, batch_size=8)
        loaded = keras.models.load_model(path, compile=False)
        bns = [layer.name for layer in loaded._flatten_layers(include_self=False)
               if isinstance(layer, L.BatchNormalization)]
        assert set(bns) == set(refused)
        for a, b in zip(loaded(x, training=False), model(x, training=False)):
            assert float(np.max(np.abs(numpy(a) - numpy(b)))) <= 1e-5


def test_fixture_folds_on_its_calibration_images(tmp_path):
    from fixtures import synthetic

    source = synthetic.folder("a", "calib").parent.parent.parent / "keras" / "nested.keras"
    report = bnrepair.fold(source, tmp_path / "nested.keras", data=synthetic.folder("a", "calib"), samples=32)
    assert {row.bn for row in report.folded} == {"bn1", "block/block_bn"} and not report.refused
    original = bnrepair.load(source).model
    x = synthetic.load_split("a", "calib")[0][:64].astype(np.float32) / 255.0
    got = keras.models.load_model(tmp_path / "nested.keras", compile=False)(x, training=False)
    assert float(np.max(np.abs(numpy(got) - numpy(original(x, training=False))))) <= 1e-5


def test_bn_folds_through_dropout(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = L.BatchNormalization(name="bn")(L.Dropout(0.3)(L.Conv2D(4, 3, name="conv")(inputs)))
    model = keras.Model(inputs, L.GlobalAveragePooling2D()(x))
    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.linspace(-1, 1, 4).astype(np.float32))
    bn.moving_variance.assign(np.linspace(0.5, 2, 4).astype(np.float32))
    x = np.random.default_rng(0).normal(0, 1, (8, 8, 8, 3)).astype(np.float32)
    report = bnrepair.fold(model, tmp_path / "folded.keras", data=x)
    assert [row.bn for row in report.folded] == ["bn"] and not report.refused
    folded = keras.models.load_model(tmp_path / "folded.keras", compile=False)
    assert not any(isinstance(layer, L.BatchNormalization) for layer in folded.layers)
    np.testing.assert_allclose(numpy(folded(x, training=False)), numpy(model(x, training=False)), atol=1e-5)


def test_preprocessing_layers_cropping_and_operations_export_as_keras_computes_them(tmp_path):
    """keras.applications' own pieces: Rescaling and Normalization up front (EfficientNet), Cropping2D (NASNet),
    and Keras 3 operations on a tensor and a number (MobileNetV3's hard-swish ``relu6(x + 3) * (1 / 6)``, which
    are not layers and once crashed folding and export); a model whose Add layer shares its class name with the
    operation."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 12, 3))
    norm = L.Normalization(mean=[0.5, -1.0, 2.0], variance=[4.0, 0.25, 1.0])
    x = norm(L.Rescaling(1 / 127.5, offset=-1.0)(inputs))
    x = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, padding="same", name="conv")(x))
    x = L.Cropping2D(((1, 2), (0, 3)))(x)
    swish = L.Multiply()([x, L.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)])
    model = keras.Model(inputs, L.GlobalAveragePooling2D()(L.Add()([swish, x])))
    randomise_bn(model)
    data = np.random.default_rng(0).uniform(0, 255, (8, 12, 12, 3)).astype(np.float32)
    for fold in (False, True):
        report = bnrepair.export(model, tmp_path / f"fold{fold}.onnx", fold=fold, data=data, batch_size=4)
        assert [row.bn for row in report.folded] == (["bn"] if fold else [])
        session = ort.InferenceSession(str(tmp_path / f"fold{fold}.onnx"), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: data})[0]
        np.testing.assert_allclose(got, numpy(model(data, training=False)), atol=1e-4, rtol=1e-4)


def test_a_masked_sequence_exports_with_its_mask(tmp_path):
    """Masking -> Dense -> BN -> GlobalAveragePooling1D: Keras records the mask as operations (NotEqual, Any) and
    averages only the unmasked steps. Padded sequences, so the mask changes the result: an average over every
    step would differ."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((10, 5))
    x = L.BatchNormalization(name="bn")(L.Dense(6, name="dense")(L.Masking(0.0)(inputs)))
    model = keras.Model(inputs, L.Dense(3, name="head")(L.GlobalAveragePooling1D()(x)))
    randomise_bn(model)
    rng = np.random.default_rng(0)
    data = rng.normal(0, 1, (8, 10, 5)).astype(np.float32)
    for i, length in enumerate(rng.integers(3, 10, 8)):
        data[i, length:] = 0.0  # padding
    want = numpy(model(data, training=False))
    unmasked = keras.Model(inputs, model.get_layer("head")(L.GlobalAveragePooling1D()(
        model.get_layer("bn")(model.get_layer("dense")(inputs)))))
    assert not np.allclose(numpy(unmasked(data, training=False)), want, atol=1e-3)
    for fold in (False, True):
        report = bnrepair.export(model, tmp_path / f"fold{fold}.onnx", fold=fold, data=data, batch_size=4)
        assert [row.bn for row in report.folded] == (["bn"] if fold else [])
        session = ort.InferenceSession(str(tmp_path / f"fold{fold}.onnx"), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: data})[0]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@keras.saving.register_keras_serializable(package="bnrepair_test")
class Doubled(L.Layer):
    """A custom layer, as a user's model loaded with --custom-objects has."""

    def call(self, x):
        return x * 2.0


def test_layers_the_emitter_lacks_export_through_tf2onnx(tmp_path):
    """RandomFlip / RandomRotation (the identity at inference), UpSampling2D, LayerNormalization and a custom
    layer: bnrepair's emitter has none of them, so tf2onnx converts the model's inference function; the BN still
    folds, and the ONNX computes what Keras computes."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = L.RandomRotation(0.1)(L.RandomFlip()(inputs))
    x = L.BatchNormalization(name="bn")(L.Conv2D(8, 3, padding="same", name="conv")(x))
    x = L.LayerNormalization()(Doubled()(L.UpSampling2D()(x)))
    model = randomise_bn(keras.Model(inputs, L.GlobalAveragePooling2D()(x)))
    data = np.random.default_rng(0).random((8, 16, 16, 3), dtype=np.float32)
    report = bnrepair.export(model, tmp_path / "m.onnx", fold=True, data=data, batch_size=4)
    assert [(row.bn, row.how) for row in report.folded] == [("bn", "backward")]
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert "BatchNormalization" not in [n.op_type for n in proto.graph.node]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: data})[0]
    want = numpy(model(data, training=False))
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=1e-4)

"""Model folders as timm and Hugging Face transformers save them, built from configs with random weights (nothing
downloaded), statistics broken on purpose, recalibrated with no --arch on an image folder of odd-sized images.

The reference is independent: each library's own image transform applied here, the library's own model in float64,
torch's training-mode BN over the whole set as one batch (the run uses one batch too, so no order to match). The
output must load with the library's own loader, and every other file and tensor must be unchanged."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from bnrepair.cli import app
from fixtures import needs

timm = needs("timm", "pip install torch==2.14.1 torchvision==0.29.1 timm")
transformers = needs("transformers", "pip install transformers")

cli = CliRunner()
COUNT = 24


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Smooth random images of several sizes and aspect ratios, in two class folders."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(COUNT):
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(folder / f"{i}.png")
    return root


def pil_images(root):
    return [Image.open(p).convert("RGB") for p in sorted(root.rglob("*.png"))]


def broken(model):
    """Statistics far from any data's."""
    rng = np.random.default_rng(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.as_tensor(rng.normal(0, 3, m.num_features)))
                m.running_var.copy_(torch.as_tensor(rng.uniform(5, 9, m.num_features)))
    return model


def reference(model, x: torch.Tensor) -> dict:
    """Every BN's mean and unbiased variance of its input over the batch ``x``, in float64, BN layers in training
    mode (the batch's own statistics) and the rest in eval mode."""
    model = model.double().eval()
    seen = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train()
            m.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, args[0]))
    with torch.no_grad():
        model(x.double())
    want = {}
    for name, inputs in seen.items():
        flat = inputs.transpose(0, 1).reshape(inputs.shape[1], -1)
        want[f"{name}.running_mean"], want[f"{name}.running_var"] = flat.mean(1), flat.var(1)
    return want


def assert_within(got: dict, want: dict, std_tol=1e-4):
    assert want and set(want) <= set(got)
    for name in want:
        if name.endswith("running_mean"):
            std = want[name.replace("running_mean", "running_var")].sqrt()
            assert ((got[name].double() - want[name]).abs() / std).max() <= std_tol, name
        else:
            assert ((got[name].double() - want[name]).abs() / want[name]).max() <= 2 * std_tol, name


def assert_only_bn_changed(source, output, changed_shards=None):
    """Every file byte-identical except weight files, whose tensors other than BN statistics are identical."""
    names = sorted(p.name for p in source.iterdir())
    assert sorted(p.name for p in output.iterdir()) == names
    for name in names:
        if not name.endswith(".safetensors"):
            assert (source / name).read_bytes() == (output / name).read_bytes(), name
            continue
        before, after = load_file(source / name), load_file(output / name)
        assert list(before) == list(after)
        differ = [k for k in before if not torch.equal(before[k], after[k])]
        assert all(k.endswith(("running_mean", "running_var")) for k in differ), differ
        if changed_shards is not None:
            assert bool(differ) == (name in changed_shards), name


def recalibrate(folder, images, tmp_path, *flags):
    out = tmp_path / "fixed"
    report = tmp_path / "r.json"
    done = cli.invoke(app, ["recalibrate", str(folder), "-d", str(images), "-o", str(out), "-b", str(COUNT),
                            "--json", str(report), *flags])
    assert done.exit_code == 0, done.output
    return out, json.loads(report.read_text()), done.output


def hf_resnet(tmp_path, labels=2, **save):
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                                       num_labels=labels)
    torch.manual_seed(0)
    model = broken(transformers.ResNetForImageClassification(config).eval())
    folder = tmp_path / "hf"
    model.save_pretrained(folder, **save)
    processor = transformers.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875)
    processor.save_pretrained(folder)
    return folder


def test_a_hugging_face_folder_is_recalibrated_with_its_own_image_processor(tmp_path, images):
    folder = hf_resnet(tmp_path)
    out, report, said = recalibrate(folder, images, tmp_path)
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    x = torch.as_tensor(processor(images=pil_images(images), return_tensors="np")["pixel_values"])
    assert x.shape[-2:] == (32, 32)  # shortest edge 32 / 0.875, then the centre crop
    want = reference(transformers.ResNetForImageClassification.from_pretrained(folder), x)
    fixed = transformers.ResNetForImageClassification.from_pretrained(out)  # the library's own loader takes it
    assert_within(fixed.state_dict(), want)
    assert_only_bn_changed(folder, out)
    used = report["run"]["preprocessing"]
    assert used["name"].startswith("transformers ConvNextImageProcessor") and "preprocessor_config.json" in \
        used["source"]
    assert "preprocessing: transformers ConvNextImageProcessor" in said


def test_a_sharded_folder_rewrites_only_the_shards_that_hold_bn_statistics(tmp_path, images):
    folder = hf_resnet(tmp_path, labels=2000, max_shard_size="20KB")  # the 128 KB classifier: a shard of its own
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    out, _, _ = recalibrate(folder, images, tmp_path)
    holding = {file for name, file in index.items() if name.endswith(("running_mean", "running_var"))}
    assert_only_bn_changed(folder, out, changed_shards=holding)
    assert set(index.values()) - holding  # some shard held no statistics, and was copied unchanged
    transformers.ResNetForImageClassification.from_pretrained(out)


def test_a_timm_folder_is_recalibrated_with_its_declared_transform(tmp_path, images):
    """resnet18 declaring a 64-pixel input, crop_pct 0.875 and ImageNet mean / std in its pretrained_cfg."""
    torch.manual_seed(0)
    model = broken(timm.create_model("resnet18", pretrained=False, num_classes=3,
                                     pretrained_cfg_overlay={"input_size": (3, 64, 64), "crop_pct": 0.875}).eval())
    folder = tmp_path / "timm"
    timm.models.save_for_hf(model, folder, safe_serialization=True)
    out, report, said = recalibrate(folder, images, tmp_path)
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 64, 64) and data["crop_pct"] == 0.875
    transform = timm.data.create_transform(**data)
    x = torch.stack([transform(im) for im in pil_images(images)])
    rebuilt = timm.create_model(f"local-dir:{folder}", pretrained=True)
    fixed = timm.create_model(f"local-dir:{out}", pretrained=True)  # timm's own loader takes the output
    assert_within(fixed.state_dict(), reference(rebuilt, x))
    assert_only_bn_changed(folder, out)
    assert report["run"]["preprocessing"]["source"] == "declared by the model in config.json (pretrained_cfg)"
    assert "centre crop 64" in said


def test_the_user_names_the_preprocessing_over_what_the_model_declares(tmp_path, images):
    folder = hf_resnet(tmp_path)
    _, report, said = recalibrate(folder, images, tmp_path, "--preprocess", "imagenet", "--image-size", "32", "32")
    assert report["run"]["preprocessing"] == {"name": "imagenet", "source": "named by the user with --preprocess"}
    assert "preprocessing: imagenet (named by the user with --preprocess)" in said


def configured(folder, **entries):
    """The folder's config.json with ``entries`` set."""
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **entries}))


@pytest.mark.parametrize("change, message", [
    (lambda f: configured(f, architectures=["NoSuchNet"]),
     "config.json: names architecture 'NoSuchNet', which transformers {version} does not have"),
    (lambda f: configured(f, auto_map={"AutoModelForImageClassification": "mine.ResNetForImageClassification"}),
     "config.json: ResNetForImageClassification is the repository's own code (auto_map); building it runs that "
     "code: pass --trust-code if you trust the folder"),
    (lambda f: sorted(f.glob("model-*.safetensors"))[-1].unlink(),
     "model.safetensors.index.json: names shard {last}, which is missing"),
])
def test_a_folder_that_cannot_be_built_is_one_line(tmp_path, images, change, message):
    folder = hf_resnet(tmp_path, max_shard_size="20KB")
    last = sorted(p.name for p in folder.glob("model-*.safetensors"))[-1]
    change(folder)
    done = cli.invoke(app, ["recalibrate", str(folder), "-d", str(images), "-o", str(tmp_path / "out")])
    assert done.exit_code == 2
    expected = message.format(version=transformers.__version__, last=last)
    assert done.output.strip() == f"error: {folder}/{expected}", done.output
    assert not (tmp_path / "out").exists()


def test_sharded_state_dict_weights_without_a_config_take_arch(tmp_path, images):
    """A folder of safetensors shards and their index, as ``save_torch_state_dict`` writes a plain state_dict: the
    module comes from --arch, and only the shards holding BN statistics change."""
    from huggingface_hub import save_torch_state_dict

    (tmp_path / "net.py").write_text(NET)
    namespace = {}
    exec(NET, namespace)
    model = broken(namespace["build"]())
    folder = tmp_path / "shards"
    folder.mkdir()
    save_torch_state_dict(model.state_dict(), folder, max_shard_size="4KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2
    out, _, _ = recalibrate(folder, images, tmp_path, "--arch", f"{tmp_path / 'net.py'}:build", "--image-size",
                            "32", "32")
    holding = {file for name, file in index.items() if name.endswith(("running_mean", "running_var"))}
    assert_only_bn_changed(folder, out, changed_shards=holding)
    x = torch.stack([torch.as_tensor(np.asarray(im.resize((32, 32), Image.BILINEAR), np.float32) / 255)
                     for im in pil_images(images)]).permute(0, 3, 1, 2)  # the default: unit scale after the resize
    fixed = namespace["build"]()
    fixed.load_state_dict({k: v for f in set(index.values()) for k, v in load_file(out / f).items()})
    assert_within(fixed.state_dict(), reference(model, x))


NET = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 40))
"""


def test_a_hugging_face_resnet_folds_inside_the_module_fx_cannot_trace(tmp_path, images):
    """ResNetForImageClassification's embeddings check their input's channel count in Python (control flow on a
    shape), which torch.fx cannot trace: that sub-module is kept as one call and folded inside, through the
    sub-module it calls (traced on the input it is called with); every BN folds, and the ONNX computes what
    transformers computes in float64."""
    import onnx
    import onnxruntime as ort

    folder = hf_resnet(tmp_path)
    report_path = tmp_path / "f.json"
    done = cli.invoke(app, ["fold", str(folder), "-d", str(images), "-o", str(tmp_path / "f.onnx"), "--json",
                            str(report_path), "-q"])
    assert done.exit_code == 0, done.output
    report = json.loads(report_path.read_text())
    assert len(report["folded"]) == 6 and report["refused"] == []
    assert "resnet.embedder.embedder.normalization" in [r["bn"] for r in report["folded"]]
    proto = onnx.load(str(tmp_path / "f.onnx"))
    assert "BatchNormalization" not in [n.op_type for n in proto.graph.node]
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    x = processor(images=pil_images(images)[:4], return_tensors="np")["pixel_values"].astype(np.float32)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    model = transformers.ResNetForImageClassification.from_pretrained(folder).double().eval()
    with torch.no_grad():
        want = model(torch.as_tensor(x, dtype=torch.float64)).logits.numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()

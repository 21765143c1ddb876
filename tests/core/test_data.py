"""Calibration sources and the batch stream: lazy decoding, seeds, labels, scaling and errors."""

import numpy as np
import pytest
from PIL import Image

from bnrepair.data import Calibration, ImageFolder, ImageSpec, image_spec, open_source
from bnrepair.data.preprocess import scale_pixels
from bnrepair.data.stream import Cached
from bnrepair.errors import InputError
from bnrepair.graph import ModelGraph
from bnrepair.options import DataOptions
from fixtures import needs


def write_images(root, n, size=(10, 12), classes=("cat", "dog"), mode="RGB"):
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / classes[i % len(classes)] if classes else root
        folder.mkdir(parents=True, exist_ok=True)
        shape = (size[0], size[1], 3) if mode == "RGB" else size
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")


def test_image_folder_labels_size_channels_layout(tmp_path):
    write_images(tmp_path, 6)
    folder = ImageFolder(tmp_path, ImageSpec(size=(8, 8), channels=1, preprocess="raw", channels_first=True))
    assert folder.classes == ["cat", "dog"] and sorted(folder.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    x = folder.sample(0)
    assert x.shape == (1, 8, 8) and x.dtype == np.float32 and x.max() > 1


def test_stream_is_seeded_batched_and_complete(tmp_path):
    x = np.arange(50, dtype=np.float32).reshape(10, 5)
    np.save(tmp_path / "x.npy", x)
    source = open_source(tmp_path / "x.npy", ImageSpec())
    first = [b.inputs for b in Calibration(source, batch_size=4, seed=3)]
    again = [b.inputs for b in Calibration(source, batch_size=4, seed=3)]
    other = [b.inputs for b in Calibration(source, batch_size=4, seed=4)]
    assert [len(b) for b in first] == [4, 4, 2]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))
    np.testing.assert_array_equal(np.sort(np.concatenate(first)[:, 0]), x[:, 0])
    assert len(Calibration(source, batch_size=4, samples=3)) == 3
    with pytest.raises(InputError, match="--seed must be an integer >= 0, got -1"):
        Calibration(source, seed=-1)  # numpy's own refusal was a traceback


@pytest.mark.parametrize("preprocess, channels_first", [("imagenet", True), ("caffe", False)])
def test_the_cache_keeps_decoded_pixels_and_gives_the_same_inputs(tmp_path, preprocess, channels_first):
    write_images(tmp_path, 10, size=(8, 8))
    stream = Calibration(ImageFolder(tmp_path, ImageSpec(size=(8, 8), preprocess=preprocess,
                                                         channels_first=channels_first)), batch_size=4)
    cached = Cached(stream)
    assert all(b.inputs.dtype == np.uint8 and b.inputs.shape[1:] == (8, 8, 3) for b in cached.batches)
    assert stream.decoded_bytes() == sum(b.inputs.nbytes for b in cached.batches) == 10 * 8 * 8 * 3
    for kept, fresh in zip(cached, stream):
        assert kept.inputs.shape == fresh.inputs.shape and kept.inputs.dtype == np.float32
        assert kept.inputs.tobytes() == fresh.inputs.tobytes() and np.array_equal(kept.labels, fresh.labels)
    # and each sample is what an independent reading of its file gives
    first = next(iter(stream))
    files = sorted(tmp_path.rglob("*.png"))
    expected = scale_pixels(np.asarray(Image.open(files[int(stream.order[0])]).convert("RGB")), preprocess)
    np.testing.assert_array_equal(first.inputs[0], expected.transpose(2, 0, 1) if channels_first else expected)


def test_npz_takes_x_and_y_or_its_only_array(tmp_path):
    np.savez(tmp_path / "xy.npz", x=np.ones((4, 2)), y=np.arange(4))
    np.savez(tmp_path / "one.npz", data=np.ones((3, 2)))
    np.savez(tmp_path / "two.npz", a=np.ones((3, 2)), b=np.ones((3, 2)))
    assert open_source(tmp_path / "xy.npz", ImageSpec()).labels.tolist() == [0, 1, 2, 3]
    assert len(open_source(tmp_path / "one.npz", ImageSpec())) == 3
    with pytest.raises(InputError, match="two.npz.*name the samples 'x'"):
        open_source(tmp_path / "two.npz", ImageSpec())


def test_errors_name_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no images found"):
        open_source(tmp_path / "empty", ImageSpec())
    write_images(tmp_path / "imgs", 4, classes=())
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    stream = Calibration(open_source(tmp_path / "imgs", ImageSpec(size=(8, 8))), batch_size=2)
    with pytest.raises(InputError, match="broken.png: cannot decode image"):
        list(stream)
    skipping = Calibration(open_source(tmp_path / "imgs", ImageSpec(size=(8, 8))), batch_size=2, skip_bad=True)
    assert sum(len(b.inputs) for b in skipping) == 4 and len(skipping.bad) == 1
    np.save(tmp_path / "nan.npy", np.array([[1.0], [np.nan]]))
    with pytest.raises(InputError, match=r"nan.npy\[1\]: sample holds NaN"):
        list(Calibration(open_source(tmp_path / "nan.npy", ImageSpec())))
    np.save(tmp_path / "one.npy", np.ones((1, 3)))
    with pytest.raises(InputError, match="at least 2 calibration samples"):
        Calibration(open_source(tmp_path / "one.npy", ImageSpec()))


def test_preprocess_modes():
    px = np.full((1, 1, 3), 255, np.uint8)
    assert scale_pixels(px, "unit").max() == 1.0
    assert scale_pixels(px, "tf").max() == 1.0
    assert scale_pixels(px, "raw").max() == 255.0
    np.testing.assert_allclose(scale_pixels(px, "caffe")[0, 0], 255 - np.array([103.939, 116.779, 123.68]), rtol=1e-6)
    np.testing.assert_allclose(scale_pixels(px, "imagenet")[0, 0], (1 - np.array([0.485, 0.456, 0.406]))
                               / np.array([0.229, 0.224, 0.225]), rtol=1e-6)


def test_sixteen_bit_greyscale_keeps_its_range(tmp_path):
    """Pillow's convert clips 16-bit values at 255 (every pixel above 255 turned white); the reference is the
    stored value over 65535."""
    values = (np.arange(12 * 10).reshape(12, 10) * 547).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    grey = ImageFolder(tmp_path, ImageSpec(channels=1)).sample(0)
    np.testing.assert_allclose(grey[:, :, 0], values / 65535.0, rtol=1e-6)
    rgb = ImageFolder(tmp_path, ImageSpec(channels=3, preprocess="raw")).sample(0)
    np.testing.assert_allclose(rgb, np.repeat(values[:, :, None] / 257.0, 3, axis=2), rtol=1e-6)
    resized = ImageFolder(tmp_path, ImageSpec(size=(6, 5), channels=1)).sample(0)
    assert resized.shape == (6, 5, 1) and 0.3 < resized.max() <= 1.0  # not clipped to 255/65535


def test_an_image_past_the_pixel_limit_is_refused_before_decoding(tmp_path):
    """12000 x 12000 is 1.6x Pillow's limit: Pillow only warns there and decodes 144 Mpx from a small file."""
    Image.new("1", (12000, 12000)).save(tmp_path / "wide.png")
    assert (tmp_path / "wide.png").stat().st_size < 1 << 20
    with pytest.raises(InputError, match=r"wide.png: cannot decode image \(12000x12000 pixels, more than the "
                                         rf"{Image.MAX_IMAGE_PIXELS} of Pillow's decompression-bomb limit\)"):
        ImageFolder(tmp_path, ImageSpec(size=(8, 8))).sample(0)


def test_uncompressed_npz_is_read_lazily_and_compressed_within_memory(tmp_path):
    x = np.random.default_rng(0).random((40, 4, 4, 3), dtype=np.float32)
    np.savez(tmp_path / "plain.npz", x=x, y=np.arange(40))
    np.savez_compressed(tmp_path / "packed.npz", x=x)
    plain = open_source(tmp_path / "plain.npz", ImageSpec())
    assert isinstance(plain.x, np.memmap)  # only the samples drawn are read, as from a .npy
    np.testing.assert_array_equal(np.stack([plain.sample(i) for i in range(40)]), x)
    assert plain.labels.tolist() == list(range(40))
    np.testing.assert_array_equal(open_source(tmp_path / "packed.npz", ImageSpec()).x, x)
    with open(tmp_path / "upper.NPY", "wb") as f:
        np.save(f, x)
    assert len(open_source(tmp_path / "upper.NPY", ImageSpec())) == 40  # suffixes are case-insensitive


def npz_declaring(path, shape, compression):
    """An .npz whose member's header declares ``shape`` while it holds a few bytes."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_2_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", compression) as z:
        z.writestr("x.npy", header.getvalue() + bytes(64))


def test_an_npz_member_cannot_declare_more_than_memory_or_its_bytes(tmp_path):
    import zipfile

    npz_declaring(tmp_path / "bomb.npz", (10**9, 32, 32, 3), zipfile.ZIP_DEFLATED)
    with pytest.raises(InputError, match=r"bomb.npz: array 'x' of shape \(1000000000, 32, 32, 3\) declares "
                                         r"1.14e\+04 GiB once read, more than the .* GiB of memory available"):
        open_source(tmp_path / "bomb.npz", ImageSpec())
    npz_declaring(tmp_path / "short.npz", (1000, 32), zipfile.ZIP_STORED)
    with pytest.raises(InputError, match=r"short.npz: array 'x' declares shape \(1000, 32\), more than its \d+ "
                                         "bytes hold"):
        open_source(tmp_path / "short.npz", ImageSpec())


def test_decoding_threads_default_to_the_cpus_this_process_may_use(tmp_path):
    import os

    np.save(tmp_path / "x.npy", np.zeros((4, 2), np.float32))
    source = open_source(tmp_path / "x.npy", ImageSpec())
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert Calibration(source).workers == usable and Calibration(source, workers=3).workers == 3
    with pytest.raises(InputError, match="--workers must be at least 1, got 0"):
        Calibration(source, workers=0)


def test_fast_jpeg_decodes_at_a_reduced_scale_close_to_the_full_decode(tmp_path):
    """Pillow's draft: a 1024x768 JPEG for a 224x224 input is decoded at 512x384, then resized as always. The
    reference: the full decode with the same resize."""
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).resize((1024, 768), Image.BICUBIC)
    smooth.save(tmp_path / "big.jpg", quality=90)
    exact = ImageFolder(tmp_path, ImageSpec(size=(224, 224))).sample(0)
    fast = ImageFolder(tmp_path, ImageSpec(size=(224, 224), fast_jpeg=True)).sample(0)
    assert fast.shape == exact.shape and not np.array_equal(fast, exact)  # it did decode at another scale
    assert np.max(np.abs(fast.mean((0, 1)) - exact.mean((0, 1))) / exact.std((0, 1))) < 1e-2
    np.testing.assert_allclose(fast.std((0, 1)), exact.std((0, 1)), rtol=2e-2)


def test_named_presets_are_the_libraries_own_preprocessing(tmp_path):
    """keras:mobilenet_v2 is keras.applications' own preprocess_input after the plain resize; torchvision:WEIGHTS
    is that weights entry's own transform of the decoded image (resize of the short side, centre crop, mean/std)."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)).save(tmp_path / "odd.png")
    pil = Image.open(tmp_path / "odd.png").convert("RGB")
    keras = needs("keras", "pip install '.[keras]'")
    got = ImageFolder(tmp_path, ImageSpec(size=(32, 32), preprocess="keras:mobilenet_v2")).sample(0)
    resized = np.asarray(pil.resize((32, 32), Image.BILINEAR), np.float32)
    np.testing.assert_allclose(got, keras.applications.mobilenet_v2.preprocess_input(resized), rtol=1e-6)
    torchvision = needs("torchvision", "pip install torch==2.14.1 torchvision==0.29.1")
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    spec = image_spec(ModelGraph("torch", "m", [], channels_first=True),
                      DataOptions(preprocess="torchvision:ResNet18_Weights.IMAGENET1K_V1"))
    assert spec.source == "named by the user with --preprocess"
    got = ImageFolder(tmp_path, spec).sample(0)
    want = weights.transforms()(pil).numpy()
    assert got.shape == want.shape == (3, 224, 224)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(InputError, match=r"--preprocess keras:nosuch: keras has no such preset"):
        ImageSpec(preprocess="keras:nosuch")

"""Calibration sources and the batch stream: lazy decoding, seeds, labels, scaling and errors."""

import numpy as np
import pytest
from PIL import Image

from bnrepair.data import Calibration, ImageFolder, ImageSpec, open_source
from bnrepair.data.preprocess import scale_pixels
from bnrepair.errors import InputError


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

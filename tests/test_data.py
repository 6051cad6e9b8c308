"""Tests for fastntk_jax.data and scripts/make_embedded_subset.py."""

import importlib.util
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastntk_jax.data import (
    CIFAR10_CLASSES,
    load_cifar10_lossless,
    load_embedded_cifar10,
    read_cifar10_jpeg_zip,
    read_cifar10_jpeg_zip_with_names,
    shared_data_dir,
)

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "src" / "fastntk_jax" / "assets" / "cifar10_embedded.npz"


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# class -> rank -> solid colour; ranks 2 and 10 check numeric (not lexical) sorting.
_TINY = {
    "airplane": {10: (200, 10, 10), 2: (10, 200, 10)},
    "cat": {2: (10, 10, 200), 10: (240, 240, 240)},
}


def _make_zip(path: Path, extra_members: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("cifar10/", b"")
        for split in ("train", "test"):
            zf.writestr(f"cifar10/{split}/", b"")
            for cls, images in _TINY.items():
                zf.writestr(f"cifar10/{split}/{cls}/", b"")
                for rank, colour in images.items():
                    zf.writestr(f"cifar10/{split}/{cls}/{rank}.jpg", _jpeg(colour))
        for name in extra_members:
            zf.writestr(name, _jpeg((0, 0, 0)))
    return path


def test_embedded_shapes_dtypes_balance():
    x_train, y_train, x_test, y_test = load_embedded_cifar10()
    for x, y in ((x_train, y_train), (x_test, y_test)):
        assert x.shape == (1000, 32, 32, 3) and x.dtype == np.uint8
        assert y.shape == (1000,) and y.dtype == np.int32
        assert y.min() >= 0 and y.max() < 10
        np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, 100))
        assert 20 < x.mean() < 235  # real images, not blank
    with np.load(EMBEDDED, allow_pickle=False) as npz:  # no object arrays inside
        assert tuple(npz["label_names"]) == CIFAR10_CLASSES
        assert npz["train_files"].dtype.kind == "U" and npz["test_files"].dtype.kind == "U"
        assert npz["train_files"][0] == "cifar10/train/airplane/0000.jpg"
        assert npz["test_files"][-1] == "cifar10/test/truck/0099.jpg"


def test_read_tiny_zip(tmp_path):
    path = _make_zip(tmp_path / "tiny.zip")
    x, y, names = read_cifar10_jpeg_zip_with_names(path, "train")
    assert x.shape == (4, 32, 32, 3) and x.dtype == np.uint8
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, [0, 0, 3, 3])
    assert names == [
        "cifar10/train/airplane/2.jpg",
        "cifar10/train/airplane/10.jpg",
        "cifar10/train/cat/2.jpg",
        "cifar10/train/cat/10.jpg",
    ]
    expected = np.array([_TINY["airplane"][2], _TINY["airplane"][10], _TINY["cat"][2], _TINY["cat"][10]])
    np.testing.assert_allclose(x.mean(axis=(1, 2)), expected, atol=6)  # JPEG is lossy

    x1, y1 = read_cifar10_jpeg_zip(path, split="test", per_class=1)
    np.testing.assert_array_equal(y1, [0, 3])
    np.testing.assert_array_equal(x1, x[[0, 2]])


def test_read_zip_argument_errors(tmp_path):
    path = _make_zip(tmp_path / "tiny.zip")
    with pytest.raises(ValueError, match="split must be one of"):
        read_cifar10_jpeg_zip(path, split="val")
    with pytest.raises(ValueError, match="per_class"):
        read_cifar10_jpeg_zip(path, per_class=0)
    with pytest.raises(ValueError, match="per_class=3 but class 'airplane' has only 2"):
        read_cifar10_jpeg_zip(path, per_class=3)
    with pytest.raises(FileNotFoundError):
        read_cifar10_jpeg_zip(tmp_path / "absent.zip")


@pytest.mark.parametrize(
    "member, reason",
    [
        ("cifar10/train/../../evil.jpg", r"'\.\.' components"),
        ("/etc/evil.jpg", "absolute"),
        ("C:/evil.jpg", "absolute"),
    ],
)
def test_read_zip_rejects_escaping_members(tmp_path, member, reason):
    path = _make_zip(tmp_path / "evil.zip", extra_members=(member,))
    with zipfile.ZipFile(path) as zf:
        assert member in zf.namelist()  # stored verbatim, so the reader must refuse it
    with pytest.raises(ValueError, match=reason):
        read_cifar10_jpeg_zip(path)


def test_read_zip_malformed(tmp_path):
    not_zip = tmp_path / "data.zip"
    not_zip.write_bytes(b"this is not a zip archive" * 10)
    with pytest.raises(ValueError, match="not a valid zip archive"):
        read_cifar10_jpeg_zip(not_zip)

    wrong_layout = tmp_path / "layout.zip"
    with zipfile.ZipFile(wrong_layout, "w") as zf:
        zf.writestr("images/0000.jpg", _jpeg((1, 2, 3)))
    with pytest.raises(ValueError, match="no images for split 'train'"):
        read_cifar10_jpeg_zip(wrong_layout)

    bad_class = _make_zip(tmp_path / "class.zip", extra_members=("cifar10/train/unicorn/0000.jpg",))
    with pytest.raises(ValueError, match="unknown class folder 'unicorn'"):
        read_cifar10_jpeg_zip(bad_class)

    bad_image = tmp_path / "image.zip"
    with zipfile.ZipFile(bad_image, "w") as zf:
        zf.writestr("cifar10/train/cat/0000.jpg", b"not a jpeg")
    with pytest.raises(ValueError, match="cannot decode member 'cifar10/train/cat/0000.jpg'"):
        read_cifar10_jpeg_zip(bad_image)


def test_script_writes_plain_npz(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "make_embedded_subset", REPO / "scripts" / "make_embedded_subset.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "sub" / "subset.npz"
    script.main(["--zip", str(_make_zip(tmp_path / "tiny.zip")), "--per-class-train", "2",
                 "--per-class-test", "1", "--out", str(out)])
    assert [p.name for p in out.parent.iterdir()] == ["subset.npz"]  # no temp file left
    with np.load(out, allow_pickle=False) as npz:
        assert npz["x_train"].shape == (4, 32, 32, 3) and npz["y_train"].dtype == np.uint8
        np.testing.assert_array_equal(npz["y_test"], [0, 3])
        assert npz["test_files"].dtype.kind == "U"
        assert list(npz["test_files"]) == ["cifar10/test/airplane/2.jpg", "cifar10/test/cat/2.jpg"]


def test_shared_data_dir(shared_data):
    assert shared_data_dir() == shared_data


def test_lossless_subset(shared_data):
    x_train, y_train, x_test, y_test = load_cifar10_lossless(shared_data / "cifar10-lossless-subset.npz")
    assert x_train.shape == (4000, 32, 32, 3) and x_test.shape == (1000, 32, 32, 3)
    assert y_train.dtype == y_test.dtype == np.int32
    np.testing.assert_array_equal(
        np.bincount(y_test, minlength=10), [103, 89, 100, 103, 90, 86, 112, 102, 106, 109]
    )


def test_real_zip_matches_embedded(shared_data):
    x_train, y_train, x_test, y_test = load_embedded_cifar10()
    zip_path = shared_data / "cifar10-jpeg.zip"
    for split, x_emb, y_emb in (("train", x_train, y_train), ("test", x_test, y_test)):
        x, y = read_cifar10_jpeg_zip(zip_path, split, per_class=100)
        np.testing.assert_array_equal(x, x_emb)
        np.testing.assert_array_equal(y, y_emb)
    # The first k of each class are a prefix of the first 100 of each class.
    x5, y5 = read_cifar10_jpeg_zip(zip_path, "test", per_class=5)
    idx = np.concatenate([np.arange(5) + 100 * c for c in range(10)])
    np.testing.assert_array_equal(x5, x_test[idx])
    np.testing.assert_array_equal(y5, y_test[idx])

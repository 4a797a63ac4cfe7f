"""Tests for kdiga_core.data: built-ins, npz and zip loading (including malicious archives), batching."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdiga_core import data as D
from kdiga_core.errors import DataError, UnknownNameError

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- helpers


def _save_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _valid_arrays(n_train: int = 12, n_test: int = 6, nhwc: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (8, 8, 3) if nhwc else (3, 8, 8)
    return {
        "x_train": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "y_train": np.arange(n_train) % 3,
        "x_test": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "y_test": np.arange(n_test) % 3,
    }


def _png(size: tuple[int, int] = (8, 8), mode: str = "RGB", value: int = 128) -> bytes:
    buf = io.BytesIO()
    color = value if mode == "L" else (value, 0, 255 - value)
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)
    return path


def _folder_members(
    prefix: str = "data/", splits: tuple[str, ...] = ("train", "test"), per_class: int = 3, mode: str = "RGB"
) -> dict[str, bytes]:
    return {
        f"{prefix}{split}/{cls}/{i}.png": _png(mode=mode, value=40 * c + i)
        for split in splits
        for c, cls in enumerate(("cat", "dog"))
        for i in range(per_class)
    }


# ----------------------------------------------------------------------------- built-ins


def test_digits_is_deterministic_and_well_formed():
    a, b = D.load_builtin("digits"), D.load_dataset("digits")
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.summary() == {
        "num_classes": 10,
        "class_names": [str(i) for i in range(10)],
        "input_shape": [1, 8, 8],
        "train_size": 1347,
        "test_size": 450,
    }
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0
    # Stratified: every class appears in the test split.
    assert set(a.y_test.tolist()) == set(range(10))


def test_cifar_missing_directory_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError, match="put torchvision's extracted 'cifar-10-batches-py' folder there"):
        D.load_dataset("cifar10", tmp_path)
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(
        DataError, match="is incomplete or corrupted; replace the 'cifar-10-batches-py' folder"
    ):
        D.load_builtin("cifar10", tmp_path)
    with pytest.raises(DataError, match="no data directory"):
        D.load_builtin("cifar100")


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(
        UnknownNameError, match="valid names are: cifar10, cifar100, digits, image_folder_zip, npz"
    ):
        D.load_dataset("mnist")
    assert D.list_builtin_datasets() == ["cifar10", "cifar100", "digits"]
    with pytest.raises(DataError, match="Unknown option\\(s\\) for a 'npz' dataset: img_size."):
        D.load_dataset("npz", "x.npz", img_size=8)


def test_bundle_rejects_non_square_images():
    bundle = D.DataBundle(
        "x",
        torch.zeros(2, 1, 4, 5),
        torch.zeros(2, dtype=torch.long),
        torch.zeros(1, 1, 4, 5),
        torch.zeros(1, dtype=torch.long),
        2,
    )
    with pytest.raises(DataError, match="must be square"):
        _ = bundle.img_size


# ----------------------------------------------------------------------------- npz


def test_npz_uint8_nhwc_is_scaled_and_transposed(tmp_path):
    arrays = _valid_arrays()
    bundle = D.load_npz(_save_npz(tmp_path / "d.npz", **arrays))
    assert bundle.x_train.shape == (12, 3, 8, 8) and bundle.num_classes == 3
    expected = torch.from_numpy(arrays["x_train"].transpose(0, 3, 1, 2) / 255.0).float()
    assert bundle.x_train.dtype == torch.uint8  # kept 8-bit: 4x smaller than float32
    assert torch.allclose(D.pixels(bundle.x_train), expected)


def test_npz_float_nchw_with_metadata(tmp_path):
    arrays = _valid_arrays(nhwc=False)
    arrays["x_train"] = arrays["x_train"] / np.float32(255)
    arrays["x_test"] = arrays["x_test"] / np.float32(255)
    path = _save_npz(
        tmp_path / "d.npz", **arrays, num_classes=np.array(5), class_names=np.array(["a", "b", "c", "d", "e"])
    )
    bundle = D.load_dataset("npz", path)
    assert bundle.num_classes == 5 and bundle.class_names == ("a", "b", "c", "d", "e")
    assert bundle.summary()["input_shape"] == [3, 8, 8]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"y_train": np.array([0, 1, 12] * 4)}, "Label 12 in y_train is out of range for 10 classes."),
        ({"y_test": np.array([-1, 0, 1, 2, 0, 1])}, "Label -1 in y_test is negative."),
        (
            {"y_train": np.zeros(12, dtype=np.float32)},
            "y_train must be a 1-D array of integer class labels.",
        ),
        ({"y_test": np.arange(5) % 3}, "x_test has 6 images but its labels have 5 entries."),
        (
            {"x_train": np.full((12, 3, 8, 8), np.nan, dtype=np.float32)},
            "x_train contains NaN or infinite values.",
        ),
        (
            {"x_train": np.full((12, 3, 8, 8), 2.0, dtype=np.float32)},
            "x_train has float values outside [0, 1]",
        ),
        ({"x_train": np.zeros((12, 3, 8, 8), dtype=np.int64)}, "x_train must be uint8 (0..255) or float"),
        ({"x_train": np.zeros((12, 8, 6, 3), dtype=np.uint8)}, "x_train has shape (12, 8, 6, 3)"),
        ({"x_test": np.zeros((6, 4, 4, 3), dtype=np.uint8)}, "x_train images are"),
    ],
)
def test_npz_validation_errors_are_one_sentence(tmp_path, change, message):
    arrays = _valid_arrays() | change
    if "y_train" in change and 12 in change["y_train"]:
        arrays["num_classes"] = np.array(10)
    with pytest.raises(DataError) as info:
        D.load_npz(_save_npz(tmp_path / "d.npz", **arrays))
    assert message in str(info.value)
    assert str(info.value).count(". ") == 0 and str(info.value).endswith(".")


def test_npz_missing_key_and_pickled_objects_are_refused(tmp_path):
    arrays = _valid_arrays()
    del arrays["y_test"]
    with pytest.raises(DataError, match="missing array\\(s\\): y_test"):
        D.load_npz(_save_npz(tmp_path / "a.npz", **arrays))
    objects = _valid_arrays() | {"y_train": np.array([object()] * 12, dtype=object)}
    with pytest.raises(DataError, match="pickled objects"):
        D.load_npz(_save_npz(tmp_path / "b.npz", **objects))


def test_npz_that_is_not_an_archive(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz archive"):
        D.load_npz(path)


# ----------------------------------------------------------------------------- image-folder zips


def test_zip_with_splits_and_root_folder(tmp_path):
    members = _folder_members()
    members["data/test/cat/gray.png"] = _png(mode="L")  # grayscale images join an RGB set as RGB
    members["__MACOSX/data/._junk.png"] = b"ignored"
    bundle = D.load_image_folder_zip(_zip(tmp_path / "pets.zip", members))
    assert bundle.class_names == ("cat", "dog") and bundle.name == "pets"
    assert bundle.x_train.shape == (6, 3, 8, 8) and bundle.x_test.shape == (7, 3, 8, 8)
    assert bundle.y_train.tolist() == [0, 0, 0, 1, 1, 1]


def test_zip_val_split_grayscale_and_resize(tmp_path):
    members = {n.replace("test/", "val/"): _png((10, 10), "L") for n in _folder_members(prefix="")}
    bundle = D.load_dataset("image_folder_zip", _zip(tmp_path / "g.zip", members), img_size=6)
    assert bundle.x_train.shape == (6, 1, 6, 6) and bundle.x_test.shape == (6, 1, 6, 6)


def test_zip_without_splits_gets_a_deterministic_80_20_split(tmp_path):
    members = {f"{cls}/{i}.png": _png(value=i) for cls in ("a", "b") for i in range(10)}
    path = _zip(tmp_path / "flat.zip", members)
    first, second = D.load_image_folder_zip(path), D.load_image_folder_zip(path)
    assert first.x_train.shape[0] == 16 and first.x_test.shape[0] == 4
    assert torch.equal(first.x_test, second.x_test) and first.y_test.tolist() == [0, 0, 1, 1]


def test_zip_images_of_different_sizes_need_img_size(tmp_path):
    members = _folder_members(prefix="")
    members["train/cat/big.png"] = _png((16, 16))
    with pytest.raises(DataError, match="pass img_size to resize them"):
        D.load_image_folder_zip(_zip(tmp_path / "m.zip", members))


@pytest.mark.parametrize(
    "name, message",
    [
        ("../evil.png", "points outside the archive"),
        ("train/cat/../../../evil.png", "points outside the archive"),
        ("/etc/evil.png", "absolute path"),
    ],
)
def test_zip_path_traversal_is_refused(tmp_path, name, message):
    members = _folder_members() | {name: _png()}
    with pytest.raises(DataError, match=message):
        D.load_image_folder_zip(_zip(tmp_path / "t.zip", members))


def test_zip_symlink_is_refused(tmp_path):
    path = _zip(tmp_path / "s.zip", _folder_members())
    with zipfile.ZipFile(path, "a") as zf:
        info = zipfile.ZipInfo("data/train/cat/link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="is a symbolic link"):
        D.load_image_folder_zip(path)


def test_zip_bomb_is_refused(tmp_path):
    members = _folder_members() | {"data/train/cat/bomb.png": b"\0" * (5 * 1024 * 1024)}
    with pytest.raises(DataError, match="looks like a zip bomb"):
        D.load_image_folder_zip(_zip(tmp_path / "b.zip", members))


def test_zip_size_and_count_caps(tmp_path):
    path = _zip(tmp_path / "c.zip", _folder_members())
    with pytest.raises(DataError, match="more than the limit of 5"):
        D.load_image_folder_zip(path, max_files=5)
    with pytest.raises(DataError, match="expands to .* bytes, more than the limit of 100"):
        D.load_image_folder_zip(path, max_bytes=100)


def test_zip_undecodable_image_and_bad_layout(tmp_path):
    bad = _folder_members() | {"data/train/cat/broken.png": b"garbage"}
    with pytest.raises(DataError, match="Image 'data/train/cat/broken.png' could not be decoded."):
        D.load_image_folder_zip(_zip(tmp_path / "d.zip", bad))
    deep = {f"a/b/c/d{i}.png": _png() for i in range(2)} | {"x.png": _png()}
    with pytest.raises(DataError, match="laid out as"):
        D.load_image_folder_zip(_zip(tmp_path / "e.zip", deep))
    not_zip = tmp_path / "f.zip"
    not_zip.write_bytes(b"PK but not really")
    with pytest.raises(DataError, match="not a readable zip archive"):
        D.load_image_folder_zip(not_zip)


# ----------------------------------------------------------------------------- batching and augmentation


def test_batches_cover_every_index_once():
    x, y = torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10)
    plain = list(D.batches(x, y, 4))
    assert [len(b) for _, b in plain] == [4, 4, 2] and torch.equal(torch.cat([b for _, b in plain]), y)
    shuffled = list(D.batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(0)))
    ys = torch.cat([b for _, b in shuffled])
    assert sorted(ys.tolist()) == list(range(10)) and not torch.equal(ys, y)
    assert all(torch.equal(xb.view(-1), yb.float()) for xb, yb in shuffled)
    again = list(D.batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(torch.cat([b for _, b in again]), ys)


def test_augment_identity_flip_and_crop():
    x = torch.rand(16, 3, 6, 6) + 1.0  # strictly positive, so padding zeros are recognisable
    assert torch.equal(D.augment_batch(x, torch.Generator().manual_seed(0), pad=0, hflip=False), x)
    flipped = D.augment_batch(x, torch.Generator().manual_seed(0), pad=0, hflip=True)
    same = (flipped == x).flatten(1).all(1)
    mirrored = (flipped == x.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()
    cropped = D.augment_batch(x, torch.Generator().manual_seed(1), pad=2, hflip=False)
    assert cropped.shape == x.shape
    for out, src in zip(cropped, x, strict=True):  # each crop is a shifted window of the zero-padded image
        padded = torch.nn.functional.pad(src, (2, 2, 2, 2))
        windows = [padded[:, r : r + 6, c : c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(out, w) for w in windows)

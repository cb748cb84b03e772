"""Loading a split in the seeds' layout: ids from sorted names, the cache, and one-line user errors."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raydfml.data import ensure_dataset, get_spec, load_split, normalize, denormalize
from raydfml.data.filelist import write_folder_split_csvs
from raydfml.errors import UserError

# Created in this (non-sorted) order on purpose: ids must follow sorted names.
CLASSES = {"meta_train": ["zebra", "apple", "mango", "kiwi"], "meta_val": ["owl", "bee"], "meta_test": ["fig", "cat"]}
N_IMG = 5


def _value(cls: str, i: int) -> int:
    return (sum(map(ord, cls)) * 7 + i * 13) % 256


def make_dataset(root: Path, size: int = 8) -> Path:
    """A tiny CIFAR-FS-shaped dataset (folder ``cifar100``), every image a distinct flat colour."""
    ddir = root / "cifar100"
    for split, classes in CLASSES.items():
        for cls in classes:
            for i in range(N_IMG):
                path = ddir / split / cls / f"{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((size, size, 3), _value(cls, i), np.uint8)).save(path)
    write_folder_split_csvs(ddir)
    return ddir


def test_load_split_images_labels_sorted_ids(tmp_path):
    make_dataset(tmp_path)
    s = load_split(tmp_path, "cifarfs", "meta_train", image_size=8)
    assert s.class_names == ["apple", "kiwi", "mango", "zebra"]
    assert s.images.dtype == np.uint8 and s.images.shape == (4 * N_IMG, 3, 8, 8) and s.images.flags.c_contiguous
    assert s.labels.dtype == np.int64 and s.num_classes == 4
    for c, name in enumerate(s.class_names):
        rows = s.indices_of(c)
        assert len(rows) == N_IMG and (s.labels[rows] == c).all()
        assert [int(s.images[r, 0, 0, 0]) for r in rows] == [_value(name, i) for i in range(N_IMG)]


def test_resize_to_spec_size_by_default(tmp_path):
    make_dataset(tmp_path)
    s = load_split(tmp_path, "cifarfs", "meta_val")
    assert s.images.shape[-2:] == (32, 32) == (get_spec("cifarfs").image_size,) * 2


def test_absolute_filenames_in_csv(tmp_path):
    ddir = make_dataset(tmp_path)
    csv_path = ddir / "split" / "meta_test.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([lines[0]] + [f"{ddir}/{line}" for line in lines[1:]]) + "\n")
    assert len(load_split(tmp_path, "cifarfs", "meta_test", image_size=8)) == 2 * N_IMG


def test_csv_written_on_another_machine_loads_by_trailing_split_class_file(tmp_path, capsys):
    """The seeds' filelist scripts store that machine's prefix (./DFL2Ldata/cifar100/meta_train/...)."""
    ddir = make_dataset(tmp_path)
    csv_path = ddir / "split" / "meta_train.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([lines[0]] + [f"./DFL2Ldata/cifar100/{line}" for line in lines[1:]]) + "\n")
    s = load_split(tmp_path, "cifarfs", "meta_train", image_size=8, use_cache=False)
    assert s.class_names == ["apple", "kiwi", "mango", "zebra"]
    assert [int(s.images[r, 0, 0, 0]) for r in s.indices_of(0)] == [_value("apple", i) for i in range(N_IMG)]
    err = capsys.readouterr().err
    assert err.count("another machine's prefix") == 1 and f"{4 * N_IMG} of {4 * N_IMG}" in err
    # a prefixed row whose file exists nowhere is still the one-line "does not exist" error
    csv_path.write_text(csv_path.read_text() + "./DFL2Ldata/cifar100/meta_train/apple/999.png,apple\n")
    with pytest.raises(UserError, match="999.png does not exist"):
        load_split(tmp_path, "cifarfs", "meta_train", image_size=8, use_cache=False)


def test_subset(tmp_path):
    make_dataset(tmp_path)
    s = load_split(tmp_path, "cifarfs", "meta_train", image_size=8)
    sub = s.subset([3, 1], max_per_class=2)
    assert sub.class_names == ["kiwi", "zebra"] and sub.labels.tolist() == [0, 0, 1, 1]
    assert (sub.images == s.images[np.concatenate([s.indices_of(1)[:2], s.indices_of(3)[:2]])]).all()


def test_second_load_uses_cache_and_csv_change_invalidates(tmp_path, monkeypatch):
    ddir = make_dataset(tmp_path)
    first = load_split(tmp_path, "cifarfs", "meta_train", image_size=8)
    assert (ddir / ".cache" / "meta_train_8.npz").is_file()

    def broken_open(*a, **k):
        raise AssertionError("decoded despite a valid cache")

    monkeypatch.setattr(Image, "open", broken_open)
    second = load_split(tmp_path, "cifarfs", "meta_train", image_size=8)
    assert (second.images == first.images).all() and (second.labels == first.labels).all()
    assert second.class_names == first.class_names
    monkeypatch.undo()

    # Drop one class from the CSV: the cache's key no longer matches, so the split is decoded again.
    csv_path = ddir / "split" / "meta_train.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(line for line in lines if ",zebra" not in line) + "\n")
    third = load_split(tmp_path, "cifarfs", "meta_train", image_size=8)
    assert third.class_names == ["apple", "kiwi", "mango"] and len(third) == 3 * N_IMG


def test_an_image_truncated_after_the_first_load_is_noticed(tmp_path):
    """Tried as a user would: the stale cache served the old pixels and the run exited 0."""
    ddir = make_dataset(tmp_path)
    load_split(tmp_path, "cifarfs", "meta_val", image_size=8)
    victim = ddir / "meta_val" / "owl" / "002.png"
    victim.write_bytes(victim.read_bytes()[:40])
    with pytest.raises(UserError, match=r"002.png: corrupt or unreadable"):
        load_split(tmp_path, "cifarfs", "meta_val", image_size=8)


def test_unreadable_cache_is_rebuilt(tmp_path):
    ddir = make_dataset(tmp_path)
    load_split(tmp_path, "cifarfs", "meta_val", image_size=8)
    (ddir / ".cache" / "meta_val_8.npz").write_bytes(b"garbage")
    assert len(load_split(tmp_path, "cifarfs", "meta_val", image_size=8)) == 2 * N_IMG


# ---- errors: one line, naming the file -------------------------------------------------------------


def _one_line_error(match: str, *args, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as exc:
        load_split(*args, **kwargs)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_dataset_folder_says_where_and_how(tmp_path):
    with pytest.raises(UserError) as exc:
        ensure_dataset(tmp_path, "miniimagenet")
    msg = str(exc.value)
    assert "Miniimagenet/meta_train/<class>" in msg and "python -m raydfml.data.filelist miniimagenet" in msg
    _one_line_error("Miniimagenet", tmp_path, "miniimagenet", "meta_train")


def test_missing_split_folder(tmp_path):
    ddir = make_dataset(tmp_path)
    for p in (ddir / "split").iterdir():
        p.unlink()
    (ddir / "split").rmdir()
    msg = _one_line_error("split", tmp_path, "cifarfs", "meta_train")
    assert "raydfml.data.filelist" in msg


def test_missing_split_csv(tmp_path):
    ddir = make_dataset(tmp_path)
    (ddir / "split" / "meta_val.csv").unlink()
    msg = _one_line_error("meta_val.csv", tmp_path, "cifarfs", "meta_val")
    assert "python -m raydfml.data.filelist cifarfs" in msg


def test_wrong_header(tmp_path):
    ddir = make_dataset(tmp_path)
    csv_path = ddir / "split" / "meta_val.csv"
    csv_path.write_text(csv_path.read_text().replace("filename,label", "path,class", 1))
    _one_line_error("meta_val.csv.*header", tmp_path, "cifarfs", "meta_val")


def test_row_pointing_at_missing_file(tmp_path):
    ddir = make_dataset(tmp_path)
    (ddir / "meta_val" / "owl" / "002.png").unlink()
    _one_line_error(r"meta_val\.csv:\d+: image file .*002\.png does not exist", tmp_path, "cifarfs", "meta_val")


def test_corrupt_image(tmp_path):
    ddir = make_dataset(tmp_path)
    (ddir / "meta_val" / "owl" / "001.png").write_bytes(b"not a png at all")
    _one_line_error(r"001\.png: corrupt", tmp_path, "cifarfs", "meta_val")


def test_truncated_image(tmp_path):
    ddir = make_dataset(tmp_path)
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="PNG")
    (ddir / "meta_val" / "bee" / "003.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _one_line_error(r"003\.png: corrupt", tmp_path, "cifarfs", "meta_val")


def test_empty_split(tmp_path):
    ddir = make_dataset(tmp_path)
    (ddir / "split" / "meta_test.csv").write_text("filename,label\n")
    _one_line_error("meta_test.csv.*empty", tmp_path, "cifarfs", "meta_test")


def test_unknown_split_and_dataset(tmp_path):
    make_dataset(tmp_path)
    _one_line_error("meta_eval", tmp_path, "cifarfs", "meta_eval")
    _one_line_error("no-such", tmp_path, "no-such", "meta_train")


# ---- normalisation ------------------------------------------------------------------------------------


def test_normalize_roundtrip():
    spec = get_spec("cifarfs")
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    y = normalize(x, spec)
    assert y.dtype == torch.float32
    assert torch.allclose(y[:, 0], (x[:, 0].float() / 255 - spec.mean[0]) / spec.std[0])
    assert torch.allclose(denormalize(y, spec) * 255, x.float(), atol=1e-3)
    assert normalize(x[0], spec).shape == (3, 4, 4)
    with pytest.raises(TypeError):
        normalize(x.float(), spec)


def test_ensure_dataset_generates_quietly_when_asked(tmp_path, capfd):
    """--quiet reaches the embedded dataset's generator: no progress bar on stderr, one with it."""
    ensure_dataset(tmp_path / "quiet", "glyphs-smoke", progress=False)
    assert "glyph classes" not in capfd.readouterr().err
    ensure_dataset(tmp_path / "loud", "glyphs-smoke")
    assert "glyph classes" in capfd.readouterr().err

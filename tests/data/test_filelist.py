"""Split CSV writers: folder layout, CUB rule, Flower labels, and the CLI's error handling."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raydfml.data.filelist import (flower_class_splits, main, write_cub_split_csvs, write_flower_split_csvs,
                                   write_folder_split_csvs, write_split_csvs)
from raydfml.data.layout import load_split
from raydfml.errors import UserError, run_cli

REPO = Path(__file__).resolve().parents[2]


def _png(path: Path, value: int, size: int = 8, suffix_fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path, format=suffix_fmt)


def _read(csv_path: Path) -> list[list[str]]:
    with open(csv_path, newline="") as f:
        return list(csv.reader(f))


def _folder_tree(ddir: Path, per_split=(("meta_train", 3), ("meta_val", 2), ("meta_test", 2)), n_img=3) -> None:
    for split, n_cls in per_split:
        for c in range(n_cls):
            for i in range(n_img):
                _png(ddir / split / f"{split}_c{c}" / f"{i:02d}.png", 10 * c + i)


def test_folder_layout_sorted_rows(tmp_path):
    ddir = tmp_path / "cifar100"
    _folder_tree(ddir)
    (ddir / "meta_train" / "meta_train_c0" / "notes.txt").write_text("not an image")
    counts = write_folder_split_csvs(ddir)
    assert counts == {"meta_train": 9, "meta_val": 6, "meta_test": 6}
    rows = _read(ddir / "split" / "meta_train.csv")
    assert rows[0] == ["filename", "label"]
    assert rows[1:] == sorted(rows[1:])
    assert rows[1] == ["meta_train/meta_train_c0/00.png", "meta_train_c0"]


def test_folder_layout_missing_split_folder_is_user_error(tmp_path):
    ddir = tmp_path / "cifar100"
    _folder_tree(ddir, per_split=(("meta_train", 2), ("meta_test", 2)))
    with pytest.raises(UserError, match="meta_val"):
        write_folder_split_csvs(ddir)
    assert not (ddir / "split" / "meta_train.csv").exists()  # nothing half-written


def test_folder_layout_empty_split_folder_is_user_error(tmp_path):
    ddir = tmp_path / "cifar100"
    _folder_tree(ddir)
    for p in (ddir / "meta_test").rglob("*.png"):
        p.unlink()
    with pytest.raises(UserError, match="meta_test"):
        write_folder_split_csvs(ddir)


def test_cub_rule_on_fake_tree(tmp_path):
    ddir = tmp_path / "CUB_200_2011"
    names = [f"{i:03d}.Bird_{i}" for i in range(1, 9)]
    for i, name in enumerate(reversed(names)):  # created out of order on purpose
        for j in range(2):
            _png(ddir / "images" / name / f"img_{j}.jpg", i, suffix_fmt="JPEG")
    counts = write_split_csvs(tmp_path, "cub")
    assert counts == {"meta_train": 8, "meta_val": 4, "meta_test": 4}
    labels = {s: sorted({r[1] for r in _read(ddir / "split" / f"{s}.csv")[1:]})
              for s in ("meta_train", "meta_val", "meta_test")}
    assert labels["meta_train"] == [names[i] for i in (0, 2, 4, 6)]
    assert labels["meta_val"] == [names[i] for i in (1, 5)]
    assert labels["meta_test"] == [names[i] for i in (3, 7)]
    first = _read(ddir / "split" / "meta_val.csv")[1]
    assert first == [f"images/{names[1]}/img_0.jpg", names[1]]
    # The loader resolves these images/... rows like any other.
    split = load_split(tmp_path, "cub", "meta_val", image_size=8)
    assert split.images.shape == (4, 3, 8, 8) and split.class_names == labels["meta_val"]


def test_cub_missing_images_folder(tmp_path):
    (tmp_path / "CUB_200_2011").mkdir()
    with pytest.raises(UserError, match="images"):
        write_cub_split_csvs(tmp_path / "CUB_200_2011")


def test_flower_class_split_sizes_and_determinism():
    s = flower_class_splits(list(range(1, 103)))
    assert [len(s[k]) for k in ("meta_train", "meta_val", "meta_test")] == [71, 15, 16]
    assert sorted(s["meta_train"] + s["meta_val"] + s["meta_test"]) == list(range(1, 103))
    assert flower_class_splits(list(range(102, 0, -1))) == s


def test_flower_with_fake_labels(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    ddir = tmp_path / "flower"
    labels = np.array([[c for c in range(1, 11) for _ in range(3)]])  # 10 classes x 3 images
    scipy_io.savemat(ddir.mkdir() or ddir / "imagelabels.mat", {"labels": labels})
    for k in range(1, labels.size + 1):
        _png(ddir / "jpg" / f"image_{k:05d}.jpg", k, suffix_fmt="JPEG")
    counts = write_flower_split_csvs(ddir)
    assert sum(counts.values()) == 30
    seen: dict[str, set[str]] = {}
    for s in ("meta_train", "meta_val", "meta_test"):
        rows = _read(ddir / "split" / f"{s}.csv")[1:]
        assert rows == sorted(rows) and all(r[0].startswith("jpg/image_") for r in rows)
        seen[s] = {r[1] for r in rows}
    assert [len(seen[s]) for s in ("meta_train", "meta_val", "meta_test")] == [7, 1, 2]
    assert set.union(*seen.values()) == {f"class_{c:03d}" for c in range(1, 11)}
    split = load_split(tmp_path, "flower", "meta_test", image_size=8)
    assert len(split) == 6 and split.num_classes == 2


def test_flower_missing_image(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    ddir = tmp_path / "flower"
    ddir.mkdir()
    scipy_io.savemat(ddir / "imagelabels.mat", {"labels": np.array([[1, 2, 3]])})
    _png(ddir / "jpg" / "image_00001.jpg", 0, suffix_fmt="JPEG")
    with pytest.raises(UserError, match="image_00002.jpg"):
        write_flower_split_csvs(ddir)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raydfml.data.filelist", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def _cli_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI's ``run_cli`` path without a subprocess (importing torch costs seconds)."""
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: main(list(args)))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_cli_subprocess_error_is_one_line_exit_2(tmp_path):
    proc = _cli("no-such-dataset", "--root", str(tmp_path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no-such-dataset" in lines[0], proc.stderr


@pytest.mark.parametrize("make", ["missing_folder", "missing_split"])
def test_cli_errors_are_one_line(tmp_path, capsys, make):
    if make == "missing_split":
        _folder_tree(tmp_path / "cifar100", per_split=(("meta_train", 2),))
    code, _, err = _cli_in_process(capsys, "cifarfs", "--root", str(tmp_path))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert ("cifar100" in lines[0]) and (make != "missing_split" or "meta_val" in lines[0])


def test_cli_writes_and_reports_counts(tmp_path, capsys):
    _folder_tree(tmp_path / "cifar100")
    code, out, _ = _cli_in_process(capsys, "cifarfs", "--root", str(tmp_path))
    assert code == 0
    assert "meta_train: 9 images, 3 classes" in out
    assert (tmp_path / "cifar100" / "split" / "meta_test.csv").is_file()


def test_cli_help_describes_layout(capsys):
    code, out, _ = _cli_in_process(capsys, "--help")
    assert code == 0 and "meta_train/<class>/<image>" in out and "imagelabels.mat" in out

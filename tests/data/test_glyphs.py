"""The embedded glyph dataset: determinism, layout, splits, domains, crash safety and the CLI."""
from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raydfml.data import glyphs
from raydfml.data.glyphs import (DOMAINS, MARKER, available_classes, default_split, domain_glyphs, generate_glyphs,
                                 glyph_inventory)
from raydfml.data.registry import SPLITS
from raydfml.errors import UserError, run_cli

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(classes=10, images_per_class=8, progress=False, workers=1)


def _hashes(ddir: Path) -> dict[str, str]:
    return {str(p.relative_to(ddir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(ddir.rglob("*")) if p.is_file()}


def _class_dirs(ddir: Path, split: str) -> list[str]:
    return sorted(p.name for p in (ddir / split).iterdir())


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """One small dataset shared by the read-only checks."""
    return generate_glyphs(tmp_path_factory.mktemp("glyphs"), seed=0, **SMALL)


def test_same_seed_gives_byte_identical_files(small, tmp_path):
    again = generate_glyphs(tmp_path, seed=0, **SMALL)
    assert _hashes(again) == _hashes(small)


def test_worker_processes_do_not_change_the_output(small, tmp_path):
    parallel = generate_glyphs(tmp_path, seed=0, **{**SMALL, "workers": 2})
    assert _hashes(parallel) == _hashes(small)


def test_different_seed_gives_different_images(small, tmp_path):
    other = generate_glyphs(tmp_path, seed=1, **SMALL)
    images = lambda d: {Path(k).parts[1:]: v for k, v in _hashes(d).items() if k.endswith(".png")}  # noqa: E731
    a, b = images(small), images(other)
    assert a.keys() == b.keys()  # the same classes (selection is seed-independent)...
    assert all(a[k] != b[k] for k in a)  # ...with other pictures
    split_of = lambda d: {s: _class_dirs(d, s) for s in SPLITS}  # noqa: E731
    assert split_of(small) != split_of(other)  # and, here, another class -> split assignment


def test_split_counts_and_csvs(small):
    assert default_split(10) == (7, 1, 2)
    for split, n_classes in zip(SPLITS, default_split(10)):
        classes = _class_dirs(small, split)
        assert len(classes) == n_classes
        with open(small / "split" / f"{split}.csv", newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["filename", "label"]
        body = rows[1:]
        assert len(body) == n_classes * 8
        assert sorted({label for _, label in body}) == classes
        for filename, label in body:
            assert filename.startswith(f"{split}/{label}/") and (small / filename).is_file()


def test_splits_have_disjoint_classes(small):
    seen = [set(_class_dirs(small, s)) for s in SPLITS]
    assert sum(map(len, seen)) == len(set().union(*seen)) == 10


def test_images_are_32x32_rgb_with_visible_glyphs(small):
    for path in sorted(small.rglob("*.png"))[:20]:
        with Image.open(path) as im:
            assert (im.size, im.mode) == ((32, 32), "RGB")
            pixels = np.asarray(im).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 2  # foreground, background and antialiased edges


def test_marker_records_the_parameters(small):
    marker = json.loads((small / MARKER).read_text())
    assert {k: marker[k] for k in ("seed", "classes", "images_per_class", "split", "domain")} == \
        {"seed": 0, "classes": 10, "images_per_class": 8, "split": [7, 1, 2], "domain": "all"}
    assert len(marker["fonts"]) == len(glyphs.FONT_FILES) and marker["version"] == glyphs.GLYPHS_VERSION
    assert not list(small.parent.glob(".glyphs.*"))  # no work folder left behind


def test_class_names_are_filesystem_safe_and_unique():
    names = [g.class_name for g in glyph_inventory()]
    assert len(set(names)) == len(names)
    assert all(n.isascii() and n.replace("_", "").isalnum() and n == n.lower() for n in names)
    assert "u0041_latin_capital_letter_a" in names


def test_too_many_classes_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--classes"):
        generate_glyphs(tmp_path, domain="greek", classes=available_classes("greek") + 1, progress=False)
    with pytest.raises(UserError, match="--classes"):
        generate_glyphs(tmp_path, classes=5, images_per_class=2, progress=False)  # 5 -> (4, 0, 1)
    with pytest.raises(UserError, match="--split"):
        generate_glyphs(tmp_path, classes=10, split=(5, 3, 3), progress=False)
    with pytest.raises(UserError, match="--domain"):
        generate_glyphs(tmp_path, domain="klingon", progress=False)
    assert not (tmp_path / "glyphs").exists()


def test_explicit_split_for_a_small_domain(tmp_path):
    ddir = generate_glyphs(tmp_path, name="glyphs-greek", domain="greek", classes=12, split=(6, 3, 3),
                           images_per_class=2, progress=False, workers=1)
    assert [len(_class_dirs(ddir, s)) for s in SPLITS] == [6, 3, 3]
    assert all("greek" in c for s in SPLITS for c in _class_dirs(ddir, s))


def test_incomplete_dataset_is_regenerated(small, tmp_path):
    ddir = generate_glyphs(tmp_path, seed=0, **SMALL)
    (ddir / MARKER).unlink()  # as if interrupted before the marker
    (ddir / "meta_train" / "u9999_stray").mkdir()
    generate_glyphs(tmp_path, seed=0, **SMALL)
    assert (ddir / MARKER).is_file() and not (ddir / "meta_train" / "u9999_stray").exists()
    assert _hashes(ddir) == _hashes(small)


def test_complete_dataset_is_reused_and_not_silently_replaced(tmp_path):
    ddir = generate_glyphs(tmp_path, seed=0, **SMALL)
    stamp = (ddir / MARKER).stat().st_mtime_ns
    assert generate_glyphs(tmp_path, seed=0, **SMALL) == ddir
    assert (ddir / MARKER).stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="--force"):
        generate_glyphs(tmp_path, seed=1, **SMALL)
    generate_glyphs(tmp_path, seed=1, force=True, **SMALL)
    assert json.loads((ddir / MARKER).read_text())["seed"] == 1


def test_foreign_folder_is_never_deleted(tmp_path):
    (tmp_path / "glyphs" / "my_photos").mkdir(parents=True)
    with pytest.raises(UserError, match="not a glyph dataset"):
        generate_glyphs(tmp_path, seed=0, **SMALL)
    assert (tmp_path / "glyphs" / "my_photos").is_dir()


def test_script_domains_are_disjoint():
    codepoints = {d: {g.codepoint for g in domain_glyphs(d)} for d in ("latin", "greek", "cyrillic")}
    for a in codepoints:
        assert codepoints[a], a
        for b in codepoints:
            if a < b:
                assert not codepoints[a] & codepoints[b], (a, b)
    assert all(unicodedata.name(chr(cp)).startswith("GREEK") for cp in codepoints["greek"])
    assert {g.codepoint for g in domain_glyphs("all")} >= set().union(*codepoints.values())
    assert set(DOMAINS) >= {"all", "latin", "greek", "cyrillic"}


def test_lookalikes_are_removed():
    kept = {g.char for g in glyph_inventory()}
    assert {"A", "B", "a", "b", "i", "j", "J"} <= kept
    assert not {"\u0391", "\u0410", "\u0430"} & kept         # Greek Alpha, Cyrillic A and a
    for lower, upper in ("oO", "cC", "sS", "xX", "vV", "wW", "zZ"):  # differ only in size
        assert (lower in kept) + (upper in kept) == 1, (lower, upper)
    assert "\u00e0" not in kept                                # precomposed accented letters
    assert available_classes("all") >= 100


@pytest.mark.parametrize("args", [["--classes", "5"], ["--images-per-class", "0"]])
def test_cli_bad_options_exit_2_with_one_line(tmp_path, args):
    """The real entry point, in a subprocess (slow-ish: importing the package pulls in torch)."""
    proc = subprocess.run([sys.executable, "-m", "raydfml.data.glyphs", "--root", str(tmp_path), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not (tmp_path / "glyphs").exists()


@pytest.mark.parametrize("args, option", [
    (["--domain", "greek", "--classes", "1000"], "--classes 1000"),
    (["--domain", "klingon"], "--domain"),
    (["--classes", "12", "--split", "6,3,2"], "--split"),
    (["--seed", "-1"], "--seed"),
    (["--name", "../elsewhere"], "--name"),
])
def test_cli_bad_options_in_process(tmp_path, monkeypatch, capsys, args, option):
    monkeypatch.setattr(sys, "argv", ["glyphs", "--root", str(tmp_path), *args])
    with pytest.raises(SystemExit) as exc:
        run_cli(glyphs.main)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith(f"error: {option}") and "\n" not in err, err
    assert not any(tmp_path.iterdir())


def test_cli_generates_and_then_reports_complete(tmp_path, monkeypatch, capsys):
    argv = ["glyphs", "--root", str(tmp_path), "--seed", "3", "--classes", "10", "--images-per-class", "2",
            "--quiet", "--workers", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exc:
        run_cli(glyphs.main)
    assert exc.value.code == 0
    assert "20 images" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_cli(glyphs.main)
    assert "already complete" in capsys.readouterr().out

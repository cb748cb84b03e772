"""`python -m raydfml.zoo import`: a user's teacher checkpoints become a zoo runs use as they are."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from raydfml.errors import UserError
from raydfml.models import build_model
from raydfml.zoo import read_manifest
from raydfml.zoo.build import ZooConfig, build_zoo
from raydfml.zoo.importer import _torchvision_to_ours, import_teachers, is_imported
from raydfml.zoo.manifest import load_teacher


@pytest.fixture(scope="module")
def trained(glyph_root, tmp_path_factory):
    """Two conv4 teachers trained by the engine (their weights stand in for a user's checkpoints)."""
    zoo_dir = tmp_path_factory.mktemp("trained")
    cfg = ZooConfig(dataset="glyphs", arch="conv4", num=2, way=5, policy="random", epochs=8, batch_size=16)
    return zoo_dir, build_zoo(cfg, zoo_dir, glyph_root, workers=0, progress=False)


def _ours_to_torchvision(state: dict) -> dict:
    """resnet10 (one block per stage) in torchvision's names: what a user's ResNet file looks like."""
    out = {}
    for k, v in state.items():
        k = k.replace("stem.0.", "conv1.").replace("stem.1.", "bn1.").replace("classifier.", "fc.")
        if k.startswith("stages."):
            i, rest = k.split(".", 2)[1:]
            k = f"layer{int(i) + 1}.0.{rest.replace('shortcut.', 'downsample.')}"
        out[k] = v
    return out


def test_import_reads_plain_seeds_and_torchvision_files(trained, glyph_root, tmp_path):
    from raydfml.data.layout import load_split

    zoo_dir, records = trained
    names = load_split(glyph_root, "glyphs", "meta_train").class_names
    src = tmp_path / "mine"
    src.mkdir()
    plain = torch.load(zoo_dir / records[0].file, weights_only=True)
    torch.save(plain, src / "a_plain.pt")
    torch.save({"teacher": torch.load(zoo_dir / records[1].file, weights_only=True),
                "specific": list(records[1].classes), "acc": 0.9}, src / "b_seeds.pth")
    (src / "classes.csv").write_text("file,classes\na_plain.pt," + ";".join(names[c] for c in records[0].classes) + "\n")
    out = tmp_path / "zoo"
    imported = import_teachers(src, out, "glyphs", "conv4", glyph_root, classes_file=src / "classes.csv")
    assert [r.classes for r in imported] == [records[0].classes, records[1].classes]
    assert all(is_imported(r) and r.heldout_acc >= 0.6 for r in imported), [r.heldout_acc for r in imported]
    assert read_manifest(out) == imported
    assert torch.equal(load_teacher(out, imported[0]).state_dict()["classifier.weight"], plain["classifier.weight"])
    # a run uses the imported teachers as they are: build_zoo trains nothing and overwrites nothing
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"}
    cfg = ZooConfig(dataset="glyphs", arch="conv4", num=5, way=5, policy="random", epochs=1)
    assert build_zoo(cfg, out, glyph_root, workers=0, progress=False) == imported
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"} == before

    resnet = build_model("resnet10", num_classes=5, width=0.125).state_dict()
    assert _torchvision_to_ours(_ours_to_torchvision(resnet)).keys() == resnet.keys()
    tv = tmp_path / "tv"
    tv.mkdir()
    torch.save(_ours_to_torchvision(resnet), tv / "r.pt")
    (tv / "classes.json").write_text(json.dumps({"r.pt": [0, 1, 2, 3, 4]}))
    [rec] = import_teachers(tv, tmp_path / "zoo_tv", "glyphs", "resnet10", glyph_root, width=0.125,
                            classes_file=tv / "classes.json")
    assert torch.equal(load_teacher(tmp_path / "zoo_tv", rec).state_dict()["stages.1.shortcut.0.weight"],
                       resnet["stages.1.shortcut.0.weight"])


def test_import_errors_are_one_line_and_write_nothing(trained, glyph_root, tmp_path):
    zoo_dir, records = trained
    src = tmp_path / "src"
    src.mkdir()
    torch.save(torch.load(zoo_dir / records[0].file, weights_only=True), src / "t.pt")
    with pytest.raises(UserError, match="its classes are unknown; list them with --classes"):
        import_teachers(src, tmp_path / "z1", "glyphs", "conv4", glyph_root)
    (src / "c.json").write_text(json.dumps({"t.pt": ["no-such-class", "x"]}))
    with pytest.raises(UserError, match="'no-such-class' is not a meta-train class"):
        import_teachers(src, tmp_path / "z2", "glyphs", "conv4", glyph_root, classes_file=src / "c.json")
    (src / "c.json").write_text(json.dumps({"t.pt": list(records[0].classes)}))
    with pytest.raises(UserError, match="does not fit resnet10"):
        import_teachers(src, tmp_path / "z3", "glyphs", "resnet10", glyph_root, classes_file=src / "c.json")
    with pytest.raises(UserError, match="a zoo this engine trained"):
        import_teachers(src, zoo_dir, "glyphs", "conv4", glyph_root, classes_file=src / "c.json")
    assert not (tmp_path / "z3" / "manifest.csv").exists()


def test_cli_import(trained, glyph_root, tmp_path):
    zoo_dir, records = trained
    src = tmp_path / "src"
    src.mkdir()
    torch.save({"teacher": torch.load(zoo_dir / records[0].file, weights_only=True),
                "specific": list(records[0].classes)}, src / "model_specific_0.pth")
    proc = subprocess.run([sys.executable, "-m", "raydfml.zoo", "import", str(src), "--zoo-dir", str(tmp_path / "z"),
                           "--arch", "conv4", "--data-root", str(glyph_root)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 imported teachers" in proc.stdout and len(read_manifest(tmp_path / "z")) == 1
    bad = subprocess.run([sys.executable, "-m", "raydfml.zoo", "import", str(tmp_path / "none"), "--zoo-dir",
                          str(tmp_path / "z9"), "--arch", "conv4", "--data-root", str(glyph_root)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: import:")


@pytest.mark.e2e
def test_a_run_on_imported_torchvision_style_teachers(glyph_root, tmp_path):
    """Two torchvision-named ResNet files become a zoo; a smoke run uses them through --zoo-dir."""
    from raydfml.config import resolve
    from raydfml.experiment import run_experiment

    src = tmp_path / "tv"
    src.mkdir()
    classes = {}
    for i, cls in enumerate(([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])):
        torch.manual_seed(i)
        torch.save(_ours_to_torchvision(build_model("resnet10", num_classes=5, width=0.125).state_dict()),
                   src / f"r{i}.pth")
        classes[f"r{i}.pth"] = cls
    (src / "classes.json").write_text(json.dumps(classes))
    zoo = tmp_path / "zoo"
    import_teachers(src, zoo, "glyphs", "resnet10", glyph_root, width=0.125, classes_file=src / "classes.json")
    cfg = resolve("mr", "deepinv", "smoke", {"data.data_root": str(glyph_root), "runtime.workers": 0,
                                             "pool.archs": "resnet10", "pool.width": 0.125, "pool.zoo_dir": str(zoo),
                                             "train.baselines": "random_init", "train.test_tasks": 5})
    cfg.out = str(tmp_path / "run")
    results = run_experiment(cfg, progress=False)
    assert results["meta_updates"] > 0 and results["coverage"]
    assert {r.file for r in read_manifest(zoo)} == {"teacher_0000.pt", "teacher_0001.pt"}

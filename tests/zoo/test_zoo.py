import os
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from raydfml.errors import UserError
from raydfml.zoo import ZooConfig, build_zoo, load_teacher, plan_classes, read_manifest
from raydfml.zoo.manifest import COLUMNS


def test_plans_are_sorted_and_deterministic():
    cfg = ZooConfig(num=4, way=5, policy="random", seed=3)
    plans = plan_classes(cfg, 20)
    assert plans == plan_classes(cfg, 20)
    assert all(list(p) == sorted(p) and len(set(p)) == 5 for p in plans)
    assert plan_classes(ZooConfig(num=4, way=5, policy="random", seed=4), 20) != plans
    disjoint = plan_classes(ZooConfig(num=4, way=5, policy="disjoint"), 20)
    assert disjoint == [tuple(range(5 * k, 5 * k + 5)) for k in range(4)]
    with pytest.raises(UserError, match="disjoint"):
        plan_classes(ZooConfig(num=5, way=5, policy="disjoint"), 20)


@pytest.fixture(scope="module")
def zoo(glyph_root, ray_session, tmp_path_factory):
    zoo_dir = tmp_path_factory.mktemp("zoo")
    cfg = ZooConfig(dataset="glyphs", arch="conv4", num=3, way=5, policy="random", epochs=12, batch_size=16)
    records = build_zoo(cfg, zoo_dir, glyph_root, workers=2, progress=False)
    return cfg, zoo_dir, records


def test_zoo_builds_on_ray_and_writes_manifest(zoo):
    cfg, zoo_dir, records = zoo
    df = pd.read_csv(zoo_dir / "manifest.csv")
    assert list(df.columns) == COLUMNS and len(df) == 3
    assert {"teacher_id", "dataset", "arch", "classes", "heldout_acc", "sha256"} <= set(df.columns)
    # 6 images held out per class, 30 per teacher: well-trained teachers separate 5 glyph classes
    assert all(r.heldout_acc >= 0.6 for r in records), [r.heldout_acc for r in records]
    t = load_teacher(zoo_dir, records[0])
    assert not t.training and all(not p.requires_grad for p in t.parameters())


def test_rebuild_is_a_noop(zoo, glyph_root):
    cfg, zoo_dir, records = zoo
    mtimes = {p.name: p.stat().st_mtime_ns for p in zoo_dir.glob("teacher_*.pt")}
    t0 = time.time()
    again = build_zoo(cfg, zoo_dir, glyph_root, workers=2, progress=False)
    assert again == records
    assert {p.name: p.stat().st_mtime_ns for p in zoo_dir.glob("teacher_*.pt")} == mtimes
    assert time.time() - t0 < 10


def test_checksum_mismatch_is_refused(zoo, tmp_path):
    cfg, zoo_dir, records = zoo
    import shutil

    copy = tmp_path / "zoo"
    shutil.copytree(zoo_dir, copy)
    with open(copy / records[1].file, "ab") as f:
        f.write(b"tampered")
    with pytest.raises(UserError, match="sha256"):
        load_teacher(copy, read_manifest(copy)[1])


def test_file_of_another_architecture_is_refused(zoo, tmp_path):
    cfg, zoo_dir, records = zoo
    import dataclasses

    from raydfml.models import build_model
    from raydfml.utils import sha256_file

    path = tmp_path / "resnet.pt"
    torch.save(build_model("resnet10", width=0.125).state_dict(), path)
    rec = dataclasses.replace(records[0], file=str(path), sha256=sha256_file(path))
    with pytest.raises(UserError, match="architecture 'conv4'"):
        load_teacher(tmp_path, rec)
    torch.save(torch.zeros(3), path)                                   # a tensor, not a state dict
    with pytest.raises(UserError, match="holds a Tensor, not a state dict"):
        load_teacher(tmp_path, dataclasses.replace(rec, sha256=sha256_file(path)))
    with pytest.raises(UserError, match="outside the zoo folder"):
        load_teacher(tmp_path / "zoo", dataclasses.replace(rec, file="../resnet.pt"))


def test_build_never_retrains_over_a_changed_file_or_another_plans_zoo(zoo, glyph_root, tmp_path):
    """Tried as a user would: a replaced teacher file was silently retrained over, and a zoo of another
    plan rebuilt in place. Both are refused now and the files stay as they are."""
    import dataclasses
    import shutil

    cfg, zoo_dir, records = zoo
    replaced = tmp_path / "replaced"
    shutil.copytree(zoo_dir, replaced)
    with open(replaced / records[1].file, "ab") as f:
        f.write(b"the user's own bytes")
    content = (replaced / records[1].file).read_bytes()
    with pytest.raises(UserError, match="does not match the sha256 in manifest.csv"):
        build_zoo(cfg, replaced, glyph_root, workers=0, progress=False)
    assert (replaced / records[1].file).read_bytes() == content
    other = tmp_path / "other"
    shutil.copytree(zoo_dir, other)
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    with pytest.raises(UserError, match="teachers of another plan .*epochs 12 there, 13 in this plan"):
        build_zoo(dataclasses.replace(cfg, epochs=13), other, glyph_root, workers=0, progress=False)
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before
    (replaced / records[1].file).unlink()                 # a missing file (interrupted build) is retrained
    again = build_zoo(cfg, replaced, glyph_root, workers=0, progress=False)
    assert again[1].sha256 == records[1].sha256


def test_cli_rejects_unknown_names_in_one_line(tmp_path):
    for args, needle in [(["--arch", "vgg"], "vgg"), (["--dataset", "imagenet22k"], "imagenet22k")]:
        proc = subprocess.run([sys.executable, "-m", "raydfml.zoo", *args, "--zoo-dir", str(tmp_path / "z"),
                               "--data-root", str(tmp_path)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]
        assert not (tmp_path / "z" / "manifest.csv").exists()


def test_two_builds_of_one_zoo_never_interleave_but_a_complete_zoo_is_shared(zoo, glyph_root, tmp_path):
    """Another process holding the zoo's lock (building it): a build that would train a teacher is
    refused in one line; a run that only reads the complete zoo goes ahead (two experiments on one data
    root were refused while the other one merely checked the checksums)."""
    import shutil

    from raydfml.utils import exclusive_lock

    cfg, zoo_dir, records = zoo
    copy = tmp_path / "zoo"
    shutil.copytree(zoo_dir, copy)
    with exclusive_lock(copy / ".lock", "held by this test"):
        assert build_zoo(cfg, copy, glyph_root, workers=0, progress=False) == records
        (copy / records[2].file).unlink()                  # now the build must train teacher 2
        with pytest.raises(UserError, match=r"zoo .*another process \(pid \d+ on .+\) is writing it"):
            build_zoo(cfg, copy, glyph_root, workers=0, progress=False)
        assert not (copy / records[2].file).exists()
    assert build_zoo(cfg, copy, glyph_root, workers=0, progress=False) == records


def test_an_in_process_build_trains_with_one_cpu_thread_as_a_ray_worker_does(glyph_root, tmp_path, monkeypatch):
    """A ResNet teacher's weights depend on the CPU thread count (measured: resnet10 at width 0.125, one
    epoch on the glyph set, differs between 1 and 2 threads), so an in-process build trains with one
    thread, as Ray workers do, and gives the caller its thread count back."""
    import raydfml.zoo.build as build_mod

    seen = []
    real = build_mod.train_teacher

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(build_mod, "train_teacher", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = ZooConfig(dataset="glyphs", arch="conv4", num=2, way=5, policy="random", epochs=1, batch_size=16)
        from raydfml.zoo.timing import BuildTimes

        times = BuildTimes()
        build_zoo(cfg, tmp_path / "zoo", glyph_root, workers=0, device="cpu", progress=False, times=times)
        assert seen == [1, 1] and torch.get_num_threads() == 2
        assert [t.threads for t in times.teachers] == [1, 1]         # the timing records say so too
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_teachers_do_not_depend_on_the_number_of_workers(workers, smoke_root, ray_session, tmp_path):
    """The mr smoke zoo, built in-process by the smoke_root fixture, rebuilt on 1 or 2 Ray workers: the
    same teacher files byte for byte (each teacher is seeded by (seed, id) alone), with the driver
    keeping ``workers`` teachers in flight and every worker training with one torch thread."""
    from raydfml.config import resolve
    from raydfml.runtime.pool import pool_zoos
    from raydfml.zoo import BuildTimes, load_teacher_state

    (zcfg, reference_dir, _), = pool_zoos(resolve("mr", "deepinv", "smoke", {"data.data_root": str(smoke_root)}))
    reference = read_manifest(reference_dir)
    times = BuildTimes()
    records = build_zoo(zcfg, tmp_path / "zoo", smoke_root, workers=workers, progress=False, times=times)
    assert [(r.teacher_id, r.classes, r.heldout_acc, r.sha256) for r in records] == \
        [(r.teacher_id, r.classes, r.heldout_acc, r.sha256) for r in reference]
    for ref, rec in zip(reference, records):
        a, b = load_teacher_state(reference_dir, ref), load_teacher_state(tmp_path / "zoo", rec)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Where the time went: one entry per teacher, trained on a Ray worker (not this process) with one thread.
    assert sorted(t.teacher for t in times.teachers) == [r.teacher_id for r in records]
    assert all(t.threads == 1 and t.worker != os.getpid() and t.train > 0 for t in times.teachers)
    queued = sorted(t.queued for t in times.teachers)
    first_done = min(t.finished for t in times.teachers)
    assert sum(q < first_done for q in queued) == workers       # the first `workers` were submitted at once
    assert times.breakdown()["total"] == pytest.approx(times.total) and times.total > 0


def test_teachers_train_on_workers_warmed_while_the_split_is_read(glyph_root, ray_session, tmp_path, monkeypatch):
    """A build with teachers to train starts its workers before reading the split; the teachers then
    run on those warmed worker processes. A build with nothing to train starts nothing."""
    import ray

    from raydfml.zoo import BuildTimes, build as zoo_build

    warmed = []
    original = zoo_build._warm_workers
    monkeypatch.setattr(zoo_build, "_warm_workers", lambda w, t: warmed.append(original(w, t)) or warmed[-1])
    cfg = ZooConfig(dataset="glyphs", arch="conv4", num=2, way=5, policy="random", epochs=1, batch_size=16)
    times = BuildTimes()
    build_zoo(cfg, tmp_path, glyph_root, workers=2, progress=False, times=times)
    assert len(warmed) == 1 and len(warmed[0]) == 2
    pids = set(ray.get(warmed[0]))
    assert {t.worker for t in times.teachers} <= pids, (pids, [t.worker for t in times.teachers])
    build_zoo(cfg, tmp_path, glyph_root, workers=2, progress=False)
    assert len(warmed) == 1

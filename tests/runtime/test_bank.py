import pytest
import numpy as np
import torch

from raydfml.runtime.bank import TaskMemoryBank


def _images(n, value):
    return torch.full((n, 3, 4, 4), float(value))


def test_add_maps_relative_labels_to_global_classes():
    bank = TaskMemoryBank(per_class=10)
    labels = torch.tensor([0, 0, 1, 1, 1])
    images = torch.cat([_images(2, 0.1), _images(3, 0.9)])
    bank.add(images, labels, classes=(40, 7))
    assert bank.classes == [7, 40]
    assert bank.count(40) == 2 and bank.count(7) == 3
    assert torch.allclose(bank.state_dict()["rings"][7].float(), torch.tensor(0.9, dtype=torch.float16).float())


def test_ring_keeps_the_newest_images():
    bank = TaskMemoryBank(per_class=4)
    for v in range(6):
        bank.add(_images(1, v / 10), torch.tensor([0]), classes=(3,))
    kept = sorted(round(float(x), 1) for x in bank.state_dict()["rings"][3][:, 0, 0, 0])
    assert kept == [0.2, 0.3, 0.4, 0.5]


def test_tasks_cross_teachers_with_relative_labels_and_disjoint_support_query():
    bank = TaskMemoryBank(per_class=50)
    for t in range(3):   # three teachers, two classes each
        imgs = torch.rand(40, 3, 4, 4)
        bank.add(imgs, torch.arange(2).repeat_interleave(20), classes=(2 * t, 2 * t + 1))
    rng = np.random.default_rng(0)
    x_s, y_s, x_q, y_q, classes = bank.sample_task(way=5, shot=2, query=3, rng=rng)
    assert x_s.shape == (10, 3, 4, 4) and x_q.shape == (15, 3, 4, 4)
    assert y_s.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert len(set(classes)) == 5 and set(classes) <= set(range(6))
    flat_s = {tuple(x.flatten().tolist()) for x in x_s}
    assert not flat_s & {tuple(x.flatten().tolist()) for x in x_q}


def test_too_few_classes_gives_none_and_state_round_trips():
    bank = TaskMemoryBank(per_class=5)
    bank.add(torch.rand(6, 3, 4, 4), torch.tensor([0, 0, 0, 1, 1, 1]), classes=(1, 2))
    assert bank.sample_task(5, 1, 1, np.random.default_rng(0)) is None
    other = TaskMemoryBank()
    other.load_state_dict(bank.state_dict())
    assert other.classes == bank.classes and other.per_class == 5
    a = bank.sample_task(2, 1, 1, np.random.default_rng(1))
    b = other.sample_task(2, 1, 1, np.random.default_rng(1))
    assert torch.equal(a[0], b[0]) and a[4] == b[4]


def test_the_bank_keeps_each_images_teacher_agreement_through_the_ring_and_checkpoints():
    """``disputed_share`` is the share of banked images whose teacher disputes their label; it follows
    the images when the ring overwrites them and survives a state_dict round trip."""
    bank = TaskMemoryBank(per_class=4)
    bank.add(_images(4, 0.5), torch.tensor([0, 0, 1, 1]), classes=(3, 9),
             agree=torch.tensor([True, False, False, False]))
    assert bank.disputed_share() == 0.75
    bank.add(_images(2, 0.6), torch.tensor([0, 0]), classes=(9,), agree=torch.tensor([True, True]))
    assert bank.count(9) == 4 and bank.disputed_share() == 3 / 6
    for _ in range(2):                                   # class 9's two disputed images are overwritten
        bank.add(_images(1, 0.7), torch.tensor([0]), classes=(9,), agree=torch.tensor([True]))
    assert bank.count(9) == 4 and bank.disputed_share() == 1 / 6
    restored = TaskMemoryBank(per_class=4)
    restored.load_state_dict(bank.state_dict())
    assert restored.disputed_share() == bank.disputed_share()
    unknown = TaskMemoryBank(per_class=4)
    unknown.add(_images(2, 0.1), torch.tensor([0, 0]), classes=(1,))
    assert np.isnan(unknown.disputed_share())


@pytest.mark.parametrize("mode,kept,labels", [("none", 4, [0, 0, 1, 1]), ("agree", 3, [0, 1, 1]),
                                              ("relabel", 4, [0, 1, 1, 1])])
def test_bank_filter_drops_or_relabels_images_their_teacher_disputes(mode, kept, labels):
    import numpy as np

    from raydfml.config import resolve
    from raydfml.records import TeacherRecord
    from raydfml.runtime.meta_learner import MetaLearner

    cfg = resolve("mr", "deepinv", "smoke", {"train.bank_filter": mode})
    ml = MetaLearner(cfg.to_dict(), [10, 20], device="cpu", load_val=False)
    images = np.stack([np.full((3, 32, 32), v, dtype=np.float16) for v in (0.1, 0.2, 0.3, 0.4)])
    rec = TeacherRecord(teacher=0, classes=(10, 20), images=images, labels=np.array([0, 0, 1, 1]),
                        predicted=np.array([0, 1, 1, 1]))             # the teacher disputes image 1
    ml.bank_records([rec])
    assert len(ml.bank) == kept
    by_class = {c: ml.bank.count(c) for c in (10, 20)}
    assert by_class == {10: labels.count(0), 20: labels.count(1)}
    assert ml.bank.disputed_share() == (0.25 if mode == "none" else 0.0)

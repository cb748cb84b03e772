import pytest
import torch

from raydfml.errors import UserError
from raydfml.synthesis import PurerDataset, purer_teacher_loss

from synth_blobs import MEAN, STD

# The blob teacher's head j is the global class TEACHER[j]; deliberately not sorted.
TEACHER = (42, 7, 19, 3, 30)
ALL = (3, 7, 11, 19, 30, 42, 50)          # the synthetic dataset's classes (sorted, a superset)
PER = 4


def dataset(**kw):
    args = dict(classes=ALL, per_class=PER, image_size=32, adv_start=10**6, seed=0)
    return PurerDataset(**{**args, **kw})


def grads(ds, teacher, classes, seed=0):
    loss, g = ds.teacher_loss_and_grad(teacher, classes, ds.rows_for(classes), MEAN, STD, seed)
    return loss, g


def teacher_acc(ds, teacher, classes):
    return purer_teacher_loss(teacher, classes, ds.rows_for(classes), MEAN, STD, 0).teacher_acc


def head_predictions(ds, teacher, cls):
    x = (ds.rows_for([cls]) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return teacher(x).argmax(1)


def test_images_are_in_pixel_range_and_seeded():
    a, b, c = dataset(), dataset(), dataset(seed=1)
    x = a.images()
    assert x.shape == (len(ALL), PER, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x, b.images()) and not torch.equal(x, c.images())
    assert a.rows_for((42, 3)).shape == (2 * PER, 3, 32, 32)
    assert torch.equal(a.rows_for((42,)), x[ALL.index(42)])


def test_steps_raise_the_teachers_accuracy_on_its_rows(blob_teacher):
    ds = dataset()
    before = teacher_acc(ds, blob_teacher, TEACHER)
    losses = []
    for i in range(12):
        loss, g = grads(ds, blob_teacher, TEACHER, seed=i)
        losses.append(loss)
        stats = ds.step([(TEACHER, g)])
    assert stats["teachers"] == 1 and not stats["adversarial"]
    after = teacher_acc(ds, blob_teacher, TEACHER)
    assert after >= 0.9 and after > before
    assert losses[-1] < losses[0]
    # Classes no teacher covers are untouched.
    assert torch.equal(ds.images()[ALL.index(50)], dataset().images()[ALL.index(50)])


def test_targets_follow_each_rows_global_class():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.LazyLinear(5))
    net(torch.rand(2, 3, 8, 8))
    rows = torch.rand(10, 3, 8, 8)
    # Rows in ascending class order (as PURER-Plus's mask selected them) get the teacher's positions.
    rec = purer_teacher_loss(net, TEACHER, rows, MEAN, STD, 0, row_classes=[3, 3, 7, 7, 19, 19, 30, 30, 42, 42])
    assert rec.labels.tolist() == [3, 3, 1, 1, 2, 2, 4, 4, 0, 0]
    assert rec.state_grad["rows"].shape == rows.shape


@pytest.mark.parametrize("listing", [TEACHER, tuple(sorted(TEACHER))], ids=["unsorted", "sorted"])
def test_rows_of_class_c_are_pushed_to_cs_position_in_the_teachers_head(blob_teacher, listing):
    # The same network, its head read as two different class listings: after inversion, the rows of
    # global class c must be classified as listing.index(c), whatever the order (bug §7.3).
    ds = dataset()
    for i in range(12):
        _, g = grads(ds, blob_teacher, listing, seed=i)
        ds.step([(listing, g)])
    for pos, c in enumerate(listing):
        pred = head_predictions(ds, blob_teacher, c)
        assert (pred == pos).float().mean() >= 0.75, (c, pos, pred.tolist())


def test_teacher_gradients_add_up_without_prefix_weights(blob_teacher):
    ds = dataset()
    a, b = (3, 7, 11, 19, 30), (42, 7, 19, 3, 50)             # two teachers sharing classes 3, 7, 19
    _, ga = grads(ds, blob_teacher, a, seed=1)
    _, gb = grads(ds, blob_teacher, b, seed=2)
    both = ds.pixel_grad([(a, ga), (b, gb)])
    assert torch.allclose(both, ds.pixel_grad([(a, ga)]) + ds.pixel_grad([(b, gb)]))
    assert torch.allclose(both, ds.pixel_grad([(b, gb), (a, ga)]))      # order does not matter
    # The step's gradient is that sum chained through the sigmoid parametrisation.
    s = torch.sigmoid(ds.logits.detach())
    ds.step([(a, ga), (b, gb)])
    assert torch.allclose(ds.logits.grad, both * s * (1 - s), atol=1e-9)


def test_adversarial_term_reaches_the_images_through_a_sampled_task():
    ds = dataset(adv_scale=10.0)
    seen = {}

    def adversarial(images):
        x_s, y_s, x_q, y_q, classes = ds.sample_task(2, 1, 2, torch.Generator().manual_seed(0), images=images)
        seen["classes"] = classes
        return -x_q.mean()                                     # a stand-in for -outer_query_loss
    stats = ds.step([], adversarial)
    assert stats["adversarial"] and stats["adv_loss"] is not None
    touched = [ALL[i] for i in range(len(ALL)) if ds.logits.grad[i].abs().sum() > 0]
    assert sorted(touched) == sorted(seen["classes"])


def test_sample_task_shapes_labels_and_rows():
    ds = dataset()
    g = torch.Generator().manual_seed(0)
    x_s, y_s, x_q, y_q, classes = ds.sample_task(3, 1, 2, g)
    assert x_s.shape == (3, 3, 32, 32) and x_q.shape == (6, 3, 32, 32)
    assert y_s.tolist() == [0, 1, 2] and y_q.tolist() == [0, 0, 1, 1, 2, 2]
    assert len(set(classes)) == 3 and set(classes) <= set(ALL)
    for j, c in enumerate(classes):
        pool = ds.rows_for([c])
        picked = torch.cat([x_s[j:j + 1], x_q[2 * j:2 * j + 2]])
        assert all(any(torch.equal(p, r) for r in pool) for p in picked)
        assert len({tuple(p.flatten()[:50].tolist()) for p in picked}) == 3        # support/query disjoint
    again = ds.sample_task(3, 1, 2, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], x_s) and again[4] == classes
    with pytest.raises(UserError):
        ds.sample_task(3, 2, 3, g)                               # 5 rows per class > per_class 4


def test_curriculum_fires_at_adv_start_and_after_patience_stalls():
    ds = dataset(adv_start=3, patience=2)
    fired = [ds.curriculum(r, acc) for r, acc in enumerate([0.1, 0.2, 0.3, 0.3])]
    assert fired == [False, False, False, True]                  # round 3 == adv_start
    # After adv_start: a new max resets the count; `patience` rounds without one fire it.
    # Firing forgets the best, so the count restarts from the next round's accuracy.
    seq = [(4, 0.5), (5, 0.6), (6, 0.6), (7, 0.55), (8, 0.7), (9, 0.7), (10, 0.7), (11, 0.2), (12, 0.1)]
    fired = [ds.curriculum(r, acc) for r, acc in seq]
    assert fired == [False, False, False, True, False, False, True, False, False]


def test_state_dict_round_trip_reproduces_the_next_step(blob_teacher):
    ds = dataset(adv_start=1, patience=2)
    for i in range(2):
        ds.step([(TEACHER, grads(ds, blob_teacher, TEACHER, seed=i)[1])])
    ds.curriculum(1, 0.5)
    ds.curriculum(2, 0.6)
    ds.curriculum(3, 0.4)
    state = ds.state_dict()
    frozen_logits = state["logits"].clone()

    other = dataset(seed=9, adv_start=1, patience=2)
    other.load_state_dict(state)
    assert torch.equal(other.images(), ds.images())
    for d in (ds, other):
        d.step([(TEACHER, grads(d, blob_teacher, TEACHER, seed=5)[1])])
    assert torch.equal(other.logits, ds.logits)                 # Adam moments came along
    assert torch.equal(state["logits"], frozen_logits)           # the saved state is a copy
    assert ds.curriculum(4, 0.3) == other.curriculum(4, 0.3) == True   # stall counter came along

    with pytest.raises(UserError, match="checkpoint"):
        dataset(classes=(1, 2)).load_state_dict(state)


def test_bad_configuration_is_a_user_error():
    with pytest.raises(UserError):
        PurerDataset([1, 1], 4, 32)
    with pytest.raises(UserError, match="augment"):
        PurerDataset([1, 2], 4, 32, augment="blur")


def test_bn_weight_zero_needs_no_batchnorm_layers():
    """At ``bn_weight`` 0 (PURER's quick profile) the loss takes no BN statistics, so no hooks are set and
    a teacher without BatchNorm layers is fine; any positive weight still needs them."""
    torch.manual_seed(0)
    no_bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    rows = torch.rand(4, 3, 8, 8)
    rec = purer_teacher_loss(no_bn, (3, 5), rows, MEAN, STD, seed=0, bn_weight=0.0)
    assert rec.state_grad["rows"].shape == rows.shape and rec.state_grad["rows"].abs().sum() > 0
    with pytest.raises(RuntimeError, match="BNStatsLoss"):
        purer_teacher_loss(no_bn, (3, 5), rows, MEAN, STD, seed=0, bn_weight=0.01)

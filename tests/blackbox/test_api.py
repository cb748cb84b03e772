"""BlackBoxAPI: predict-only access, 8-bit inputs, no autograd or weights out, counters and budgets."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from bb_teachers import MEAN, SIZE, STD, WAY, normalise, square_images
from raydfml.blackbox import (BlackBoxAPI, BudgetExceeded, QueryBudget, WhiteBoxAccessError, require_white_box,
                              total_counts)
from raydfml.errors import UserError
from raydfml.models import build_model, resize


def forward_counter(module: nn.Module) -> list:
    """Counts forward passes of ``module`` (registered before it is wrapped: the API refuses hooks)."""
    seen = []
    module.register_forward_hook(lambda *_: seen.append(1))
    return seen


@pytest.mark.parametrize("output", ["probs", "logits", "label"])
def test_answers_hold_no_autograd_history(teacher, output):
    api = BlackBoxAPI(teacher, MEAN, STD, output=output)
    x = torch.rand(6, 3, SIZE, SIZE, requires_grad=True)
    out = api.predict(x * 1.0)                       # a non-leaf with a graph behind it
    assert not out.requires_grad and out.grad_fn is None and out.device == x.device
    if output == "label":
        assert out.dtype == torch.int64 and out.shape == (6,)
    else:
        assert out.dtype == torch.float32 and out.shape == (6, WAY)
    if output == "probs":
        torch.testing.assert_close(out.sum(1), torch.ones(6))
    assert not isinstance(api, nn.Module) and not isinstance(out, nn.Parameter)


def test_answers_match_the_teacher_on_normalised_images(teacher):
    reference = copy.deepcopy(teacher)
    x, _ = square_images(3, seed=5)
    api = BlackBoxAPI(teacher, MEAN, STD, output="logits", input="float")
    torch.testing.assert_close(api.predict(x), reference(normalise(x)))
    # The API's own preprocessing resizes to the resolution its teacher was trained at.
    big = torch.rand(4, 3, 2 * SIZE, 2 * SIZE)
    api32 = BlackBoxAPI(copy.deepcopy(reference), MEAN, STD, output="logits", input="float", image_size=SIZE)
    torch.testing.assert_close(api32.predict(big), reference(normalise(resize(big, SIZE))))


def test_inputs_are_quantised_to_8_bits(teacher):
    x, _ = square_images(3, seed=5)
    on_grid = torch.round(x * 255) / 255
    nudge = (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) - 0.5) * (0.6 / 255)  # < half a level
    api8 = BlackBoxAPI(copy.deepcopy(teacher), MEAN, STD, output="logits")
    assert torch.equal(api8.predict(on_grid + nudge), api8.predict(on_grid))
    assert torch.equal(api8.predict(x), api8.predict(on_grid))
    apif = BlackBoxAPI(teacher, MEAN, STD, output="logits", input="float")
    assert not torch.equal(apif.predict(on_grid + nudge), apif.predict(on_grid))


@pytest.mark.parametrize("reach", [
    lambda api: api.parameters(),
    lambda api: api.state_dict(),
    lambda api: api.named_modules(),
    lambda api: api.modules(),
    lambda api: api.buffers(),
    lambda api: api.eval(),
    lambda api: api.forward(torch.rand(1, 3, SIZE, SIZE)),
    lambda api: api.register_forward_hook(lambda *_: None),
    lambda api: api.training,
], ids=["parameters", "state_dict", "named_modules", "modules", "buffers", "eval", "forward", "hook", "training"])
def test_white_box_access_fails_loudly(teacher, reach):
    api = BlackBoxAPI(teacher, MEAN, STD, name="teacher 3")
    with pytest.raises(WhiteBoxAccessError, match="teacher 'teacher 3' is a black-box API"):
        reach(api)


def test_calling_it_like_a_module_fails_loudly(teacher):
    api = BlackBoxAPI(teacher, MEAN, STD)
    with pytest.raises(TypeError, match="is a black-box API: calling it like a module"):
        api(torch.rand(1, 3, SIZE, SIZE))
    with pytest.raises(WhiteBoxAccessError):        # nn.Module's own methods, applied to it, fail too
        next(nn.Module.parameters(api))
    assert not hasattr(api, "parameters")          # probes (copy, pickle, hasattr) see "no attribute"


def test_it_pickles_and_copies(teacher):
    """Ray ships objects by pickling; the API must survive it, counts included."""
    api = BlackBoxAPI(teacher, MEAN, STD, name="t0", classes=(4, 7, 9, 11, 2))
    x = torch.rand(2, 3, SIZE, SIZE)
    first = api.predict(x)
    for clone in (pickle.loads(pickle.dumps(api)), copy.deepcopy(api)):
        assert clone.counts() == api.counts() and clone.classes == api.classes
        torch.testing.assert_close(clone.predict(x), first)


def test_batchnorm_on_request_statistics_is_refused():
    net = build_model("conv4", num_classes=WAY, image_size=SIZE, track_bn_stats=False)
    with pytest.raises(UserError, match="depend on the rest of the query"):
        BlackBoxAPI(net, MEAN, STD, name="bad")


def test_bad_options_are_one_line_errors(teacher):
    for kwargs in ({"output": "softmax"}, {"input": "int8"}, {"max_images": -1}):
        with pytest.raises(UserError) as err:
            BlackBoxAPI(copy.deepcopy(teacher), MEAN, STD, **kwargs)
        assert "\n" not in str(err.value)
    api = BlackBoxAPI(teacher, MEAN, STD)
    with pytest.raises(ValueError, match="float"):
        api.predict(torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8))


def test_api_budget_refuses_before_querying(teacher):
    seen = forward_counter(teacher)
    api = BlackBoxAPI(teacher, MEAN, STD, name="teacher 7", max_images=10)
    api.predict(torch.rand(8, 3, SIZE, SIZE))
    assert len(seen) == 1 and api.counts()["images"] == 8
    with pytest.raises(BudgetExceeded) as err:
        api.predict(torch.rand(3, 3, SIZE, SIZE))
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, UserError)
    assert "'teacher 7'" in message and "budget of 10 images" in message and "8 used in 1 calls" in message
    assert len(seen) == 1 and api.counts() == {"api": "teacher 7", "calls": 1, "images": 8, "max_images": 10}
    api.predict(torch.rand(2, 3, SIZE, SIZE))       # exactly up to the cap is fine
    assert api.images == 10


def test_run_budget_is_shared_by_apis(teacher):
    run = QueryBudget(max_images=12)
    a = BlackBoxAPI(copy.deepcopy(teacher), MEAN, STD, name="a", budget=run)
    seen_b = forward_counter(teacher)
    b = BlackBoxAPI(teacher, MEAN, STD, name="b", budget=run)
    a.predict(torch.rand(7, 3, SIZE, SIZE))
    b.predict(torch.rand(4, 3, SIZE, SIZE))
    with pytest.raises(BudgetExceeded, match=r"API 'b' would exceed the run query budget of 12 images \(11 used in 2"):
        b.predict(torch.rand(2, 3, SIZE, SIZE))
    assert len(seen_b) == 1 and b.images == 4 and run.images == 11 and run.calls == 2
    with pytest.raises(BudgetExceeded, match="a recovery of 50 images"):
        a.check_budget(50, use="a recovery")        # a whole recovery can be checked up front
    assert run.images == 11


def test_counts_restore_exactly(teacher):
    run = QueryBudget(max_images=1000)
    api = BlackBoxAPI(copy.deepcopy(teacher), MEAN, STD, name="teacher 2", budget=run, max_images=100)
    for n in (5, 3, 9):
        api.predict(torch.rand(n, 3, SIZE, SIZE))
    saved_api, saved_run = api.counts(), run.counts()
    assert saved_api == {"api": "teacher 2", "calls": 3, "images": 17, "max_images": 100}
    assert saved_run == {"budget": "run", "max_images": 1000, "calls": 3, "images": 17}

    # A replaced actor rebuilds its APIs from scratch and gets the totals back from the checkpoint.
    run2 = QueryBudget(max_images=1000)
    fresh = BlackBoxAPI(teacher, MEAN, STD, name="teacher 2", budget=run2, max_images=100)
    fresh.restore(saved_api)
    run2.restore(saved_run)
    assert fresh.counts() == saved_api and run2.counts() == saved_run
    with pytest.raises(BudgetExceeded, match="17 used in 3 calls"):
        fresh.predict(torch.rand(84, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="restored into API 'teacher 2'"):
        fresh.restore({"api": "teacher 5", "calls": 1, "images": 1})
    assert total_counts([saved_api, {"api": "x", "calls": 2, "images": 40}]) == {"calls": 5, "images": 57}


def test_require_white_box(teacher):
    assert require_white_box(teacher, "DeepInversion") is teacher
    api = BlackBoxAPI(teacher, MEAN, STD, name="teacher 0")
    with pytest.raises(UserError) as err:
        require_white_box(api, "DeepInversion")
    assert str(err.value) == ("DeepInversion needs a white-box teacher (BN statistics / gradients); this pool's "
                              "teachers are black-box APIs (teacher 'teacher 0')")


def test_from_zoo(teacher, tmp_path):
    from raydfml.utils import sha256_file
    from raydfml.zoo.manifest import TeacherRecord, write_manifest

    torch.save(teacher.state_dict(), tmp_path / "teacher_3.pt")
    record = TeacherRecord(teacher_id=3, dataset="squares", arch="conv4", width=1.0, image_size=SIZE,
                           classes=(8, 1, 5, 0, 2), heldout_acc=1.0, seed=0, epochs=1, file="teacher_3.pt",
                           sha256=sha256_file(tmp_path / "teacher_3.pt"))
    write_manifest(tmp_path, [record])
    api = BlackBoxAPI.from_zoo(tmp_path, record, MEAN, STD, output="logits", input="float")
    assert api.name == "teacher 3" and api.classes == (8, 1, 5, 0, 2) and api.way == 5
    x = torch.rand(3, 3, SIZE, SIZE)
    torch.testing.assert_close(api.predict(x), teacher(normalise(x)))

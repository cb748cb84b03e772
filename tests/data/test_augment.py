import pytest
import torch

from raydfml.data.augment import AUGMENTATIONS, augment
from raydfml.errors import UserError


def batch(n=8, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", AUGMENTATIONS)
def test_shape_range_and_determinism(kind):
    x = batch()
    a = augment(x, kind, torch.Generator().manual_seed(1))
    b = augment(x, kind, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    if kind != "none":
        assert not torch.equal(a, augment(x, kind, torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("kind", [k for k in AUGMENTATIONS if k != "none"])
def test_each_image_gets_its_own_draw(kind):
    # Many copies of one image: a batch-wide draw (the seeds' bug B15) would make them all equal.
    x = batch(1).expand(16, -1, -1, -1).contiguous()
    out = augment(x, kind, torch.Generator().manual_seed(0))
    distinct = {tuple(o.flatten()[:4096:97].tolist()) for o in out}
    assert len(distinct) > 8
    assert not torch.equal(out[0], out[1]) or not torch.equal(out[0], out[2])


@pytest.mark.parametrize("kind", AUGMENTATIONS)
def test_gradients_flow(kind):
    x = batch(4).requires_grad_(True)
    augment(x, kind, torch.Generator().manual_seed(0)).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_shift_is_a_per_image_roll():
    x = batch(6, size=16)
    out = augment(x, "shift", torch.Generator().manual_seed(3))
    for i in range(6):
        rolls = [torch.roll(x[i], (dy, dx), (1, 2)) for dy in range(-2, 3) for dx in range(-2, 3)]
        assert any(torch.equal(out[i], r) for r in rolls)


def test_crop_flip_is_a_padded_crop_or_its_mirror():
    x = batch(6, size=16)
    out = augment(x, "crop_flip", torch.Generator().manual_seed(5))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(6):
        crops = [padded[i, :, dy:dy + 16, dx:dx + 16] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops)


def test_colour_changes_colours_but_keeps_the_shape_of_the_image():
    x = torch.zeros(32, 3, 16, 16)
    x[:, 0, 4:12, 4:12] = 1.0                      # a red square on black
    out = augment(x, "colour", torch.Generator().manual_seed(0))
    # Channels were permuted/inverted: the red channel is not always the one that carries the square.
    centre_colours = {tuple((o[:, 8, 8] > 0.5).tolist()) for o in out}
    assert len(centre_colours) > 2
    # Geometry: still a square-shaped region differing from the background (up to a +-2 px shift).
    diff = (out[:, :, 8, 8] - out[:, :, 0, 0]).abs().sum(1)
    assert (diff > 0.1).float().mean() > 0.9


def test_unknown_kind_names_the_option():
    with pytest.raises(UserError, match="augment"):
        augment(batch(2), "mixup")


def test_device_of_draws_does_not_matter_for_cpu_results():
    # Draws come from the generator (CPU), so results depend on the seed only.
    x = batch(4)
    torch.manual_seed(123)
    a = augment(x, "colour", torch.Generator().manual_seed(9))
    torch.manual_seed(456)
    b = augment(x, "colour", torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def test_crop_is_crop_flip_without_the_flips():
    """Same generator state: the same crops; crop_flip's flipped images come back unflipped."""
    x = batch(8, size=16)
    flipped = augment(x, "crop_flip", torch.Generator().manual_seed(7))
    cropped = augment(x, "crop", torch.Generator().manual_seed(7))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    crops = [[padded[i, :, dy:dy + 16, dx:dx + 16] for dy in range(9) for dx in range(9)] for i in range(8)]
    assert all(any(torch.equal(cropped[i], c) for c in crops[i]) for i in range(8))
    same = [torch.equal(cropped[i], flipped[i]) for i in range(8)]
    assert any(same) and not all(same)
    assert all(s or torch.equal(cropped[i], flipped[i].flip(-1)) for i, s in enumerate(same))


def test_auto_augment_drops_the_flip_for_letters():
    from raydfml.config import resolve

    assert resolve("mr", "tgr", "smoke").synth.augment == "crop"                    # glyphs: letters
    assert resolve("mr", "tgr", "smoke", {"data.dataset": "cifarfs"}).synth.augment == "crop_flip"
    assert resolve("mr", "tgr", "smoke", {"synth.augment": "crop_flip"}).synth.augment == "crop_flip"
    assert resolve("mr", "deepinv", "smoke").synth.augment == "shift"               # pixel inversion's own

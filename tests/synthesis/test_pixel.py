import pytest

from raydfml.config import resolve
from raydfml.errors import UserError
from raydfml.synthesis import build_synthesizer
from raydfml.synthesis.base import make_normalizer, total_variation

from synth_blobs import MEAN, STD


def test_the_tv_prior_is_an_option_that_reaches_pixel_inversion():
    """``synth.tv_weight`` was fixed at 1e-4 inside pixel inversion; it is an option now (deepinv's quick
    preset raises it), and a negative weight is refused in one line."""
    cfg = resolve("mr", "deepinv", "smoke", {"synth.tv_weight": 0.05})
    assert build_synthesizer(cfg.synth, 32).loss_cfg["tv_weight"] == 0.05
    with pytest.raises(UserError, match="synth.tv_weight=-1"):
        resolve("mr", "deepinv", "smoke", {"synth.tv_weight": -1})
    with pytest.raises(UserError, match="purer.tv_weight=-1"):       # PURER's own loss weights alike
        resolve("ma", "purer", "smoke", {"purer.tv_weight": -1})


def test_a_larger_tv_prior_gives_smoother_images_the_teacher_still_classifies(blob_teacher):
    """Same seed, same steps: the images recovered with the stronger TV prior vary less between neighbouring
    pixels, and the teacher still labels most of them as intended."""
    recovered = {}
    for tv in (1e-4, 1e-2):
        cfg = resolve("mr", "deepinv", "smoke", {"synth.tv_weight": tv, "synth.steps": 15, "synth.per_class": 4})
        synth = build_synthesizer(cfg.synth, 32)
        recovered[tv] = synth.synthesize(blob_teacher, (0, 1, 2, 3, 4), MEAN, STD, seed=3)
    normalize = make_normalizer(MEAN, STD, "cpu")
    tv = {w: float(total_variation(normalize(r.images.float()))) for w, r in recovered.items()}
    assert tv[1e-2] < 0.8 * tv[1e-4], tv
    assert recovered[1e-2].teacher_acc >= 0.6, recovered[1e-2].teacher_acc

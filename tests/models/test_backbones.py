import pytest
import torch
from torch.func import functional_call

from raydfml.errors import UserError
from raydfml.models import ARCHS, Generator, build_model


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", [32, 84])
def test_output_shape_any_input_size(arch, size):
    adaptive = arch == "conv4"
    model = build_model(arch, num_classes=5, image_size=size, width=0.125, adaptive_pool=adaptive)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 5)


def test_conv4_feature_dims_follow_the_seeds():
    assert build_model("conv4", image_size=32).feature_dim == 128
    assert build_model("conv4", image_size=84).feature_dim == 800
    m = build_model("conv4", adaptive_pool=True)
    # one definition takes both sizes with the adaptive head
    assert m(torch.randn(2, 3, 32, 32)).shape == m(torch.randn(2, 3, 84, 84)).shape == (2, 5)


def test_width_multiplier_narrows_channels():
    wide = sum(p.numel() for p in build_model("resnet10").parameters())
    narrow = sum(p.numel() for p in build_model("resnet10", width=0.25).parameters())
    assert narrow < wide / 10


def test_teacher_keeps_running_stats_and_meta_model_has_none():
    teacher = build_model("conv4")
    meta = build_model("conv4", track_bn_stats=False)
    assert any("running_mean" in n for n, _ in teacher.named_buffers())
    assert not any("running_mean" in n for n, _ in meta.named_buffers())


def test_functional_call_matches_module_and_uses_given_params():
    torch.manual_seed(0)
    meta = build_model("conv4", track_bn_stats=False)
    x = torch.randn(8, 3, 32, 32)
    params = {n: p.detach().clone() for n, p in meta.named_parameters()}
    assert torch.allclose(functional_call(meta, params, (x,)), meta(x), atol=1e-6)
    params["classifier.bias"] = params["classifier.bias"] + 1.0
    assert torch.allclose(functional_call(meta, params, (x,)), meta(x) + 1.0, atol=1e-5)


def test_unknown_architecture_is_a_user_error():
    with pytest.raises(UserError, match="resnet99"):
        build_model("resnet99")


def test_generator_outputs_images_in_unit_range():
    g = Generator(nz=16, ngf=8, image_size=32)
    x = g(torch.randn(4, 16))
    assert x.shape == (4, 3, 32, 32) and x.min() >= 0 and x.max() <= 1

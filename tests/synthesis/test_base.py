import pytest
import torch
from torch import nn

from raydfml.synthesis.base import BNStatsLoss, frozen, relative_targets, total_variation


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4))


def hooks_left(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_bn_stats_loss_is_zero_when_the_batch_has_the_running_statistics():
    net = small_net()
    x = torch.randn(16, 3, 8, 8) * 2 + 1
    # momentum 1: the running statistics become this batch's; PyTorch stores the unbiased variance,
    # DeepInversion compares with the biased one, so rescale. Then eval mode normalises layer 1
    # exactly as train mode did and layer 2 sees the same input.
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
    net.train()
    with torch.no_grad():
        net(x)
    n = 16 * 8 * 8
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.mul_((n - 1) / n)
    net.eval()
    with BNStatsLoss(net) as bn:
        net(x)
        assert bn.loss().item() < 1e-4
        net(torch.rand(16, 3, 8, 8))
        assert bn.loss().item() > 0.1


def test_bn_stats_loss_is_differentiable_and_hooks_are_removed_even_on_error():
    net = small_net().eval()
    x = torch.rand(4, 3, 8, 8, requires_grad=True)
    with BNStatsLoss(net) as bn:
        net(x)
        bn.loss().backward()
    assert x.grad.abs().sum() > 0
    assert hooks_left(net) == 0
    with pytest.raises(RuntimeError):
        with BNStatsLoss(net) as bn:
            assert hooks_left(net) == 2
            raise RuntimeError("boom")
    assert hooks_left(net) == 0


def test_bn_stats_loss_needs_running_statistics():
    net = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="running statistics"):
        with BNStatsLoss(net):
            pass


def test_frozen_restores_the_callers_settings():
    net = small_net().train()
    net[0].weight.requires_grad_(False)
    with frozen(net):
        assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert net.training and not net[0].weight.requires_grad and net[0].bias.requires_grad


def test_relative_targets_map_global_classes_to_head_positions():
    assert relative_targets((42, 7, 19), [7, 7, 19, 42]).tolist() == [1, 1, 2, 0]
    with pytest.raises(ValueError, match="not among"):
        relative_targets((1, 2), [3])


def test_total_variation_is_zero_on_constant_images():
    assert total_variation(torch.ones(2, 3, 5, 5)).item() == 0
    assert total_variation(torch.rand(2, 3, 5, 5)).item() > 0

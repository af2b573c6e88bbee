"""The UNet's optional second time (``second_time=True``): ``s`` reaches every residual block through a FiLM
added to the ``t`` FiLM, starts switched off (zero-initialised), and the default UNet is unchanged."""

from pathlib import Path

import pytest
import torch

from onestep.nets import build_backbone
from onestep.nets.unet import ResBlock, UNet

SMALL = dict(base_channels=8, channel_mult=(1, 2), time_dim=16)
DEEP = dict(base_channels=8, channel_mult=(1, 2, 2), time_dim=16, attention=True, attention_heads=2, num_res_blocks=2)


def perturbed(net: UNet, seed: int = 1) -> UNet:
    """Every weight (the zero-initialised output conv and s-FiLMs included) moved off its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


def inputs(batch: int = 4):
    g = torch.Generator().manual_seed(3)
    return torch.randn(batch, 1, 8, 8, generator=g), torch.rand(batch, generator=g), torch.rand(batch, generator=g)


def test_default_unet_reproduces_the_outputs_of_the_code_before_the_option():
    """tests/data/unet_main_a53c6c2_outputs.pt: the outputs this body computes, written by the same body run on
    main a53c6c2's UNet (before the option); the default UNet must draw and compute the same."""
    expected = torch.load(Path(__file__).parent / "data" / "unet_main_a53c6c2_outputs.pt")
    for kw, want in zip((SMALL, DEEP), expected, strict=True):
        torch.manual_seed(0)
        net = UNet(1, **kw)
        assert not any(UNet.is_second_time_key(k) for k in net.state_dict())  # old checkpoints keep their keys
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        g = torch.Generator().manual_seed(3)
        x, t = torch.randn(4, 1, 8, 8, generator=g), torch.rand(4, generator=g)
        # equal on the machine that wrote the file; a tolerance only for other CPUs' kernels
        torch.testing.assert_close(net(x, t).detach(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kw", [SMALL, DEEP])
def test_untrained_second_time_is_the_one_time_net_of_the_same_seed(kw):
    torch.manual_seed(0)
    one = UNet(1, **kw)
    torch.manual_seed(0)
    two = UNet(1, second_time=True, **kw)
    mine = {k: v for k, v in two.state_dict().items() if not UNet.is_second_time_key(k)}
    theirs = one.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)  # same draws
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the same random weights in both (the zero output conv too), s-FiLMs left at zero
        for name, p in one.named_parameters():
            noise = 0.05 * torch.randn(p.shape, generator=g)
            p.add_(noise)
            two.get_parameter(name).add_(noise)
    x, t, s = inputs()
    with torch.no_grad():
        assert torch.equal(two(x, t, s), one(x, t)) and torch.equal(two(x, t, 1 - s), one(x, t))
    assert [n for n, p in two.named_parameters() if p.dim() >= 2][-1] == "output.2.weight"  # output stays last


def test_s_reaches_every_block_and_every_block_learns_from_it():
    torch.manual_seed(0)
    net = perturbed(UNet(1, second_time=True, **DEEP))
    blocks = [m for m in net.modules() if isinstance(m, ResBlock)]
    assert len(blocks) == 6 + 2 + 9 and all(b.film_s is not None for b in blocks)  # down 3x2, mid 2, up 3x3
    x, t, s = inputs()
    with torch.no_grad():
        base = net(x, t, s)
        assert not torch.allclose(base, net(x, t, 1 - s))
        for block in blocks:  # switching one block's s-FiLM off changes the output
            saved = [p.clone() for p in block.film_s.parameters()]
            for p in block.film_s.parameters():
                p.zero_()
            assert not torch.allclose(net(x, t, s), base, rtol=0, atol=1e-6)
            for p, v in zip(block.film_s.parameters(), saved):
                p.copy_(v)
        assert torch.equal(net(x, t, s), base)
    net(x, t, s).square().mean().backward()
    assert all(b.film_s[-1].weight.grad.abs().sum() > 0 for b in blocks)
    assert all(p.grad.abs().sum() > 0 for p in net.second_time_embed.parameters())


def test_zero_init_keeps_gradients_flowing_into_the_s_films():
    """Only the s-FiLMs' last layers start at zero (not the s embedding too): their weight gradient is
    silu(e_s) times the upstream gradient, non-zero from the first step."""
    torch.manual_seed(0)
    net = UNet(1, second_time=True, **SMALL)
    with torch.no_grad():
        net.output[-1].weight.normal_(0, 0.1)
    x, t, s = inputs()
    net(x, t, s).square().mean().backward()
    films = [m.film_s for m in net.modules() if isinstance(m, ResBlock)]
    assert all(f[-1].weight.abs().sum() == 0 and f[-1].weight.grad.abs().sum() > 0 for f in films)


def test_second_time_through_build_backbone_and_bad_use():
    net = build_backbone({"name": "unet", "second_time": True, "second_time_features": 6, **SMALL}, (1, 8, 8))
    assert net.second_time_embed[1].in_features == 6
    x, t, s = inputs()
    assert net(x, t, s).shape == x.shape
    with pytest.raises(ValueError, match="pass the second time s"):
        net(x, t)
    with pytest.raises(ValueError, match="built without second_time=True"):
        UNet(1, **SMALL)(x, t, s)
    with pytest.raises(ValueError, match="time_dim > 0"):
        build_backbone({"name": "unet", "second_time": True, "base_channels": 8, "channel_mult": [1, 2]}, (1, 8, 8),
                       time_conditioned=False)

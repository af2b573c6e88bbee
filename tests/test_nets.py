"""Tests for onestep.nets: shapes, flow identities, invertibility, init, time embeddings, errors, gradients."""

import pytest
import torch

from onestep.nets import (
    MLP,
    ConvDecoder,
    ConvEncoder,
    FlowMap,
    ResNetFlow,
    SinusoidalTimeEmbedding,
    UNet,
    as_batch_time,
    build_backbone,
    make_flow_time,
)

B = 3
SMALL = {  # small widths keep the suite fast
    "mlp": {"hidden": (32, 32), "time_dim": 16},
    "unet": {"base_channels": 16, "channel_mult": (1, 2, 2), "time_dim": 32},
    "resnet_flow": {"n_blocks": 2, "hidden": (32, 32)},
    "conv_decoder": {"base_channels": 8},
    "conv_encoder": {"base_channels": 8},
}
CASES = [  # (name, in_shape, out_shape)
    ("mlp", (2,), (2,)),
    ("mlp", (64,), (64,)),
    ("mlp", (1, 28, 28), (1, 28, 28)),
    ("mlp", (3, 32, 32), (3, 32, 32)),
    ("mlp", (64,), (1, 28, 28)),
    ("unet", (1, 28, 28), (1, 28, 28)),
    ("unet", (3, 32, 32), (3, 32, 32)),
    ("resnet_flow", (2,), (2,)),
    ("resnet_flow", (64,), (64,)),
    ("conv_decoder", (64,), (1, 28, 28)),
    ("conv_decoder", (2,), (3, 32, 32)),
    ("conv_encoder", (1, 28, 28), (64,)),
    ("conv_encoder", (3, 32, 32), (2,)),
]


def _build(name, in_shape, out_shape, **extra):
    return build_backbone({"name": name, **SMALL[name], **extra}, in_shape, out_shape)


def _randomise_zero_params(net):
    """Give zero-initialised tensors (e.g. the UNet's last conv) random values so gradients reach everything."""
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("name,in_shape,out_shape", CASES, ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("t_kind", ["scalar", "vector", "column"])
def test_output_shapes(name, in_shape, out_shape, t_kind):
    net = _build(name, in_shape, out_shape)
    t = {"scalar": torch.tensor(0.3), "vector": torch.rand(B), "column": torch.rand(B, 1)}[t_kind]
    y = net(torch.randn(B, *in_shape), t)
    assert y.shape == (B, *out_shape)
    assert torch.isfinite(y).all()
    assert (net.in_shape, net.out_shape, net.backbone_name) == (in_shape, out_shape, name)


@pytest.mark.parametrize("shape,cls", [((2,), MLP), ((5,), MLP), ((1, 28, 28), UNet), ((3, 32, 32), UNet)])
def test_default_spec(shape, cls):
    net = build_backbone(None, shape)
    assert isinstance(net, cls)
    assert net(torch.randn(2, *shape), torch.rand(2)).shape == (2, *shape)


def test_untimed_backbones_ignore_t():
    mlp = build_backbone({"name": "mlp", "hidden": [16]}, (4,), time_conditioned=False)  # lists as from YAML
    unet = build_backbone({"name": "unet", "base_channels": 8}, (1, 28, 28), time_conditioned=False)
    assert mlp.time_embed is None and unet.time_embed is None and not mlp.time_conditioned
    assert mlp(torch.randn(2, 4)).shape == (2, 4)
    assert unet(torch.randn(2, 1, 28, 28)).shape == (2, 1, 28, 28)
    assert isinstance(build_backbone("conv_decoder", (8,), (1, 28, 28)), ConvDecoder)
    assert isinstance(build_backbone("conv_encoder", (1, 28, 28), (8,)), ConvEncoder)


# -------------------------------------------------------------------------------------- time embeddings
@pytest.mark.parametrize("t", [0.5, torch.tensor(0.5), torch.rand(B), torch.rand(B, 1)], ids=["float", "0d", "B", "B1"])
@pytest.mark.parametrize("dim", [8, 7])
def test_sinusoidal_time_shapes(t, dim):
    emb = SinusoidalTimeEmbedding(dim)
    assert emb(t, batch_size=B).shape == (B, dim)
    if not torch.is_tensor(t) or t.numel() == 1:
        assert emb(t).shape == (1, dim)
    assert torch.isfinite(emb(torch.rand(B))).all()


def test_sinusoidal_time_distinguishes_nearby_times():
    emb = SinusoidalTimeEmbedding(64)
    e = emb(torch.tensor([0.50, 0.51]))
    assert (e[0] - e[1]).norm() > 0.1


@pytest.mark.parametrize("name", ["identity", "linear", "tanh", "log", "TimeTanh"])
@pytest.mark.parametrize("t", [torch.tensor(0.0), torch.zeros(B), torch.zeros(B, 1)], ids=["0d", "B", "B1"])
def test_flow_time_zero_at_zero(name, t):
    h = make_flow_time(name, 4)
    out = h(t, batch_size=B)
    assert out.shape == (B, 4)
    assert torch.equal(out, torch.zeros(B, 4))
    assert h(torch.rand(B, 1)).shape == (B, 4)
    assert h(torch.full((B,), 0.7)).abs().sum() > 0


def test_time_tanh_bounded():
    h = make_flow_time("tanh", 16)
    assert (h(torch.linspace(0, 1, 11)).abs() < 1).all()


def test_as_batch_time_mismatch():
    with pytest.raises(ValueError, match="batch has 4"):
        as_batch_time(torch.rand(3), 4)


# ------------------------------------------------------------------------------------- flow identities
@pytest.mark.parametrize("time_embed", ["identity", "linear", "tanh", "log"])
@pytest.mark.parametrize("dim", [2, 64])
def test_resnet_flow_identity_at_zero(time_embed, dim):
    flow = ResNetFlow(dim, n_blocks=3, hidden=(32, 32), time_embed=time_embed)
    x = torch.randn(B, dim) * 5
    assert torch.equal(flow(x, torch.zeros(B)), x)
    assert torch.equal(flow(x, 0.0), x)
    assert not torch.allclose(flow(x, torch.ones(B)), x)


@pytest.mark.parametrize("shape", [(2,), (1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("time_fn,per_channel", [("identity", False), ("tanh", True), ("linear", False)])
def test_flow_map_identity_at_zero(shape, time_fn, per_channel):
    net = _build("unet" if len(shape) == 3 else "mlp", shape, shape)
    _randomise_zero_params(net)  # a non-zero residual, otherwise the test is trivial
    flow = FlowMap(net, time_fn=time_fn, time_dim=shape[0] if per_channel else 1)
    x = torch.randn(B, *shape)
    assert torch.equal(flow(x, torch.zeros(B, 1)), x)
    assert torch.equal(flow(x, 0.0), x)
    assert not torch.allclose(flow(x, torch.ones(B)), x)
    if time_fn == "identity":  # phi(x, t) = x + t * net(x, t)
        t = torch.rand(B)
        expected = x + t.view(B, *([1] * len(shape))) * net(x, t)
        assert torch.allclose(flow(x, t), expected, atol=1e-6)


def test_flow_map_rejects_bad_time_dim_and_missing_t():
    flow = FlowMap(_build("mlp", (4,), (4,)), time_fn="tanh", time_dim=3)
    with pytest.raises(ValueError, match="broadcast"):
        flow(torch.randn(B, 4), torch.rand(B))
    with pytest.raises(ValueError, match="needs a time"):
        flow(torch.randn(B, 4))


# ------------------------------------------------------------------------------------- invertibility
@pytest.mark.parametrize("dim", [2, 16])
@pytest.mark.parametrize("normalize_first_layer", [False, True])
def test_resnet_flow_inverse(dim, normalize_first_layer):
    flow = ResNetFlow(dim, n_blocks=4, hidden=(64, 64), normalize_first_layer=normalize_first_layer).eval()
    x = torch.randn(64, dim) * 2
    t = torch.rand(64)
    with torch.no_grad():
        y = flow(x, t)
    assert (flow.inverse(y, t) - x).abs().max() < 1e-4


@pytest.mark.parametrize("normalize_first_layer", [False, True])
def test_resnet_flow_lipschitz(normalize_first_layer):
    flow = ResNetFlow(2, n_blocks=2, hidden=(64, 64), normalize_first_layer=normalize_first_layer).eval()
    for block in flow.blocks:
        linears = [m for m in block.g if isinstance(m, torch.nn.Linear)]
        norms = [torch.linalg.matrix_norm(m.weight.detach(), ord=2).item() for m in linears]
        checked = norms if normalize_first_layer else norms[1:]  # first layer unnormalised as stribor
        assert max(checked) < 1 + 1e-3
        if normalize_first_layer:  # Lip_x(g) <= prod ||W_k|| <= 1, and |h| < 1 makes the block contractive
            assert torch.tensor(norms).prod() < 1 + 1e-3
        x, t = torch.randn(32, 2) * 3, torch.rand(32)
        jac = torch.func.vmap(torch.func.jacrev(lambda xi, ti: block.residual(xi[None], ti[None])[0]))(x, t)
        assert torch.linalg.matrix_norm(jac, ord=2).max() < 1


def test_resnet_flow_without_spectral_norm_has_plain_weights():
    flow = ResNetFlow(2, n_blocks=1, hidden=(8,), invertible=False)
    assert not any("parametrizations" in name for name, _ in flow.named_parameters())
    assert all(torch.equal(m.bias, torch.zeros(2)) for m in flow.blocks[0].g[-1:])


# ------------------------------------------------------------------------------------------------ UNet
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("attention", [False, True])
def test_unet_zero_at_init(shape, attention):
    net = UNet(shape[0], base_channels=16, attention=attention)
    y = net(torch.randn(2, *shape), torch.rand(2))
    assert y.shape == (2, *shape)
    assert torch.equal(y, torch.zeros_like(y))


def test_unet_out_channels_and_levels():
    net = UNet(1, out_channels=2, base_channels=8, channel_mult=(1, 2, 2, 2), num_res_blocks=2)
    assert net(torch.randn(2, 1, 32, 32), torch.rand(2)).shape == (2, 2, 32, 32)
    with pytest.raises(ValueError, match=r"28x28.*channel_mult=\(1, 2, 2\)"):
        net(torch.randn(2, 1, 28, 28), torch.rand(2))


# ------------------------------------------------------------------------------------------- bad specs
@pytest.mark.parametrize(
    "spec,in_shape,out_shape,kwargs,pattern",
    [
        ({"name": "transformer"}, (2,), None, {}, r"unknown backbone 'transformer'.*'mlp'"),
        ({"hidden": (8,)}, (2,), None, {}, r"no 'name'"),
        ({"name": "unet"}, (2,), None, {}, r"'unet'.*\(2,\).*\(C, H, W\)"),
        ({"name": "unet"}, (1, 28, 28), (1, 14, 14), {}, r"'unet'.*H and W"),
        ({"name": "unet"}, (3, 30, 30), None, {}, r"30x30.*channel_mult=\(1, 2\)"),
        ({"name": "unet", "channel_mult": (1, 2, 2, 2)}, (1, 28, 28), None, {}, r"28x28.*at most 3"),
        ({"name": "conv_decoder"}, (16,), (64,), {}, r"'conv_decoder'.*\(64,\).*out_shape=\(C, H, W\)"),
        ({"name": "conv_encoder"}, (16,), (8,), {}, r"'conv_encoder'.*\(16,\).*in_shape=\(C, H, W\)"),
        ({"name": "resnet_flow"}, (1, 28, 28), None, {}, r"'resnet_flow'.*\(1, 28, 28\).*FlowMap"),
        ({"name": "resnet_flow"}, (2,), (3,), {}, r"'resnet_flow'.*same shape"),
        ({"name": "resnet_flow"}, (2,), None, {"time_conditioned": False}, r"'resnet_flow'.*time_conditioned=True"),
        ({"name": "mlp", "foo": 1, "width": 3}, (2,), None, {}, r"unexpected argument.*\['foo', 'width'\].*'mlp'.*hidden"),
        ({"name": "unet", "in_channels": 3}, (1, 28, 28), None, {}, r"unexpected.*'unet'.*come from the shapes"),
        ({"name": "mlp", "time_dim": 8}, (2,), None, {"time_conditioned": False}, r"'mlp'.*time_dim"),
        ({"name": "mlp", "activation": "wobble"}, (2,), None, {}, r"unknown activation.*silu"),
        ({"name": "resnet_flow", "time_embed": "cubic"}, (2,), None, {}, r"unknown flow time embedding.*tanh"),
        ("mlp", "two", None, {}, r"in_shape"),
        ({"name": "mlp", "hidden": [-3]}, (2,), None, {}, r"'mlp' with options \{'hidden': \(-3,\)\}.*positive integers"),
        ({"name": "mlp", "hidden": "abc"}, (2,), None, {}, r"'mlp' with options \{'hidden': 'abc'\}"),
        ({"name": "resnet_flow", "n_blocks": 0}, (2,), None, {}, r"'resnet_flow' with options.*n_blocks must be >= 1"),
    ],
)
def test_bad_specs_raise(spec, in_shape, out_shape, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_backbone(spec, in_shape, out_shape, **kwargs)


def test_forward_errors():
    with pytest.raises(ValueError, match="pass t"):
        _build("mlp", (2,), (2,))(torch.randn(B, 2))
    with pytest.raises(ValueError, match="pass t"):
        _build("unet", (1, 28, 28), None)(torch.randn(B, 1, 28, 28))
    with pytest.raises(ValueError, match="needs a time"):
        _build("resnet_flow", (2,), None)(torch.randn(B, 2))
    with pytest.raises(ValueError, match="expected 2"):
        _build("mlp", (2,), (2,))(torch.randn(B, 3), 0.5)


# ------------------------------------------------------------------------------------------- gradients
GRADIENT_CASES = [(*case, False) for case in CASES[::2] + [CASES[5]]] + [
    (*case, True) for case in CASES[::2] + [CASES[5]] if case[1] == case[2]  # FlowMap needs in == out
]


@pytest.mark.parametrize("name,in_shape,out_shape,wrap_flow_map", GRADIENT_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_gradients_reach_all_parameters(name, in_shape, out_shape, wrap_flow_map):
    extra = {"attention": True} if name == "unet" else {}
    net = _build(name, in_shape, out_shape, **extra)
    _randomise_zero_params(net)
    model = FlowMap(net, time_fn="tanh") if wrap_flow_map else net
    model(torch.randn(B, *in_shape), torch.rand(B) * 0.9 + 0.1).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing}"


def test_time_embedding_of_one_broadcast_time_equals_the_per_sample_embedding():
    from onestep.nets.time import SinusoidalTimeEmbedding
    embed = SinusoidalTimeEmbedding(33)  # odd: the padded column too
    once = embed(torch.tensor(0.37), batch_size=5)  # computed once, broadcast
    rows = embed(torch.full((5,), 0.37))  # computed per sample
    assert once.shape == (5, 33) and torch.equal(once, rows)


def test_mlp_raw_time_feeds_t_itself():
    """``time_embedding='raw'`` concatenates t as one column: the first layer sees in_dim + 1 inputs and
    the output moves with t (a network that dropped t would give equal outputs)."""
    net = build_backbone({"name": "mlp", "hidden": [16], "time_embedding": "raw"}, (2,))
    assert net.net[0].in_features == 3
    x = torch.randn(4, 2)
    assert not torch.allclose(net(x, torch.zeros(4)), net(x, torch.ones(4)))
    h = torch.cat([x, torch.full((4, 1), 0.3)], dim=1)
    assert torch.allclose(net(x, 0.3), net.net(h))


@pytest.mark.parametrize("kwargs, pattern", [
    ({"time_embedding": "raw", "time_dim": 8}, "time_dim=8 would be ignored"),
    ({"time_embedding": "fourier"}, "time_embedding must be one of"),
])
def test_mlp_rejects_bad_time_options(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_backbone({"name": "mlp", **kwargs}, (2,))

"""MAGT in an autoencoder latent space (LatentMAGT): the stage switch, the frozen autoencoder, the stage-2
loss being MAGT's on the codes, sampling through the decoder, checkpoints, and refused options.
(Exact resume mid-stage-2 is in tests/test_resume.py, entry ``magt-latent``.)"""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from onestep.generators.magt_latent import LatentMAGT

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

SHAPE = (1, 8, 8)
NETS = dict(encoder={"name": "conv_encoder", "base_channels": 8}, decoder={"name": "conv_decoder", "base_channels": 8},
            backbone={"name": "mlp", "hidden": [16]})


class TinyImages(L.LightningDataModule):
    """64 random 8x8 images in [-1, 1] as ``(x, idx)`` batches, with ``train_data`` like OneStepDataModule."""

    def __init__(self, n: int = 64, batch: int = 16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.train_data = torch.tanh(torch.randn(n, *SHAPE, generator=g))
        self.batch = batch

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(self.train_data, torch.arange(len(self.train_data)))
        return torch.utils.data.DataLoader(data, batch_size=self.batch, shuffle=False)


def make(**kw) -> LatentMAGT:
    torch.manual_seed(0)
    options = dict(data_shape=SHAPE, code_dim=6, latent_dim=3, ae_steps=3, n_anchors=64, sigma=0.5, lr=1e-2,
                   ema_decay=0.5, **NETS)
    return LatentMAGT(**{**options, **kw})


def fit(model, steps: int, **kw) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **kw)
    trainer.fit(model, datamodule=TinyImages())
    return trainer


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


class Record(Callback):
    """Stage and weights after every optimiser step."""

    def __init__(self) -> None:
        self.stages, self.ae, self.gen, self.ae_ema = [], [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.stages.append(int(pl_module.stage))
        self.ae.append(snapshot(torch.nn.ModuleList([pl_module.encoder, pl_module.decoder])))  # keys 0.*, 1.*
        self.gen.append(snapshot(pl_module.code_model.net))
        ema = pl_module._ensure_ema()
        self.ae_ema.append({k: ema[k].clone() for k in ema if k.startswith(("encoder.", "decoder."))})


def test_stage_switch_at_ae_steps_freezes_the_autoencoder_and_trains_the_generator():
    model, record = make(weight_decay=0.1), Record()  # (decoupled weight decay must not move frozen weights either)
    fit(model, 6, callbacks=[record])
    assert record.stages == [1, 1, 1, 2, 2, 2] and int(model.generator_start) == 3
    assert not same(record.ae[0], record.ae[2]) and same(record.gen[0], record.gen[2])    # stage 1: AE only
    assert same(record.ae[3], record.ae[5]) and not same(record.gen[3], record.gen[5])    # stage 2: g only
    # the frozen autoencoder is stage 1's EMA (the average at the end of step 2), not its last iterate
    frozen = {k: v for k, v in model.state_dict().items() if k.startswith(("encoder.", "decoder."))}
    last_iterate = {k.replace("0.", "encoder.", 1) if k.startswith("0.") else k.replace("1.", "decoder.", 1): v
                    for k, v in record.ae[2].items()}
    assert same(record.ae_ema[2], frozen) and not same(record.ae_ema[2], last_iterate)
    assert bool(model.code_model.standardization_fitted)                                  # code statistics set
    with torch.no_grad():
        codes = model.encode(TinyImages().train_data)
    torch.testing.assert_close(model.code_model.data_shift, codes.mean(0).expand(6), rtol=1e-4, atol=1e-5)


def test_stage_two_loss_is_the_vector_magt_loss_on_the_encoded_batch():
    model = make()
    x = TinyImages().train_data[:16]
    with torch.no_grad():
        codes = model.encode(x)
    model.code_model.fit_standardization(codes)
    model.stage.fill_(2)
    torch.manual_seed(5)
    loss, logs = model.loss(x, None)
    torch.manual_seed(5)
    expected, expected_logs = model.code_model.loss(codes, None)
    assert torch.equal(loss, expected) and torch.equal(logs["ess_mean"], expected_logs["ess_mean"])
    assert logs["stage"] == 2.0 and 1.0 <= float(logs["ess_mean"]) <= 64.0
    loss.backward()
    assert all(p.grad is None for p in [*model.encoder.parameters(), *model.decoder.parameters()])
    assert all(p.grad is not None for p in model.code_model.net.parameters())
    model.stage.fill_(1)  # stage 1 is the reconstruction error
    rec, logs = model.loss(x, None)
    assert torch.equal(rec, (model.decode(model.encode(x)) - x).square().mean()) and logs["stage"] == 1.0


def test_sampling_decodes_the_generated_codes_with_one_generator_and_one_decoder_pass():
    model = make()
    calls = []
    model.decoder.register_forward_hook(lambda *args: calls.append("decoder"))
    model.code_model.net.register_forward_hook(lambda *args: calls.append("generator"))
    with torch.no_grad():
        samples = model.generate(5, torch.Generator().manual_seed(2))
        u = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
        expected = model.decoder(model.code_model.g(u))
    assert calls[:2] == ["generator", "decoder"] and torch.equal(samples, expected.view(5, *SHAPE))
    assert model.nfe == 2 and model.cost() == {"generator": 1, "decoder": 1}


def test_checkpoint_mid_stage_two_loads_with_its_stage_statistics_and_samples(tmp_path):
    model = make()
    trainer = fit(model, 5)
    path = tmp_path / "latent.ckpt"
    trainer.save_checkpoint(path)
    loaded = LatentMAGT.load_from_checkpoint(path, weights_only=False)
    assert int(loaded.stage) == 2 and int(loaded.generator_start) == 3
    assert torch.equal(loaded.code_model.data_scale, model.code_model.data_scale)
    assert bool(loaded.code_model.standardization_fitted)
    draws = [m.sample(4, torch.Generator().manual_seed(3)) for m in (model, loaded)]
    assert torch.equal(*draws)


def test_bad_options_are_refused_in_one_line():
    with pytest.raises(ValueError, match="latent_dim=8 must not exceed code_dim=4"):
        make(latent_dim=8, code_dim=4)
    with pytest.raises(ValueError, match="proposal must be one of"):
        make(proposal="importance")
    with pytest.raises(ValueError, match="code_dim must be >= 1"):
        make(code_dim=0)
    model = make()  # a plain DataLoader has no train_data for the code statistics: refused before training
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(8, *SHAPE), torch.arange(8)))
    with pytest.raises(ValueError, match="no train_data tensor"):
        L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False).fit(model, loader)


@pytest.mark.parametrize("options", [dict(proposal="map_laplace"), dict(proposal="mc", laplace_fallback_ess=1e9)])
def test_map_laplace_and_its_ess_fallback_run_on_codes(options):
    model = make(laplace_anchors=4, map_steps=1, **options)
    x = TinyImages().train_data[:8]
    with torch.no_grad():
        model.code_model.fit_standardization(model.encode(x))
    model.stage.fill_(2)
    loss, logs = model.loss(x, None)
    assert logs["laplace_step"] == 1.0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.code_model.net.parameters())


def test_magt_options_reach_the_code_model():
    model = make(sigma=0.3, sigma_max=1.2, n_anchors=64)
    assert (model.code_model.sigma, model.code_model.sigma_max, model.code_model.n_anchors) == (0.3, 1.2, 64)

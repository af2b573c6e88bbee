"""The framework's cost per training step, against a bare PyTorch loop doing the same math.

Three loops train the same network (a copy of the method's own, built by ``onestep fit``) on the same
training tensor, one after the other and ``repeats`` times in alternation (so a drift of the machine's speed
hits all three alike):

* ``onestep``: the ``onestep fit`` model and trainer as the CLI builds them (its callbacks: exact
  checkpoints, resumable RNG, the non-finite guard, the pre-emption handler, the evaluation callback; the
  learning-rate schedule; logging every ``log_every_n_steps``), with evaluation off;
* ``lightning``: a minimal LightningModule with the same loss and AdamW, no callbacks, no logger, no
  checkpointing: Lightning's own floor;
* ``bare``: ``for step: x1 = data[randint]; x0, t ~ N, U; loss = |v(x_t, t) - (x1 - x0)|^2; AdamW step``.

The loss is flow matching with the independent coupling (the issue's protocol: 8gaussians, MLP 3x256, batch
256, EMA and clipping off). Per-step time = wall time from one batch start to the next, averaged over the
steps after ``warmup``; the reported figure per loop is the median over the repeats. On a GPU (``device``
``cuda``) the three loops run there; the host runs ahead of the device by at most the launch queue, so over
thousands of steps the mean interval is the steady-state step time.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time

import lightning as L
import torch
from lightning.pytorch import Callback

ISSUE_OPTIONS = ["--model.init_args.coupling=independent", "--model.init_args.ema_decay=0",
                 "--model.init_args.grad_clip=0"]


class BatchClock(Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())


def mean_step(starts: list[float], warmup: int) -> float:
    gaps = [b - a for a, b in zip(starts[warmup:], starts[warmup + 1:])]
    return sum(gaps) / len(gaps)


def flow_matching_loss(net: torch.nn.Module, x1: torch.Tensor) -> torch.Tensor:
    x0, t = torch.randn_like(x1), torch.rand(len(x1))
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1
    return (net(xt, t) - (x1 - x0)).square().mean()


class MinimalModule(L.LightningModule):
    def __init__(self, net: torch.nn.Module, lr: float) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def training_step(self, batch, batch_idx):
        return flow_matching_loss(self.net, batch[0])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=0.0)


def accelerator(device: torch.device) -> str:
    return "gpu" if device.type == "cuda" else device.type


def run_onestep(config_args, steps, batch_size, warmup, device) -> tuple[float, torch.nn.Module, torch.Tensor, float]:
    from common import fit_cli

    with tempfile.TemporaryDirectory() as tmp:
        cli = fit_cli([*config_args, *ISSUE_OPTIONS], steps, batch_size, tmp, accelerator(device))
        clock = BatchClock()
        cli.trainer.callbacks.append(clock)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        return mean_step(clock.starts, warmup), cli.model.net, cli.datamodule.train_data, cli.model.lr


def run_lightning_minimal(net, data, lr, steps, batch_size, warmup, device) -> float:
    class Gather(torch.utils.data.TensorDataset):
        def __getitems__(self, indices):
            return (self.tensors[0][torch.as_tensor(indices)],)

    loader = torch.utils.data.DataLoader(Gather(data.cpu()), batch_size=batch_size, shuffle=True, collate_fn=lambda b: b)
    clock = BatchClock()
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[clock], accelerator=accelerator(device), devices=1)
    trainer.fit(MinimalModule(net, lr), loader)
    return mean_step(clock.starts, warmup)


def run_bare(net, data, lr, steps, batch_size, warmup, device) -> float:
    net, data = net.to(device), data.to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    starts = []
    for _ in range(steps):
        starts.append(time.perf_counter())
        loss = flow_matching_loss(net, data[torch.randint(0, len(data), (batch_size,), device=device)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    starts.append(time.perf_counter())
    return mean_step(starts, warmup)


def compare(config_args: list[str], steps: int, batch_size: int, warmup: int, repeats: int,
            device: torch.device = torch.device("cpu")) -> dict:
    """Per-step milliseconds of the three loops (median over ``repeats`` alternations) and the ratios."""
    times: dict[str, list[float]] = {"onestep": [], "lightning": [], "bare": []}
    for _ in range(repeats):
        step, net, data, lr = run_onestep(config_args, steps, batch_size, warmup, device)
        times["onestep"].append(step)
        fresh = copy.deepcopy(net)  # same architecture; its weights do not change a step's cost
        times["lightning"].append(run_lightning_minimal(copy.deepcopy(fresh), data, lr, steps, batch_size, warmup,
                                                        device))
        times["bare"].append(run_bare(fresh, data, lr, steps, batch_size, warmup, device))
    ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    return {"device": str(device), "steps": steps, "warmup": warmup, "repeats": repeats, "batch_size": batch_size,
            "options": ISSUE_OPTIONS, "ms_per_step": ms,
            "all_ms_per_step": {k: [1e3 * v for v in vals] for k, vals in times.items()},
            "onestep_over_bare": ms["onestep"] / ms["bare"], "lightning_over_bare": ms["lightning"] / ms["bare"],
            "target": "onestep <= 1.1x bare"}

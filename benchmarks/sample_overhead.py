r"""Overhead of ``sample()`` over a bare forward pass of the network.

For each method: ``t_sample`` = median time of ``model.sample(n)`` (EMA swap, eval mode, noise, chunking,
the method's sampler) and ``t_bare`` = median time of one call of the method's main network on a
pre-drawn input, without grad. The overhead is

.. math::  \mathrm{overhead} = \frac{t_\mathrm{sample}}{\mathrm{NFE}\cdot t_\mathrm{bare}} - 1,

so 0 means ``sample()`` costs exactly its NFE network calls. The split ``t_generate`` (the method's own
``generate`` with current weights, no EMA swap) attributes the overhead between the framework (EMA swap,
mode switches) and the method's sampler (noise, time tensors, arithmetic between calls).

The main network is found without knowing the method: the child module with the most parameters that
maps ``(n, *data_shape)`` (with a time ``t = 1``, or times ``s = 0, t = 1``, or none) to the same shape. Methods whose network takes a latent
input of another shape report the bare time as unavailable.

    python benchmarks/sample_overhead.py [--n 256 10000] [--threads 2]
"""

from __future__ import annotations

import torch
from common import base_parser, build_model, discover_methods, interleaved_seconds, print_table, save_result, setup

from onestep.data import OneStepDataModule


def find_bare_network(model: torch.nn.Module, data_shape, device):
    """``(name, call)``: the largest child mapping data-shaped input to data-shaped output, or ``(None, None)``."""
    children = sorted(model.named_children(), key=lambda kv: -sum(p.numel() for p in kv[1].parameters()))
    z = torch.randn(4, *data_shape, device=device)
    for name, child in children:
        if not any(True for _ in child.parameters()):
            continue
        for n_times in (1, 2, 0):  # net(x, t), a two-time map net(x, s, t), net(x)
            try:
                with torch.no_grad():
                    out = child(*time_args(z, n_times))
            except Exception:  # noqa: BLE001 - not this signature
                continue
            if isinstance(out, torch.Tensor) and out.shape == z.shape:
                return name, n_times
    return None, None


def time_args(z: torch.Tensor, n_times: int) -> tuple[torch.Tensor, ...]:
    """``(z,)``, ``(z, t=1)`` or ``(z, s=0, t=1)``: the inputs of a one-step network call."""
    ones = torch.ones(len(z), device=z.device)
    return (z,) if n_times == 0 else (z, ones) if n_times == 1 else (z, 0 * ones, ones)


def time_sample(model, child, n_times, data_shape, n, device, repeats, row) -> None:
    """Fill ``row`` with the sample / generate / bare-network times of ``model`` at ``n`` samples (timed
    in alternation, so background load affects all three alike)."""
    gen = torch.Generator(device=device)
    fns = {"sample": lambda: model.sample(n, generator=gen.manual_seed(0)),
           "generate": lambda: model.generate(n, gen.manual_seed(0))}
    if child is not None:
        net, inputs = getattr(model, child), time_args(torch.randn(n, *data_shape, device=device), n_times)
        fns["bare"] = lambda: net(*inputs)
    timed = {k: v["seconds"] for k, v in interleaved_seconds(fns, device, repeats=repeats).items()}
    row.update(sample_ms=1e3 * timed["sample"], generate_ms=1e3 * timed["generate"],
               framework_overhead=timed["sample"] / timed["generate"] - 1)
    if "bare" in timed:
        row.update(bare_ms=1e3 * timed["bare"], overhead=timed["sample"] / (model.nfe * timed["bare"]) - 1)


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--dataset", default="8gaussians")
    parser.add_argument("--n", nargs="+", type=int, default=[256, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train_steps", type=int, default=10, help="brief training before timing (set-up hooks)")
    args = parser.parse_args()
    device = setup(args)
    data_shape = OneStepDataModule(dataset=args.dataset).data_shape
    rows = []
    for name, config in discover_methods(args.dataset, args.methods):
        try:
            model = build_model(config, data_shape, device, train_steps=args.train_steps)
            child, n_times = find_bare_network(model, data_shape, device)
        except Exception as err:  # noqa: BLE001
            rows.append({"method": name, "error": f"{type(err).__name__}: {err}"[:300]})
            continue
        for n in args.n:
            row = {"method": name, "n": n, "nfe": int(model.nfe), "network": child}
            try:
                time_sample(model, child, n_times, data_shape, n, device, args.repeats, row)
            except Exception as err:  # noqa: BLE001
                row["error"] = f"{type(err).__name__}: {err}"[:300]
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    print()
    print_table(rows, ["method", "n", "nfe", "network", "bare_ms", "generate_ms", "sample_ms", "overhead",
                       "framework_overhead", "error"])
    save_result("sample_overhead", {"dataset": args.dataset, "rows": rows,
                                    "target": "sample() within 5% of NFE bare forward passes (overhead <= 0.05)"},
                args.out, device)


if __name__ == "__main__":
    main()

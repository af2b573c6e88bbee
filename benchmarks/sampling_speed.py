"""Sampling throughput of every method at its default NFE against 100-step flow matching, same backbone.

For each method config ``configs/<method>/<dataset>.yaml`` the script builds the method and a
``FlowMatching(steps=100, sampler="euler")`` with the *method's own backbone spec* (so the ratio isolates
the number of network evaluations), times ``sample(n)`` of both in the same process, interleaved, and
reports ``ratio = samples/s(method) / samples/s(FM-100)`` (the two timed in alternation, medians). When the method's backbone cannot serve as a
velocity field (e.g. a latent decoder) the flow-matching config's backbone is used and the row says so.
Models are trained for ``--train_steps`` steps first (their set-up hooks, e.g. banks, must run);
speed does not depend on the weights.

    python benchmarks/sampling_speed.py [--datasets 8gaussians mnist] [--n 10000] [--threads 2]
"""

from __future__ import annotations

from common import base_parser, build_model, discover_methods, interleaved_seconds, model_section, print_table, \
    save_result, setup

from onestep.data import OneStepDataModule
from onestep.generators.flow_matching import FlowMatching


def reference_fm(method_backbone, fm_config, data_shape, device):
    """FM-100 on the method's backbone when possible, else on the flow-matching config's backbone."""
    if method_backbone is not None:
        try:
            return FlowMatching(data_shape=data_shape, backbone=method_backbone, steps=100).to(device).eval(), True
        except Exception:  # noqa: BLE001 - not a velocity-field backbone: fall back below
            pass
    _, fm_args = model_section(fm_config)
    return FlowMatching(data_shape=data_shape, backbone=fm_args.get("backbone"), steps=100).to(device).eval(), False


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--datasets", nargs="+", default=["8gaussians"])
    parser.add_argument("--n", type=int, default=None, help="samples per call (default 10000 vectors, 64 images)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train_steps", type=int, default=10, help="brief training before timing (set-up hooks)")
    args = parser.parse_args()
    device = setup(args)
    rows = []
    for dataset in args.datasets:
        data_shape = OneStepDataModule(dataset=dataset).data_shape
        image = len(data_shape) == 3
        n = args.n or (64 if image else 10000)
        methods = discover_methods(dataset, args.methods)
        fm_config = dict(discover_methods(dataset))["flow_matching"]
        for name, config in methods:
            try:
                model = build_model(config, data_shape, device, train_steps=args.train_steps)
                _, init_args = model_section(config)
                fm, same = reference_fm(init_args.get("backbone"), fm_config, data_shape, device)
                repeats = max(1, args.repeats // (3 if image else 1))
                timed = interleaved_seconds({"method": lambda: model.sample(n), "fm": lambda: fm.sample(n)},
                                            device, repeats=repeats)
                t_method, t_fm = timed["method"], timed["fm"]
            except Exception as err:  # noqa: BLE001 - a method that fails is reported, not fatal
                rows.append({"dataset": dataset, "method": name, "error": f"{type(err).__name__}: {err}"[:300]})
                continue
            rows.append({
                "dataset": dataset, "method": name, "nfe": int(model.nfe), "n": n,
                "samples_per_s": n / t_method["seconds"], "fm100_samples_per_s": n / t_fm["seconds"],
                "ratio_vs_fm100": t_fm["seconds"] / t_method["seconds"], "same_backbone": same,
                "backbone": init_args.get("backbone"), "seconds": t_method, "fm100_seconds": t_fm})
            print(f"{dataset} {name}: nfe {model.nfe}, {rows[-1]['samples_per_s']:,.0f} samples/s, "
                  f"{rows[-1]['ratio_vs_fm100']:.1f}x FM-100", flush=True)
    print_table(rows, ["dataset", "method", "nfe", "n", "samples_per_s", "fm100_samples_per_s", "ratio_vs_fm100",
                       "same_backbone", "error"])
    save_result("sampling_speed", {"rows": rows, "target": "one-step methods >= 80x the samples/s of FM-100"},
                args.out, device)


if __name__ == "__main__":
    main()

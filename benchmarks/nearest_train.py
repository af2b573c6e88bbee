"""How close do a suite's image samples sit to the training images? A memorisation check the FD cannot make.

    python benchmarks/nearest_train.py benchmarks/results/mnist_cpu [--out nearest_train.json]

For every finished cell of an image suite, the cell's saved final samples (``final_samples.pt``, raw units
in [0, 1]) are compared with every image of the training split the cell trained on: the Euclidean (pixel)
distance from each sample to its nearest training image. The same is measured for as many held-out test
images, which no model saw: a model that copies training images sits well below that line, a model that
generalises near it. Reported per cell: the median nearest-training distance, its ratio to the test
images' median, and the share of samples closer to a training image than the closest 5% of test images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from onestep.benchmark.records import latest_by_cell, read_records
from onestep.data import OneStepDataModule
from onestep.files import atomic_write_text


def nearest_distances(x: torch.Tensor, train: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``min_j |x_i - train_j|`` for each row of ``x`` (flattened), exact, in chunks of the training set."""
    x, best = x.flatten(1).double(), None
    for start in range(0, len(train), chunk):
        d = torch.cdist(x, train[start:start + chunk].flatten(1).double())
        d = d.min(dim=1).values
        best = d if best is None else torch.minimum(best, d)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--out", default="nearest_train.json", help="file name written in out_dir")
    args = parser.parse_args()
    latest = latest_by_cell(read_records(args.out_dir / "results.jsonl"))
    rows, lines, cache = [], [], {}
    for (method, dataset, seed), record in sorted(latest.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        path = args.out_dir / ((record.get("final_samples") or {}).get("path") or "")
        if record.get("status") != "ok" or not path.is_file():
            continue
        if dataset not in cache:
            dm = OneStepDataModule(**record["data_config"])
            train = dm.reference("train")
            test = dm.reference("test", 1000)
            test_nn = nearest_distances(test, train)
            cache[dataset] = (train, test_nn, len(test))
        train, test_nn, n_test = cache[dataset]
        samples = torch.load(path, map_location="cpu", weights_only=True).float()
        nn = nearest_distances(samples, train)
        close = float(torch.quantile(test_nn, 0.05))
        row = {"method": method, "dataset": dataset, "seed": seed, "n_samples": len(samples),
               "median_nearest_train": float(nn.median()), "test_median_nearest_train": float(test_nn.median()),
               "ratio_to_test": float(nn.median() / test_nn.median()),
               "share_closer_than_test_5pct": float((nn < close).float().mean()), "n_test": n_test,
               "n_train": len(train)}
        rows.append(row)
        lines.append(f"| {dataset} | {method} | {row['median_nearest_train']:.2f} | {row['ratio_to_test']:.2f} | "
                     f"{row['share_closer_than_test_5pct']:.2f} |")
    print("| dataset | method | median distance to the nearest training image | / test images' | share closer "
          "than the closest 5% of test images |")
    print("|---|---|---|---|---|")
    print("\n".join(lines))
    atomic_write_text(args.out_dir / args.out, json.dumps({"rows": rows, "protocol": __doc__.strip()}, indent=1))


if __name__ == "__main__":
    main()

"""Which characteristic-generator options measure best on the 2-D sets (the configs' defaults come from here).

For one dataset: teachers (stage 1) with each teacher option, then students (stage 2) with each student
option on a shared teacher; every row gives the one-step W2 of the student, the W2 of its teacher at 100
steps (on the student's time grid) and their ratio. Protocol: see ``characteristic_runs``.

    python benchmarks/characteristic_options.py --dataset moons2d --teacher-steps 2000 --student-steps 1500

writes ``benchmarks/results/characteristic_options_<dataset>.json`` after every row (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from characteristic_runs import (
    REPO, data_floor, quiet, reference, train_student, train_teacher, w2_one_step, w2_teacher,
)

# teacher variants: stage-1 options (linear/AdamW/no warm-up was the shipped setting)
TEACHERS: dict[str, dict[str, Any]] = {
    "linear": {"interpolant": "linear"},
    "linear_warmup500": {"interpolant": "linear", "teacher_warmup_steps": 500},
    "linear_radam": {"interpolant": "linear", "optimizer": "radam"},
    "follmer": {"interpolant": "follmer"},
}
# student variants: (teacher, stage-2 options)
STUDENTS: dict[str, tuple[str, dict[str, Any]]] = {
    "uniform_pairs": ("linear", {"pair_sampling": "uniform", "grid_spacing": "uniform"}),
    "long_pairs": ("linear", {"pair_sampling": "long", "grid_spacing": "uniform"}),
    "long_pairs_dense_grid": ("linear", {"pair_sampling": "long", "grid_spacing": "data_dense"}),
    "uniform_pairs_dense_grid": ("linear", {"pair_sampling": "uniform", "grid_spacing": "data_dense"}),
    "follmer_exp_long_dense": ("follmer", {"pair_sampling": "long", "grid_spacing": "data_dense", "solver": "exp"}),
    "follmer_euler_long_dense": ("follmer", {"pair_sampling": "long", "grid_spacing": "data_dense",
                                             "solver": "euler"}),
    "radam_long_dense": ("linear_radam", {"pair_sampling": "long", "grid_spacing": "data_dense",
                                          "optimizer": "radam"}),
    "long_dense_64traj_x16": ("linear", {"pair_sampling": "long", "grid_spacing": "data_dense",
                                         "trajectory_batch": 64, "pairs_per_trajectory": 16}),
    "warmup500_long_dense": ("linear_warmup500", {"pair_sampling": "long", "grid_spacing": "data_dense"}),
}
COMMON = {"grid_size": 50, "t_min": 0.0, "t_max": 0.999, "pairs_per_trajectory": 4, "semigroup_weight": 1.0,
          "lr": 1e-3, "ema_decay": 0.999}


def write_atomic(path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--teacher-steps", type=int, default=2000)
    parser.add_argument("--student-steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--students", nargs="+", default=list(STUDENTS))
    args = parser.parse_args()
    quiet()
    out = REPO / "benchmarks" / "results" / f"characteristic_options_{args.dataset}.json"
    ref = reference(args.dataset)
    payload: dict[str, Any] = {
        "protocol": (f"{args.dataset}, seed {args.seed}, batch 256, MLP 3x256 SiLU; teacher {args.teacher_steps} "
                     f"steps, student {args.student_steps} steps; W2 on 2,000 samples vs the first 2,000 test "
                     "points (raw units); teacher at 100 steps on the student's grid spacing and solver; "
                     "2-core shared CPU VM, loaded"),
        "common": COMMON, "floor_val_test": data_floor(args.dataset), "teachers": {}, "students": {},
    }
    teachers: dict[str, Any] = {}
    for name in args.students:
        teacher_name, options = STUDENTS[name]
        if teacher_name not in teachers:
            t_opts = {**{k: v for k, v in COMMON.items() if k not in ("lr", "ema_decay")}, **TEACHERS[teacher_name]}
            teachers[teacher_name], seconds = train_teacher(args.dataset, args.teacher_steps, args.seed,
                                                            **t_opts, lr=COMMON["lr"], ema_decay=COMMON["ema_decay"])
            payload["teachers"][teacher_name] = {"options": TEACHERS[teacher_name], "seconds": seconds}
        start = time.perf_counter()
        student_opts = {**COMMON, **{k: v for k, v in options.items()}}
        if "optimizer" not in student_opts and "optimizer" in TEACHERS[teacher_name]:
            student_opts["optimizer"] = TEACHERS[teacher_name]["optimizer"]
        gen, seconds = train_student(teachers[teacher_name], args.dataset, args.student_steps, args.seed, **student_opts)
        one, teacher_100 = w2_one_step(gen, ref), w2_teacher(gen, ref, 100)
        payload["students"][name] = {"teacher": teacher_name, "options": options, "w2_1nfe": one,
                                     "teacher_w2_100": teacher_100, "ratio": one / teacher_100,
                                     "train_seconds": seconds, "total_seconds": time.perf_counter() - start}
        print(f"{args.dataset:12s} {name:28s} CG 1-NFE {one:.4f}  teacher@100 {teacher_100:.4f}  "
              f"ratio {one / teacher_100:.3f}  ({seconds:.0f} s)", flush=True)
        write_atomic(out, payload)


if __name__ == "__main__":
    main()

"""Mutation check: do the tests notice a wrong number?

Each mutation below is a small, realistic bug (a file, a snippet of it, its replacement, and the tests that
should catch it). For every mutation the script copies the repository (the files git tracks plus untracked,
non-ignored ones: the working tree as it is, never modified) into a temporary folder, applies the one
patch there, runs the mutation's tests with this Python and counts the mutation *caught* when they fail.
The unmutated copy must pass the same tests first (otherwise a failure would prove nothing).

    .venv/bin/python benchmarks/mutation_check.py                 # all mutations, one at a time
    .venv/bin/python benchmarks/mutation_check.py --list          # names and tests only
    .venv/bin/python benchmarks/mutation_check.py --only w2_without_sqrt ddp_decision_not_shared
    .venv/bin/python benchmarks/mutation_check.py --out results/mutations.json

Score = caught / mutations. A test run that exceeds ``--timeout`` counts as caught (a hang is noticed)
and is marked as such. Every snippet must occur exactly once in its file: a refactor that moves the code
makes the script stop with the mutation's name, so the list is kept in step with the code.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


EVAL = "onestep/callbacks/evaluation.py"
DDP_EVAL = "tests/test_ddp_ranks.py::test_ddp_evaluation_equals_the_protocol_and_one_process"

MUTATIONS: list[Mutation] = [
    # ---- the "not caught" table
    Mutation("rerun_ignores_fingerprint", "onestep/benchmark/runner.py",
             'if record and record.get("status") == "ok" and record.get("fingerprint") == suite.fingerprint(cell):',
             'if record and record.get("status") == "ok":',
             ("tests/test_benchmark_logic.py",), "a rerun skips a cell although its spec changed"),
    Mutation("resume_from_other_spec", "onestep/benchmark/cell.py",
             'if json.loads((ckpt.parents[1] / "cell.json").read_text()).get("fingerprint") == fingerprint:',
             'if (ckpt.parents[1] / "cell.json").is_file():',
             ("tests/test_benchmark_logic.py",), "a cell resumes from a checkpoint of another spec"),
    Mutation("failed_retry_hides_ok", "onestep/benchmark/records.py",
             '        if record.get("status") != "ok" and latest.get(key, {}).get("status") == "ok" \\\n'
             '                and latest[key].get("fingerprint") == record.get("fingerprint"):\n'
             '            continue  # a retried failure never hides the finished result of the same specification\n',
             "", ("tests/test_benchmark_logic.py",), "a later failed retry hides an earlier ok record"),
    Mutation("prc_ranked_lower_is_better", "onestep/benchmark/tables.py",
             '("precision", "precision", "max"), ("recall", "recall", "max")',
             '("precision", "precision", "min"), ("recall", "recall", "min")',
             ("tests/test_benchmark_logic.py",), "precision/recall ranked lower-is-better"),
    Mutation("coverage_ranked_lower_is_better", "onestep/benchmark/tables.py",
             '("coverage", "coverage", "max")', '("coverage", "coverage", "min")',
             ("tests/test_benchmark_logic.py",), "coverage ranked lower-is-better"),
    Mutation("whole_reference_every_rank_features", EVAL,
             "real_f = torch.tensor_split(self._real_features(name, reference, dm), world)[rank]",
             "real_f = self._real_features(name, reference, dm)",
             (DDP_EVAL,), "every rank adds the whole reference set (FD/PRDC features)"),
    Mutation("whole_reference_every_rank_raw", EVAL,
             "real = torch.tensor_split(reference, world)[rank]", "real = reference",
             (DDP_EVAL,), "every rank adds the whole reference set (W2/SW2, raw-unit PRDC)"),
    Mutation("same_seed_every_rank", EVAL,
             "gen = torch.Generator(device=device).manual_seed(self.seed + RANK_SEED_STRIDE * rank)",
             "gen = torch.Generator(device=device).manual_seed(self.seed)",
             (DDP_EVAL,), "every rank samples with the same seed"),
    Mutation("samples_per_s_summed", EVAL, 'trainer.strategy.reduce(speed, reduce_op="mean")',
             'trainer.strategy.reduce(speed, reduce_op="sum")', (DDP_EVAL,), "samples/s summed over ranks"),
    Mutation("lenet_reference_on_minus1_1", EVAL, "lambda: extractor(reference), self.cache_dir",
             "lambda: extractor(reference * 2 - 1), self.cache_dir",
             ("tests/test_callbacks.py::test_lenet_fd_of_mnist_train_against_test_through_the_callback",),
             "LeNet reference features computed on [-1, 1] instead of [0, 1]"),
    Mutation("worker_prefetch_counted_as_trained", "onestep/data/datamodule.py",
             'in_flight = max(0, getattr(it, "_send_idx", 0) - getattr(it, "_rcvd_idx", 0)) if it is not None else 0',
             "in_flight = 0",
             ("tests/test_resume.py::test_resume_is_exact_with_dataloader_workers",),
             "batches prefetched by DataLoader workers counted as trained"),
    Mutation("only_local_rng_saved", "onestep/callbacks/reliability.py",
             "if trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized():",
             "if False:", ("tests/test_ddp_ranks.py::test_ddp_resume_is_exact_on_every_rank",),
             "only the local rank's RNG state saved under DDP"),
    Mutation("checkpoint_written_in_place", "onestep/callbacks/reliability.py",
             'target = f"{filepath}.tmp" if local else filepath', "target = filepath",
             ("tests/test_atomic_writes.py",), "checkpoint written in place (no temporary file + rename)"),
    Mutation("record_in_two_writes", "onestep/benchmark/records.py", "written = os.write(fd, data)",
             "written = os.write(fd, data[:-1]) + os.write(fd, data[-1:])",
             ("tests/test_atomic_writes.py",), "record and its newline appended in two writes"),
    Mutation("idx_trailing_bytes_accepted", "onestep/data/images.py", "if len(raw) != expected:",
             "if len(raw) < expected:", ("tests/test_data.py::test_read_idx_refuses_trailing_bytes",),
             "IDX file with trailing bytes accepted"),
    Mutation("mnist_count_check_removed", "onestep/data/images.py",
             " or labels.shape != (images.shape[0],):", ":",
             ("tests/test_data.py::test_mnist_images_and_labels_of_different_counts_are_refused",),
             "MNIST image/label count check removed"),
    Mutation("ddp_decision_not_shared", "onestep/callbacks/fault.py",
             "return bool(trainer.strategy.reduce_boolean_decision(flag, all=False)) if trainer.world_size > 1 "
             "else flag", "return flag",
             ("tests/test_ddp_ranks.py::test_a_nan_on_one_rank_stops_every_rank",
              "tests/test_ddp_ranks.py::test_a_preemption_seen_by_one_rank_stops_every_rank_with_a_checkpoint"),
             "NaN or preemption decision not shared across ranks"),
    # ---- caught before the issue (kept so that they stay caught)
    Mutation("w2_without_sqrt", "onestep/metrics/wasserstein.py",
             "return torch.tensor(float(w2_squared), dtype=torch.float64).clamp_min(0.0).sqrt()",
             "return torch.tensor(float(w2_squared), dtype=torch.float64).clamp_min(0.0)",
             ("tests/test_metrics.py",), "W2 without its square root"),
    Mutation("prdc_self_neighbour", "onestep/metrics/prdc.py",
             'd2[rows, rows + start] = float("inf")', "pass",
             ("tests/test_metrics.py",), "PRDC counts a point as its own neighbour"),
    Mutation("fd_biased_covariance", "onestep/metrics/frechet.py",
             "(outer - n * torch.outer(mu, mu)) / (n - 1)", "(outer - n * torch.outer(mu, mu)) / n",
             ("tests/test_metrics.py",), "biased covariance in FD"),
    Mutation("fd_count_reduced_by_mean", "onestep/metrics/frechet.py",
             'self.add_state(f"{side}_n", torch.zeros((), dtype=f64), dist_reduce_fx="sum")',
             'self.add_state(f"{side}_n", torch.zeros((), dtype=f64), dist_reduce_fx="mean")',
             ("tests/test_metrics_ddp.py",), "FD's sample count reduced by mean over ranks"),
    Mutation("rng_state_not_restored", "onestep/callbacks/reliability.py",
             "            restore_rng_state(ranks[trainer.global_rank])\n            return\n",
             "            return\n",
             ("tests/test_resume.py::test_resume_equals_uninterrupted_mid_epoch_and_after_a_stop"
              "[flow_matching-independent]",),
             "RNG state not restored on resume"),
    Mutation("nan_guard_on_loss_only", "onestep/callbacks/fault.py",
             "if bad is None and self.check_grads and not scaled:", "if False:",
             ("tests/test_faults.py::test_non_finite_gradient_is_caught_before_the_step",),
             "NaN guard looks at the loss only"),
    Mutation("preemption_checkpoint_weights_only", "onestep/callbacks/fault.py",
             "        atomic_save_checkpoint(trainer, path)\n        self.saved_path = path",
             "        atomic_save_checkpoint(trainer, path, weights_only=True)\n        self.saved_path = path",
             ("tests/test_faults.py::test_sigusr1_writes_a_checkpoint_exits_cleanly_and_resumes_exactly",),
             "a weights-only preemption checkpoint"),
    # ---- guards of the assertions the issue called too weak
    Mutation("evaluation_perturbs_training_rng", EVAL,
             "with torch.random.fork_rng(devices=devices), torch.no_grad():", "with torch.no_grad():",
             ("tests/test_callbacks.py::test_evaluation_leaves_training_rng_untouched",),
             "the evaluation's sampling consumes the training RNG"),
    Mutation("fd_pixels_on_normalised_samples", EVAL, "fake_f = self._extractors[name](fake)",
             "fake_f = self._extractors[name](samples)",
             ("tests/test_callbacks.py::test_image_dataset_uses_pixels_and_lenet_and_caches_real_features",),
             "FD of generated images computed before denormalisation"),
    Mutation("sampling_speed_from_fastest_run", "onestep/metrics/speed.py",
             "seconds = statistics.median(times)", "seconds = min(times)",
             ("tests/test_metrics.py::test_measure_sampling_speed_reports_machine",),
             "samples/s from the fastest repeat instead of the median"),
]


def copy_repo(destination: Path) -> Path:
    """The working tree's files (tracked + untracked, not ignored) under ``destination/repo``, with the
    shared datasets folder linked beside it as the tests expect (``<repo>/../shared``)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    root = destination / "repo"
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    shared = REPO.parent / "shared"
    if shared.exists():
        (destination / "shared").symlink_to(shared)
    return root


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
    start = time.perf_counter()
    # a session of its own, so that a hung run is ended with everything it spawned (DDP ranks, workers)
    proc = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", time.perf_counter() - start, ""
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of a finished run (none when the tests are tidy)
        except ProcessLookupError:
            pass
    tail = output.strip().splitlines()[-1:] or [""]
    return ("passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"), time.perf_counter() - start, tail[0]


def check_snippets(mutations: list[Mutation]) -> None:
    for m in mutations:
        count = (REPO / m.file).read_text().count(m.old)
        if count != 1:
            sys.exit(f"mutation {m.name}: its snippet occurs {count} times in {m.file} (expected once); "
                     "update the snippet in benchmarks/mutation_check.py")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", help="run only these mutations")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per test run (default 600)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    mutations = MUTATIONS
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTATIONS}
        if unknown:
            parser.error(f"--only: unknown mutations {sorted(unknown)}; see --list")
        mutations = [m for m in MUTATIONS if m.name in args.only]
    if args.list:
        for m in mutations:
            print(f"{m.name:40s} {m.file:36s} {' '.join(m.tests)}\n{'':40s} {m.what}")
        return 0
    check_snippets(mutations)
    results = []
    with tempfile.TemporaryDirectory(prefix="onestep-mutation-") as tmp:
        root = copy_repo(Path(tmp))
        where = subprocess.run([sys.executable, "-c", "import onestep; print(onestep.__file__)"], cwd=root,
                               env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True)
        if not where.stdout.strip().startswith(str(root)):
            sys.exit(f"the copy's onestep is not the one imported ({where.stdout.strip() or where.stderr[-300:]})")
        baseline_tests = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
        status, seconds, tail = run_tests(root, baseline_tests, args.timeout)
        print(f"baseline (no mutation): {status} in {seconds:.0f}s  {tail}", flush=True)
        if status != "passed":
            print("the unmutated tests must pass first", file=sys.stderr)
            return 1
        for i, m in enumerate(mutations, 1):
            path = root / m.file
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new, 1))
            try:
                status, seconds, tail = run_tests(root, m.tests, args.timeout)
            finally:
                path.write_text(original)
            caught = status != "passed"
            results.append({"name": m.name, "what": m.what, "file": m.file, "tests": list(m.tests),
                            "caught": caught, "status": status, "seconds": round(seconds, 1)})
            verdict = ("CAUGHT " + ("(timeout)" if status == "timeout" else "")) if caught else "MISSED"
            print(f"[{i}/{len(mutations)}] {verdict:17s} {m.name} ({seconds:.0f}s)  {tail if caught else ''}",
                  flush=True)
    caught = sum(r["caught"] for r in results)
    print(f"score: {caught}/{len(results)} mutations caught"
          + ("" if caught == len(results) else "; missed: " + ", ".join(r["name"] for r in results if not r["caught"])))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"score": f"{caught}/{len(results)}", "results": results}, indent=1))
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())

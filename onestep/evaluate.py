"""``onestep evaluate --ckpt_path FILE [--eval.*] [--data.root DIR] [--device D]``: score a saved checkpoint.

The model is rebuilt from the checkpoint (the class path and init arguments LightningCLI stores in
``hyper_parameters``), its weights and EMA weights loaded; the data module from the arguments it was trained
with (``datamodule_hyper_parameters``, else the run's ``config.yaml``). The protocol is
``EvaluationCallback.compute_metrics``, the code that scores a run during training, in one process on the
**EMA weights** (``sample_chunked`` uses them). ``--eval.*`` defaults to the run's own evaluation options
(its ``config.yaml``), so the numbers compare with the run's ``eval.jsonl``; any of them can be changed.

Output: one ``eval/<metric> <value>`` line per metric on stdout, and one JSON line
``{"step", "metrics", "protocol", "ckpt_path", "source": "onestep evaluate"}`` appended with a single
``O_APPEND`` write to the run directory's ``eval.jsonl`` (``<run>/checkpoints/x.ckpt`` -> ``<run>/eval.jsonl``;
a checkpoint elsewhere: beside the file); a sample picture ``samples_evaluate_step<N>.png`` beside it
unless ``--eval.pictures false``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentParser

from onestep.callbacks.evaluation import EvaluationCallback
from onestep.checkpoints import CheckpointIdentity, resolve_class, run_directory_of

#: evaluation options that only schedule evaluations during training
SCHEDULE_OPTIONS = ("every_n_steps", "at_end")


class SingleProcess:
    """The part of a ``Trainer`` that ``EvaluationCallback.compute_metrics`` and ``protocol`` read, and that a
    model's evaluation hooks read through ``self.trainer`` (LMPPM's ``extra_eval_metrics`` uses the data
    module; its bank's freshness the step), for one process outside training: the data module, the
    checkpoint's step, world size 1, rank 0, and a reduction that is the identity."""

    world_size, global_rank, is_global_zero, max_steps = 1, 0, True, -1

    def __init__(self, datamodule: Any, global_step: int) -> None:
        self.datamodule, self.global_step = datamodule, global_step
        self.strategy = self

    @staticmethod
    def reduce(value: Any, reduce_op: str | None = None) -> Any:
        return value


def run_config(ckpt_path: str | Path) -> dict[str, Any]:
    """The run's resolved ``config.yaml`` (written by ``onestep fit`` beside ``checkpoints/``), or ``{}``."""
    path = run_directory_of(ckpt_path) / "config.yaml"
    try:
        return yaml.safe_load(path.read_text()) or {} if path.is_file() else {}
    except yaml.YAMLError:
        return {}


def load_model(identity: CheckpointIdentity, checkpoint: dict[str, Any], config: dict[str, Any], device: str):
    """The checkpoint's model with its trained weights and EMA weights (``on_load_checkpoint``), in eval mode."""
    from onestep.generators import OneStepGenerator

    class_path = identity.class_path or (config.get("model") or {}).get("class_path")
    if not class_path:
        raise ValueError(f"--ckpt_path {identity.path}: the checkpoint names no model class (not written by "
                         "`onestep fit`) and no config.yaml lies beside its run directory")
    cls = resolve_class(class_path)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, OneStepGenerator)):
        raise ValueError(f"--ckpt_path {identity.path}: model class {class_path} does not import as a "
                         "OneStepGenerator; put its package on PYTHONPATH")
    model = cls(**identity.model_hparams)
    model.on_load_checkpoint(checkpoint)  # EMA weights and plugin state, as Lightning's restore does
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    if "ema" not in checkpoint:
        raise ValueError(f"--ckpt_path {identity.path}: the checkpoint holds no EMA weights ('ema'); "
                         "evaluation scores the EMA weights, as during training")
    return model.to(device).eval()


def load_datamodule(identity: CheckpointIdentity, config: dict[str, Any], root: str | None):
    from onestep.data import OneStepDataModule

    options = dict(identity.data_hparams or (config.get("data") or {}))
    if not options:
        raise ValueError(f"--ckpt_path {identity.path}: neither the checkpoint nor a config.yaml beside it "
                         "records the dataset")
    if root is not None:
        options["root"] = root
    datamodule = OneStepDataModule(**options)
    datamodule.setup("fit")
    if identity.data_shape is not None and tuple(datamodule.data_shape) != identity.data_shape:
        raise ValueError(f"--ckpt_path {identity.path}: the rebuilt data has shape {datamodule.data_shape}, "
                         f"the model was trained on {identity.data_shape}")
    return datamodule


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="onestep evaluate", description="Score a checkpoint's EMA weights under the "
                            "evaluation protocol; model and data are rebuilt from the checkpoint.")
    parser.add_argument("--ckpt_path", type=str, required=True, help="checkpoint written by onestep fit")
    parser.add_class_arguments(EvaluationCallback, "eval", skip=set(SCHEDULE_OPTIONS))
    parser.add_argument("--data.root", type=str | None, default=None,
                        help="data folder, when the checkpoint's data moved (the dataset itself cannot change)")
    parser.add_argument("--device", type=str, default="auto", help="auto (a GPU when present), cpu, cuda, cuda:N")
    return parser


def _ckpt_path_in(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--ckpt_path" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--ckpt_path="):
            return arg.split("=", 1)[1]
    return None


def evaluate_checkpoint(argv: list[str]) -> dict[str, Any]:
    """Parse ``argv``, score the checkpoint, print, append to ``eval.jsonl``; returns the record."""
    from onestep.benchmark.records import append_record
    from onestep.callbacks.fault import check_checkpoint_file

    parser = build_parser()
    hinted = _ckpt_path_in(argv)
    config = run_config(hinted) if hinted and Path(hinted).is_file() else {}
    run_eval = {k: v for k, v in (config.get("eval") or {}).items() if k not in SCHEDULE_OPTIONS}
    if run_eval:  # the run's own protocol is the default; the command line overrides it
        parser.set_defaults({f"eval.{k}": v for k, v in run_eval.items()})
    args = parser.parse_args(argv)
    ckpt_path = Path(args.ckpt_path)
    check_checkpoint_file(ckpt_path, weights_only=True)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    identity = CheckpointIdentity(ckpt_path, checkpoint)
    callback = EvaluationCallback(**args.eval.as_dict())
    datamodule = load_datamodule(identity, config, args.data.root)
    model = load_model(identity, checkpoint, config, device)
    process = SingleProcess(datamodule, identity.global_step)
    model.trainer = process  # as during training's evaluation: the model sees its data module and step
    if reason := callback.untrained_reason(model):
        raise ValueError(f"--ckpt_path {ckpt_path}: saved at step {identity.global_step}, and {reason}: its "
                         "samples would come from untrained networks; evaluate a checkpoint of that stage")
    metrics, samples = callback.compute_metrics(process, model)
    record = {"step": identity.global_step, "metrics": metrics, "protocol": callback.protocol(process),
              "ckpt_path": str(ckpt_path.resolve()), "source": "onestep evaluate",
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    run_dir = run_directory_of(ckpt_path)
    append_record(run_dir / "eval.jsonl", record)
    print(f"onestep evaluate: {ckpt_path} ({identity.describe()}), EMA weights, "
          f"{callback.n_samples} samples vs {callback.reference_split} split")
    for name, value in metrics.items():
        print(f"{name} {value:.6g}")
    if callback.pictures and samples is not None:
        _draw(samples, callback, identity, run_dir / f"samples_evaluate_step{identity.global_step}.png")
    print(f"onestep evaluate: appended to {run_dir / 'eval.jsonl'}")
    return record


def _draw(samples, callback: EvaluationCallback, identity: CheckpointIdentity, path: Path) -> None:
    from onestep.callbacks.visuals import save_image_grid, save_scatter

    title = f"{identity.class_name} {identity.dataset} step {identity.global_step} (onestep evaluate)"
    if samples.dim() == 4:
        save_image_grid(samples[:64], path, nrow=8, title=title)
    else:
        save_scatter(samples, callback._reference, path, title=title)
    print(f"onestep evaluate: samples in {path}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        evaluate_checkpoint(argv)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"onestep evaluate: error: {err}", file=sys.stderr)
        return 2
    return 0

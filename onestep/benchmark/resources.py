"""What one benchmark cell asks of a cluster: the suite's ``resources:`` section and ``--slurm.*`` options.

Suite YAML (every key optional; none of them changes a cell's result, so none is in its fingerprint)::

    resources:
      partition: gpu          # SLURM partition
      account: myproject      # SLURM account (billing)
      gpus: 1                 # GPUs per cell (each cell is one task of a job array)
      cpus: 8                 # CPU cores per cell
      mem_gb: 32              # memory per cell
      time_min: 120           # time limit of one attempt; a cell still training then is checkpointed and
                              # requeued (at most max_requeues times), so this bounds an attempt, not the cell
      parallelism: 16         # at most this many cells of the array run at once (default: no limit)
      signal_delay_s: 120     # SLURM signals the job this long before its time limit (checkpoint, requeue)
      max_requeues: 3         # time-limit requeues per cell before it is recorded as failed (preemptions
                              # by other jobs do not count)
      setup: [module load cuda/12.4, source .venv/bin/activate]   # shell lines run before each cell
      slurm: {qos: high, constraint: a100}                        # any other sbatch option

On the command line ``--slurm.<key> VALUE`` overrides the suite's value (``--slurm.slurm KEY=VALUE`` adds
one sbatch option, repeatable; ``--slurm.setup LINE`` one setup line).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

INTEGER_KEYS = {"gpus": 0, "cpus": 1, "time_min": 1, "parallelism": 1, "signal_delay_s": 0, "max_requeues": 0}
TEXT_KEYS = ("partition", "account")


@dataclass(frozen=True)
class ClusterResources:
    partition: str | None = None
    account: str | None = None
    gpus: int = 0
    cpus: int | None = None
    mem_gb: float | None = None
    time_min: int = 120
    parallelism: int | None = None
    signal_delay_s: int = 120
    max_requeues: int = 3
    setup: tuple[str, ...] = ()
    slurm: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "setup": list(self.setup)}


def _label(where: str) -> str:
    return where if where.startswith("--") else f"suite {where}"


def resources_from_dict(raw: Any, where: str = "resources") -> ClusterResources:
    """Validate the suite's ``resources:`` mapping; ``ValueError`` names the key, the problem and the fix."""
    if raw is None:
        return ClusterResources()
    if not isinstance(raw, dict):
        raise ValueError(f"{_label(where)}: must be a mapping of {', '.join(f.name for f in fields(ClusterResources))}, "
                         f"got {raw!r}")
    known = {f.name for f in fields(ClusterResources)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{_label(where)}: unknown keys {sorted(unknown)}; allowed: {', '.join(sorted(known))} "
                         "(other sbatch options go under slurm:)")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None:
            continue
        if key in INTEGER_KEYS:
            if isinstance(value, bool) or not isinstance(value, int) or value < INTEGER_KEYS[key]:
                raise ValueError(f"{_label(where)}.{key}: must be an integer >= {INTEGER_KEYS[key]}, got {value!r}")
        elif key == "mem_gb":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{_label(where)}.mem_gb: must be a positive number of GB, got {value!r}")
        elif key in TEXT_KEYS:
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{_label(where)}.{key}: must be a name, got {value!r}")
        elif key == "setup":
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(line, str) for line in value):
                raise ValueError(f"{_label(where)}.setup: must be a list of shell lines, got {value!r}")
            value = tuple(value)
        elif key == "slurm":
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ValueError(f"{_label(where)}.slurm: must be a mapping of sbatch option names (without --) "
                                 f"to values, e.g. {{qos: high}}, got {value!r}")
            value = {k.lstrip("-").replace("-", "_"): v for k, v in value.items()}
        values[key] = value
    return ClusterResources(**values)


def with_command_line(resources: ClusterResources, options: dict[str, Any]) -> ClusterResources:
    """The suite's resources with the ``--slurm.*`` options given on the command line (``None``: not given);
    ``slurm`` items are ``KEY=VALUE`` strings added to the suite's, ``setup`` lines come after the suite's."""
    given = {k: v for k, v in options.items() if v is not None}
    extra = dict(resources.slurm)
    for item in given.pop("slurm", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--slurm.slurm {item!r}: give KEY=VALUE, e.g. --slurm.slurm qos=high")
        extra[key.lstrip("-").replace("-", "_")] = value
    setup = (*resources.setup, *(given.pop("setup", None) or []))
    merged = {**asdict(resources), **given, "slurm": extra, "setup": list(setup)}
    return resources_from_dict(merged, where="--slurm")


def add_command_line_options(parser) -> None:
    """``--slurm.<key>`` for every resource (argparse ``dest`` ``slurm_<key>``)."""
    group = parser.add_argument_group("cluster resources of each cell (override the suite's resources:)")
    for f in fields(ClusterResources):
        if f.name in ("slurm", "setup"):
            what = "KEY=VALUE: one more sbatch option" if f.name == "slurm" else "a shell line run before each cell"
            group.add_argument(f"--slurm.{f.name}", dest=f"slurm_{f.name}", action="append", metavar="LINE"
                               if f.name == "setup" else "KEY=VALUE", help=f"{what} (repeatable)")
        else:
            kind = int if f.name in INTEGER_KEYS else float if f.name == "mem_gb" else str
            group.add_argument(f"--slurm.{f.name}", dest=f"slurm_{f.name}", type=kind, default=None,
                               help=f"default: the suite's, else {f.default}")


def command_line_options(args) -> dict[str, Any]:
    return {f.name: getattr(args, f"slurm_{f.name}") for f in fields(ClusterResources)}


__all__ = ["ClusterResources", "resources_from_dict", "with_command_line", "add_command_line_options",
           "command_line_options"]

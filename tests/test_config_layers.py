"""Composed method configs: <kind>.yaml plus the dataset's layer resolve to the shipped settings, through
`onestep fit --config <folder>` and a suite; a missing default or a broken layer is one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO
from onestep.benchmark import suite_from_dict
from onestep.cli import main
from onestep.config_layers import method_config_files
from onestep.fit import OneStepCLI, TRAINER_DEFAULTS
from onestep.data import OneStepDataModule
from onestep.generators import OneStepGenerator

CONFIGS = REPO / "configs"


class _Parsed(Exception):
    pass


class _ParseOnly(OneStepCLI):
    """The `onestep fit` parser, stopped before anything is built: the effective config."""

    def before_instantiate_classes(self) -> None:
        raise _Parsed(self.config["fit"])


def effective(args: list[str]) -> dict:
    from onestep.config_layers import expand_config_directories

    with pytest.raises(_Parsed) as parsed:
        _ParseOnly(OneStepGenerator, OneStepDataModule, subclass_mode_model=True, trainer_defaults=TRAINER_DEFAULTS,
                   seed_everything_default=0, args=["fit", *expand_config_directories(args)])
    return parsed.value.args[0].as_dict()


# today's settings of two layered pairs (the values of the per-dataset files before they were composed)
MAGT_8GAUSSIANS = {"backbone": {"name": "mlp", "hidden": [512] * 5, "activation": "relu"}, "latent_dim": 2,
                   "standardize": "global", "sigma": 0.14, "n_anchors": 512, "proposal": "mc", "lr": 8.0e-4,
                   "lr_schedule": "cosine", "weight_decay": 1.0e-5, "grad_clip": 5.0, "ema_decay": 0.999,
                   "eval_points": 512, "eval_projection_points": 256}
LMPPM_HELIX64 = {"latent_dim": 8, "sigma_max": 0.05, "sigma_min": 0.0, "alpha": 0.1, "steps": 10,
                 "encoder": {"name": "mlp", "hidden": [256, 256]}, "bank_size": 10000, "lr": 1.0e-3}


@pytest.mark.parametrize("method, dataset, init_args, batch_size", [
    ("magt", "8gaussians", MAGT_8GAUSSIANS, 1024), ("lmppm", "helix64", LMPPM_HELIX64, 256)])
def test_a_method_folder_resolves_to_todays_config(method, dataset, init_args, batch_size):
    config = effective(["--config", str(CONFIGS / method), "--data.dataset", dataset])
    assert {k: config["model"]["init_args"][k] for k in init_args} == init_args
    assert config["data"]["dataset"] == dataset and config["data"]["batch_size"] == batch_size
    assert config["trainer"]["max_steps"] == 4000 and config["eval"]["n_samples"] == 2000


def test_a_dataset_without_its_own_file_gets_its_kinds_default(tmp_path):
    np_file = tmp_path / "pts.npy"
    assert method_config_files(CONFIGS / "magt", "my_pkg.MyManifold", "t") == [CONFIGS / "magt" / "vector.yaml"]
    assert method_config_files(CONFIGS / "magt", str(np_file), "t") == [CONFIGS / "magt" / "vector.yaml"]
    assert method_config_files(CONFIGS / "magt", "image_folder", "t") == [CONFIGS / "magt" / "image.yaml"]
    assert method_config_files(CONFIGS / "otnfm", "moons2d", "t") == [CONFIGS / "otnfm" / "vector.yaml"]
    assert method_config_files(CONFIGS / "magt", "moons2d", "t") == [CONFIGS / "magt" / "vector.yaml",
                                                                     CONFIGS / "magt" / "moons2d.yaml"]
    vector = yaml.safe_load((CONFIGS / "magt" / "vector.yaml").read_text())["model"]["init_args"]
    config = effective(["--config", str(CONFIGS / "magt"), "--data.dataset", "torus3d"])  # a layer, same values
    assert config["model"]["init_args"]["sigma"] == vector["sigma"] == 0.15
    image = effective(["--config", str(CONFIGS / "magt"), "--data.dataset", "mnist"])
    assert image["model"]["class_path"].endswith("LatentMAGT") and image["data"]["batch_size"] == 128
    pixels = effective(["--config", str(CONFIGS / "magt" / "image_pixels.yaml"), "--data.dataset", "mnist"])
    assert pixels["model"]["class_path"].endswith(".MAGT") and pixels["model"]["init_args"]["backbone"]["name"] == "conv_decoder"


def test_a_suite_passes_every_layer_as_a_config(tmp_path):
    suite = suite_from_dict({"name": "s", "methods": [{"name": "magt", "config": "configs/magt"}],
                             "datasets": ["8gaussians", "mnist"], "budget": {"max_steps": 2}}, str(REPO / "x.yaml"))
    (magt,) = suite.methods
    search = suite.search_dirs()
    assert [p.name for p in magt.config_for("8gaussians", search)] == ["vector.yaml", "8gaussians.yaml"]
    assert [p.name for p in magt.config_for("mnist", search)] == ["image.yaml"]
    from onestep.benchmark.cell import cell_args

    args = cell_args(suite, suite.cells()[0], tmp_path)
    configs = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
    assert [Path(c).name for c in configs] == ["vector.yaml", "8gaussians.yaml"]


def _folder(tmp_path: Path, files: dict[str, dict]) -> Path:
    folder = tmp_path / "method"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_text(yaml.safe_dump(content))
    return folder


OTNFM = {"model": {"class_path": "onestep.generators.OTNFM", "init_args": {"lr": 1.0e-3}}, "data": {"batch_size": 8}}
BROKEN = [  # (id, files of the method folder, the one error line's fragments)
    ("no-kind-default", {"8gaussians.yaml": {"model": {"init_args": {"lr": 2e-3}}}},
     ["has no vector.yaml", "8gaussians.yaml alone is only a layer"]),
    ("default-names-a-dataset", {"vector.yaml": {**OTNFM, "data": {"dataset": "moons2d"}}},
     ["vector.yaml sets data.dataset='moons2d'", "remove data.dataset"]),
    ("layer-changes-the-class", {"vector.yaml": OTNFM, "8gaussians.yaml": {"model": {
        "class_path": "onestep.generators.FlowMatching"}}}, ["8gaussians.yaml sets model.class_path", "init_args"]),
    ("layer-names-another-dataset", {"vector.yaml": OTNFM, "8gaussians.yaml": {"data": {"dataset": "moons2d"}}},
     ["8gaussians.yaml sets data.dataset='moons2d' for dataset '8gaussians'"]),
]


@pytest.mark.parametrize("case", BROKEN, ids=[c[0] for c in BROKEN])
def test_a_broken_method_folder_is_one_clear_error(case, tmp_path, capsys):
    _, files, fragments = case
    folder = _folder(tmp_path, files)
    tiny = ["--trainer.max_steps", "1", "--eval.at_end", "false", "--trainer.enable_progress_bar", "false"]
    args = ["fit", "--config", str(folder), "--data.dataset", "8gaussians", "--out_dir", str(tmp_path), *tiny]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onestep: error: --config") and len(err.splitlines()) == 1, err
    assert all(f in err for f in fragments), err


def test_a_method_folder_without_a_dataset_says_to_give_one(tmp_path, capsys):
    assert main(["fit", "--config", str(CONFIGS / "magt"), "--out_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a method folder: give --data.dataset too" in err and "vector.yaml" in err, err

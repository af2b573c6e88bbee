"""Declared option rules and the registries are the single source: every declared rule refuses an
out-of-range value with one line naming the option and its range; a registered image dataset or backbone
is known everywhere without a second edit."""

from __future__ import annotations

import typing
import warnings

import pytest
import torch
from test_contract import SHAPES, TINY

from onestep.data import DATASETS, OneStepDataModule
from onestep.data.image_sets import IMAGE_DATASETS, IMAGE_SHAPES, ImageDataset, lenet_feature_spaces
from onestep.errors import _stated_range
from onestep.generators import GENERATORS, OTNFM
from onestep.nets import BACKBONES, build_backbone, register_backbone
from onestep.nets.mlp import MLP
from onestep.options import Range, choices_of, declared_rule, init_hints, rules_of


def _number_type(tp) -> type:
    """``int`` or ``float``: the numeric type inside ``Annotated[...]`` (through ``| None``)."""
    if typing.get_origin(tp) is typing.Annotated:
        return typing.get_args(tp)[0]
    return next(_number_type(a) for a in typing.get_args(tp) if rules_of(a))


def outside(rule: Range, kind: type):
    """A value just outside ``rule`` of type ``kind``."""
    step = 1 if kind is int else 0.5
    if rule.ge is not None:
        return kind(rule.ge - step)
    if rule.gt is not None:
        return kind(rule.gt)
    if rule.le is not None:
        return kind(rule.le + step)
    return kind(rule.lt)


def declared_cases():
    owners = {name: (cls, lambda cls=cls, name=name, **kw: cls(data_shape=SHAPES["vector"],
                                                                **{**TINY[name]["vector"], **kw}))
              for name, cls in GENERATORS.items()}
    owners["datamodule"] = (OneStepDataModule, lambda **kw: OneStepDataModule("rings2d", **kw))
    for owner, (cls, make) in owners.items():
        for option, tp in init_hints(cls).items():
            for rule in rules_of(tp)[:1]:
                yield pytest.param(make, option, outside(rule, _number_type(tp)), rule.bounds(),
                                   id=f"{owner}.{option}")
            if choices_of(tp) is not None:
                yield pytest.param(make, option, "no-such-choice", "one of", id=f"{owner}.{option}")


CASES = list(declared_cases())


def test_every_generator_declares_its_rules():
    """Each method has declared rules (a method whose checks were all hand-written would show up here)."""
    owners = {c.id.split(".")[0] for c in CASES}
    assert set(GENERATORS) | {"datamodule"} <= owners and len(CASES) >= 70


@pytest.mark.parametrize("make, option, value, says", CASES)
def test_each_declared_rule_refuses_a_value_outside_it_in_one_line(make, option, value, says):
    with pytest.raises(ValueError) as refused:
        make(**{option: value})
    message = str(refused.value)
    assert "\n" not in message and option in message and says in message and repr(value) in message, message


def test_nan_is_answered_with_the_declared_range():
    """The parser refuses nan before the class is built; the CLI's line takes the range from the signature."""
    assert declared_rule(OTNFM, "lr") == "be > 0" and declared_rule(OTNFM, "p_t1") == "lie in [0, 1]"
    assert _stated_range("onestep.generators.OTNFM", "ema_decay") == "lie in [0, 1)"
    assert _stated_range("onestep.generators.OTNFM", "prefetch_pairing") is None
    with pytest.raises(ValueError, match=r"lr=nan is not allowed; expected a finite number \(lr must be > 0\)"):
        OTNFM(data_shape=(2,), lr=float("nan"))


# ------------------------------------------------------------------------------------------ image datasets
def _tiny_loader(root, image_size=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (20, 1, 12, 12), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (20,), generator=g)
    return images[:15], labels[:15], images[15:], labels[15:]


@pytest.fixture
def tiny_digits(monkeypatch):
    entry = ImageDataset("tiny_digits", (1, 12, 12), _tiny_loader, num_classes=3, lenet="tiny",
                         aliases=("tiny-digits",))
    monkeypatch.setitem(IMAGE_DATASETS, entry.name, entry)
    return entry


def test_one_registry_entry_makes_an_image_dataset_known_everywhere(tiny_digits, tmp_path):
    from onestep.benchmark.suite import suite_from_dict
    from onestep.callbacks.evaluation import LENET_FOR_DATASET, EvaluationCallback
    from onestep.metrics.features import FEATURES, LENET_ALIASES, LENET_DATASETS

    assert "tiny_digits" in DATASETS and IMAGE_SHAPES["tiny_digits"] == (1, 12, 12)
    dm = OneStepDataModule("tiny_digits", n_val=2, n_test=3, root=str(tmp_path))
    assert dm.is_image and dm.data_shape == (1, 12, 12) and dm.num_classes == 3
    dm.setup()
    assert dm.train_data.shape == (15, 1, 12, 12) and dm.test_data.shape == (3, 1, 12, 12)
    assert dm.labels("train").max() < 3
    # the feature spaces: the dataset's LeNet is the default besides pixels, under every spelling
    assert LENET_FOR_DATASET["tiny_digits"] == LENET_FOR_DATASET["tiny-digits"] == "lenet-tiny"
    assert "lenet-tiny" in FEATURES and LENET_DATASETS["tiny"] is tiny_digits
    assert LENET_ALIASES["tiny_digits"] == "tiny" and "lenet-tiny" in lenet_feature_spaces()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spaces = EvaluationCallback(every_n_steps=None, n_samples=16).resolve_feature_spaces(dm)
    assert spaces == ["pixels"] and any("lenet-tiny" in str(w.message) for w in caught)  # no weights shipped
    suite = suite_from_dict({"name": "s", "methods": [{"name": "otnfm", "config": "configs/otnfm"}],
                             "datasets": ["tiny_digits"], "seeds": [0], "budget": {"max_steps": 1}})
    assert suite.datasets == ("tiny_digits",)


def test_an_unregistered_dataset_is_unknown_everywhere():
    from onestep.callbacks.evaluation import LENET_FOR_DATASET

    assert "tiny_digits" not in DATASETS and "tiny_digits" not in IMAGE_SHAPES
    assert "tiny_digits" not in LENET_FOR_DATASET
    with pytest.raises(ValueError, match="'tiny_digits' is not a known dataset"):
        OneStepDataModule("tiny_digits")


# ------------------------------------------------------------------------------------------ backbones
def test_one_decorator_registers_a_backbone_with_the_shared_checks(monkeypatch):
    monkeypatch.setattr("onestep.nets.BACKBONES", dict(BACKBONES))
    from onestep import nets

    @register_backbone("wide_mlp", MLP, fixed=("in_dim", "out_dim", "out_shape"))
    def _wide(in_shape, out_shape, kwargs, construct):
        return construct(MLP, in_shape[0], out_shape[0], **{"hidden": (32,), **kwargs})

    assert "wide_mlp" in nets.BACKBONES and "wide_mlp" not in BACKBONES
    net = build_backbone({"name": "wide_mlp"}, (3,))
    assert net(torch.randn(4, 3), torch.rand(4)).shape == (4, 3) and net.time_conditioned
    plain = build_backbone({"name": "wide_mlp"}, (3,), time_conditioned=False)  # the shared time switch
    assert not plain.time_conditioned and plain.time_dim == 0
    with pytest.raises(ValueError, match="time_conditioned=False cannot take time_dim > 0"):
        build_backbone({"name": "wide_mlp", "time_dim": 8}, (3,), time_conditioned=False)
    with pytest.raises(ValueError, match=r"unexpected argument\(s\) \['width'\] for backbone 'wide_mlp'"):
        build_backbone({"name": "wide_mlp", "width": 3}, (3,))


def test_numpy_numbers_obey_the_declared_ranges():
    """Values read from arrays (``np.int64``) are checked like Python numbers, not waved through."""
    import numpy as np

    with pytest.raises(ValueError, match=r"bank_slots must be >= 1, got np.int64\(0\)"):
        OTNFM(data_shape=(2,), bank_slots=np.int64(0))
    with pytest.raises(ValueError, match=r"n_train=np.int64\(0\) is not allowed; use an integer >= 1"):
        OneStepDataModule("rings2d", n_train=np.int64(0))


def test_integer_bounds_are_compared_exactly():
    """2**63 - 1 is a valid seed; as a float it would round up to the excluded bound 2**63."""
    assert OneStepDataModule("rings2d", seed=2**63 - 1).seed == 2**63 - 1
    assert Range(ge=0, lt=2**63).contains(2**63 - 512) and not Range(ge=0, lt=2**63).contains(2**63)

"""Property-based checks of option validation: random out-of-range values raise a ValueError that names the
option and the value; random in-range values construct. Covers the datamodule, the base-class options
(through each generator) and the options of every generator in ``GENERATORS``."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onestep.data import DATASETS, MANIFOLDS, OneStepDataModule
from onestep.generators.base import LR_SCHEDULES
from onestep.generators.coupling import COUPLINGS
from onestep.generators.flow_matching import FM_COUPLINGS, SAMPLERS, FlowMatching
from onestep.generators.otnfm import LOSSES, OTNFM

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TINY = {"name": "mlp", "hidden": [8]}

# ------------------------------------------------------------------------------------ value strategies
not_a_number = st.one_of(st.text(max_size=4), st.booleans(), st.lists(st.integers(), max_size=2))
non_finite = st.sampled_from([math.nan, math.inf, -math.inf])


def ints_below(low: int) -> st.SearchStrategy:
    """Integers < low, and values that are not integers at all (floats, bools, text)."""
    return st.one_of(st.integers(max_value=low - 1), st.floats(), st.booleans(), st.text(max_size=3))


def floats_outside(low: float, high: float, low_open: bool = False, high_open: bool = False) -> st.SearchStrategy:
    below = st.floats(max_value=low, exclude_max=not low_open, allow_nan=False, allow_infinity=False)
    above = st.floats(min_value=high, exclude_min=not high_open, allow_nan=False, allow_infinity=False) \
        if math.isfinite(high) else st.nothing()
    return st.one_of(below, above, non_finite, not_a_number)


def floats_inside(low: float, high: float, high_open: bool = False, low_open: bool = False) -> st.SearchStrategy:
    return st.floats(min_value=low, max_value=min(high, 1e6), exclude_min=low_open, exclude_max=high_open,
                     allow_nan=False, allow_infinity=False)


def words_not_in(allowed) -> st.SearchStrategy:
    return st.one_of(st.text(max_size=8).filter(lambda s: s not in allowed), st.integers(), st.none())


# ------------------------------------------------------------------------------------ option tables
DATA_OPTIONS = {  # option: (invalid values, valid values)
    "dataset": (words_not_in(DATASETS), st.sampled_from(list(MANIFOLDS))),
    "batch_size": (ints_below(1), st.integers(1, 4096)),
    "n_train": (ints_below(1), st.one_of(st.none(), st.integers(1, 10**6))),
    "n_val": (ints_below(1), st.integers(1, 10**6)),
    "n_test": (ints_below(1), st.integers(1, 10**6)),
    "noise_std": (floats_outside(0, math.inf, low_open=False), st.one_of(st.none(), floats_inside(0, 10))),
    "seed": (st.one_of(st.integers(max_value=-1), st.integers(min_value=2**63), st.floats(), st.text(max_size=2)),
             st.integers(0, 2**63 - 1)),
    "num_workers": (ints_below(0), st.integers(0, 8)),
    "image_size": (ints_below(1), st.integers(1, 512)),
    "root": (st.one_of(st.integers(), st.floats(), st.lists(st.text(), min_size=1, max_size=2)),
             st.one_of(st.none(), st.text(alphabet="abc/", min_size=1, max_size=6))),
}

BASE_OPTIONS = {
    "lr": (floats_outside(0, math.inf, low_open=True) | st.just(0.0), floats_inside(0, 10, low_open=True)),
    "weight_decay": (floats_outside(0, math.inf, low_open=False) | st.just(-1e-9), floats_inside(0, 10)),
    "betas": (st.one_of(st.lists(floats_inside(0, 1, high_open=True), max_size=1),
                        st.lists(floats_inside(0, 1, high_open=True), min_size=3, max_size=4),
                        st.tuples(floats_inside(0, 1, high_open=True), st.floats(min_value=1, max_value=1e3)),
                        st.tuples(st.floats(max_value=-1e-6, min_value=-1e3), floats_inside(0, 1, high_open=True))),
              st.tuples(floats_inside(0, 1, high_open=True), floats_inside(0, 1, high_open=True))),
    "warmup_steps": (ints_below(0), st.integers(0, 10**6)),
    "lr_schedule": (words_not_in(LR_SCHEDULES), st.sampled_from(LR_SCHEDULES)),
    "ema_decay": (floats_outside(0, 1, high_open=False) | st.just(1.0), floats_inside(0, 1, high_open=True)),
    "grad_clip": (floats_outside(0, math.inf) | st.just(-0.5), floats_inside(0, 100)),
    "data_shape": (st.one_of(st.just([]), st.lists(st.integers(max_value=0), min_size=1, max_size=3)),
                   st.lists(st.integers(1, 8), min_size=1, max_size=1)),
    # the spec's own keyword arguments are checked by the networks (see the report on nets/ messages)
    "backbone": (st.one_of(st.integers(), st.text(max_size=3), st.lists(st.integers(), max_size=2),
                           st.builds(lambda name: {"name": name}, st.text(min_size=1, max_size=6).filter(
                               lambda n: n not in ("mlp", "unet", "resnet_flow", "conv_decoder", "conv_encoder")))),
                 st.builds(lambda width: {"name": "mlp", "hidden": [width]}, st.integers(1, 16))),
}

GENERATORS = {  # class: (factory, its own options)
    "FlowMatching": (lambda **kw: FlowMatching(**{"backbone": TINY, **kw}), {
        "coupling": (words_not_in(FM_COUPLINGS), st.sampled_from(FM_COUPLINGS)),
        "sampler": (words_not_in(SAMPLERS), st.sampled_from(SAMPLERS)),
        "steps": (ints_below(1), st.integers(1, 1000)),
        "sigma": (floats_outside(0, math.inf) | st.just(-1e-3), floats_inside(0, 5)),
    }),
    "OTNFM": (lambda **kw: OTNFM(**{"backbone": TINY, **kw}), {
        "coupling": (words_not_in(COUPLINGS), st.sampled_from(["independent", "minibatch", "online"])),
        "p_t1": (floats_outside(0, 1, low_open=False, high_open=False) | st.just(1.5), floats_inside(0, 1)),
        "loss_type": (words_not_in(LOSSES), st.sampled_from(LOSSES)),
        "bank_slots": (ints_below(1), st.integers(1, 64)),
        "global_max_size": (ints_below(1), st.integers(1, 10**6)),
        "bank_seed": (st.one_of(st.floats(), st.booleans(), st.text(max_size=3)), st.integers(-2**62, 2**62)),
        "time_fn": (words_not_in(("identity", "linear", "tanh", "log")),
                    st.sampled_from(["identity", "linear", "tanh", "log"])),
    }),
}

CASES = ([("OneStepDataModule", OneStepDataModule, option, *values) for option, values in DATA_OPTIONS.items()]
         + [(name, factory, option, *values) for name, (factory, _) in GENERATORS.items()
            for option, values in BASE_OPTIONS.items()]
         + [(name, factory, option, *values) for name, (factory, own) in GENERATORS.items()
            for option, values in own.items()])


def _case_id(case) -> str:
    return f"{case[0]}.{case[2]}"


def _every_option(test):
    """Parametrise over every (owner, option) case and draw the value with hypothesis."""
    parametrize = pytest.mark.parametrize("owner, build, option, invalid, valid",
                                          [pytest.param(*c, id=_case_id(c)) for c in CASES])
    return parametrize(SETTINGS(given(data=st.data())(test)))



def _extra_kwargs(owner: str, option: str) -> dict:
    """noise_std only applies to a manifold with its own noise level."""
    return {"dataset": "rings2d"} if owner == "OneStepDataModule" and option == "noise_std" else {}


@_every_option
def test_out_of_range_values_are_refused_by_name(owner, build, option, invalid, valid, data):
    value = data.draw(invalid, label=option)
    kwargs = _extra_kwargs(owner, option)
    with pytest.raises(ValueError) as refused:
        build(**kwargs, **{option: value})
    message = str(refused.value)
    assert re.search(rf"\b{option}\b", message), message
    shown = {repr(value), str(value), str(list(value)) if isinstance(value, tuple) else ""} - {""}
    if isinstance(value, dict):  # a network spec: the message names the bad network name
        shown = {repr(value.get("name"))}
    assert any(s in message for s in shown), (value, message)


@_every_option
def test_in_range_values_construct(owner, build, option, invalid, valid, data):
    value = data.draw(valid, label=option)
    kwargs = _extra_kwargs(owner, option)
    built = build(**kwargs, **{option: value})
    assert built.hparams[option] == value  # kept as given (and recorded in checkpoints)

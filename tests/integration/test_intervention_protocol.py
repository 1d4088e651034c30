"""One intervention protocol: ablation modes, the KV-window policy and user hooks all plug into
``detect(model, trials, intervention=...)`` the same way, and give what the older ``hooks=``
function gave."""

from __future__ import annotations

import json

import pytest
import torch

import retrieval_heads as rh
from retrieval_heads import Head
from retrieval_heads.intervention import Intervention, UserIntervention, compose
from retrieval_heads.interventions import (
    MODE_CLASSES,
    MODES,
    Ablation,
    KnockoutAblation,
    MeanAblation,
    RecordedZ,
    ResampleAblation,
    UniformAblation,
    ZeroAblation,
)
from retrieval_heads.kvcache import KVPolicy
from retrieval_heads.scoring import DecodeConfig, detect, iter_detect, score_trial
from retrieval_heads.store import ResultsError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RETRIEVAL = ["2.0", "2.1", "2.4", "2.5", "2.6", "2.7"]  # the embedded model's retrieval heads
CONFIG = DecodeConfig(max_new_tokens=6)


@pytest.fixture(scope="module")
def trials(tiny_model):
    return rh.make_trials(tiny_model, lengths=[300], depths=[0, 100], n_needles=1)


def same_records(a, b) -> None:
    """Equal records, timings aside."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        dx, dy = x.to_dict(), y.to_dict()
        dx.pop("elapsed_s"), dy.pop("elapsed_s")
        assert dx == dy


def recording() -> RecordedZ:
    return RecordedZ([Head(0, 0)], decode={0: torch.zeros(1, 3, 1, 16)})


def every_mode() -> list[Ablation]:
    return [
        UniformAblation(["0.0"]),
        ZeroAblation(["0.0"]),
        MeanAblation(["0.0"], torch.zeros(2, 4, 16)),
        ResampleAblation(["0.0"], recording()),
        KnockoutAblation(["0.0"], [1, 2]),
    ]


# ---- the protocol -----------------------------------------------------------------------------


def test_every_mode_and_the_kv_policy_are_interventions():
    modes = every_mode()
    assert {m.mode for m in modes} == set(MODES) == set(MODE_CLASSES)
    for intervention in [*modes, KVPolicy(frozenset({(0, 0)})), UserIntervention()]:
        assert isinstance(intervention, Intervention), type(intervention).__name__
        json.dumps(intervention.describe())  # JSON-able
    assert not isinstance(object(), Intervention)


def test_the_factory_builds_the_mode_class():
    assert type(Ablation(["1.2"], "uniform")) is UniformAblation
    assert type(Ablation(["1.2"], "zero", "all")) is ZeroAblation
    mean = Ablation(["0.0"], "mean", mean_z=torch.zeros(2, 4, 16))
    assert type(mean) is MeanAblation and isinstance(mean, Ablation)
    knock = Ablation(["0.0"], "knockout", blocked_positions=[5, 3, 4])
    assert type(knock) is KnockoutAblation and knock.blocked_positions == (3, 4, 5)
    assert type(Ablation(["0.0"], "resample", resample=recording())) is ResampleAblation
    assert knock.describe() == {
        "intervention": "ablation",
        "mode": "knockout",
        "phase": "decode",
        "heads": ["0.0"],
        "blocked_positions": [3, 4, 5],
    }
    assert mean.describe()["mean_z_shape"] == [2, 4, 16]


@pytest.mark.parametrize(
    "cls, needs",
    [(MeanAblation, "mean_z"), (ResampleAblation, "resample"), (KnockoutAblation, "blocked")],
)
def test_a_mode_class_without_its_data_fails_on_construction(cls, needs):
    with pytest.raises(ValueError, match=f"{cls.__name__} needs {needs}"):
        cls(["0.0"])


def test_not_an_intervention_is_refused_by_name(tiny_model, trials):
    class HalfDone:
        def decode_hooks(self, model, trial):
            return []

    with pytest.raises(TypeError, match="lacks prefill_hooks, describe"):
        score_trial(tiny_model, trials[0], CONFIG, intervention=HalfDone())
    with pytest.raises(TypeError, match="not an intervention"):
        compose(UniformAblation(["0.0"]), HalfDone())


# ---- detect(..., intervention=) ---------------------------------------------------------------


def test_an_ablation_gives_the_records_of_the_hooks_function(tiny_model, trials):
    ablation = rh.ablate(tiny_model, RETRIEVAL, mode="uniform")
    old = detect(
        tiny_model,
        trials,
        config=CONFIG,
        hooks=lambda t: ([], ablation.decode_hooks(tiny_model)),
        require_pass=False,
    )
    new = detect(
        tiny_model,
        trials,
        config=CONFIG,
        intervention=UniformAblation(RETRIEVAL),
        require_pass=False,
    )
    assert new.as_array().tolist() == old.as_array().tolist()
    same_records(
        list(iter_detect(tiny_model, trials, CONFIG, intervention=ablation)),
        list(
            iter_detect(
                tiny_model, trials, CONFIG, lambda t: ([], ablation.decode_hooks(tiny_model))
            )
        ),
    )


def test_the_kv_policy_gives_the_records_of_its_hooks(tiny_model, trials):
    policy = KVPolicy(frozenset({(2, 0), (2, 1)}), sink=2, window=8, phase="all")
    old = list(iter_detect(tiny_model, trials, CONFIG, lambda t: policy.hooks(tiny_model)))
    new = list(iter_detect(tiny_model, trials, CONFIG, intervention=policy))
    same_records(old, new)
    assert policy.describe() == {
        "intervention": "kv_window",
        "full_kv_heads": ["2.0", "2.1"],
        "sink": 2,
        "window": 8,
        "phase": "all",
    }


def test_a_user_intervention_without_a_base_class(tiny_model, trials, tmp_path, monkeypatch):
    class CountZ:
        """Counts layer 0's z at every decode step of every trial; changes nothing."""

        def __init__(self):
            self.calls: list[str] = []
            self.fired = 0

        def prefill_hooks(self, model, trial):
            self.calls.append(trial.trial_id)
            return []

        def decode_hooks(self, model, trial):
            def count(z, hook):
                self.fired += 1

            return [(model.hook_name(0, "z"), count)]

        def describe(self):
            return {"intervention": "count-z", "layer": 0}

    counter = CountZ()
    assert isinstance(counter, Intervention)
    steps = {"step": 0, "step_rows": 0}
    for name in steps:
        original = getattr(tiny_model, name)

        def wrapper(*args, _name=name, _original=original, **kwargs):
            steps[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(tiny_model, name, wrapper)
    out = tmp_path / "run"
    records = detect(tiny_model, trials, out=out, config=CONFIG, intervention=counter)
    assert counter.calls == [t.trial_id for t in trials]
    assert counter.fired == steps["step"] > 0 and steps["step_rows"] == 0  # decode hooks: bridge
    meta = json.loads((out / "meta.json").read_text())
    assert meta["config"]["intervention"] == {"intervention": "count-z", "layer": 0}
    plain = detect(tiny_model, trials, config=CONFIG)
    assert records.as_array().tolist() == plain.as_array().tolist()  # it changed nothing
    assert steps["step_rows"] > 0  # no intervention: the lean step


def test_describe_lands_in_the_results_and_plain_runs_record_none(tiny_model, trials, tmp_path):
    ablation = UniformAblation(RETRIEVAL)
    detect(
        tiny_model,
        trials,
        out=tmp_path / "a",
        config=CONFIG,
        intervention=ablation,
        require_pass=False,
    )
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["config"]["intervention"] == ablation.describe()
    detect(tiny_model, trials, out=tmp_path / "b", config=CONFIG)
    assert "intervention" not in json.loads((tmp_path / "b" / "meta.json").read_text())["config"]
    with pytest.raises(ResultsError, match="intervention.mode"):  # another one into the same run
        detect(
            tiny_model,
            trials,
            out=tmp_path / "a",
            config=CONFIG,
            intervention=ZeroAblation(RETRIEVAL),
            require_pass=False,
        )


def test_user_intervention_and_compose(tiny_model, trials):
    fired: list[str] = []
    first = UserIntervention(
        decode=[(tiny_model.hook_name(0, "z"), lambda z, hook: fired.append("a"))],
        description={"what": "a"},
    )
    second = UserIntervention(
        decode=lambda model, trial: [(model.hook_name(0, "z"), lambda z, hook: fired.append("b"))]
    )
    both = compose(first, second)
    assert isinstance(both, Intervention)
    assert both.describe() == {
        "intervention": "compose",
        "parts": [{"intervention": "user", "what": "a"}, {"intervention": "user"}],
    }
    assert both.prefill_hooks(tiny_model, trials[0]) == []
    score_trial(tiny_model, trials[0], DecodeConfig(max_new_tokens=2), intervention=both)
    assert fired and fired[:2] == ["a", "b"]
    with pytest.raises(TypeError, match="list of"):
        UserIntervention(decode=42)


def test_hooks_and_intervention_together_are_refused(tiny_model, trials):
    ablation = UniformAblation(RETRIEVAL)

    def hooks(t):
        return [], ablation.decode_hooks(tiny_model)

    for call in (
        lambda: detect(tiny_model, trials, hooks=hooks, intervention=ablation),
        lambda: score_trial(tiny_model, trials[0], CONFIG, hooks, intervention=ablation),
        lambda: next(iter_detect(tiny_model, trials, CONFIG, hooks, intervention=ablation)),
    ):
        with pytest.raises(ValueError, match="hooks= or intervention=, not both"):
            call()


def test_an_intervention_without_decode_hooks_keeps_the_lean_step(tiny_model, trials):
    nothing = ZeroAblation([])  # no head: no hooks
    assert nothing.decode_hooks(tiny_model) == []
    lean = score_trial(tiny_model, trials[0], CONFIG, intervention=nothing, lean=True)
    same_records([lean], [score_trial(tiny_model, trials[0], CONFIG)])
    with pytest.raises(ValueError, match="need the bridge"):
        score_trial(
            tiny_model, trials[0], CONFIG, intervention=UniformAblation(RETRIEVAL), lean=True
        )

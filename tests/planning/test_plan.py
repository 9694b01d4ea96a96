import json

import pytest
from hypothesis import given, settings, strategies as st

from bitalloc import BitallocError, BitPlan, QuantSpec
from bitalloc.plan import FORMAT
from bitalloc.units import Unit

UNITS = [Unit("a.q", (64, 128)), Unit("a.k", (32, 128)), Unit("b.down", (128, 256))]


def make_plan():
    return BitPlan.from_choice(UNITS, [QuantSpec(3), QuantSpec(4, 64, True), QuantSpec(2)], budget_bits=3.5,
                               solver="ilp", probe="fisher", objective=0.25, model={"id": "toy"})


def test_round_trip(tmp_path):
    plan = make_plan()
    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and data["version"] == 1
    assert list(data["layers"]) == ["a.q", "a.k", "b.down"]                    # order kept
    assert data["layers"]["a.k"] == {"bits": 4, "group_size": 64, "symmetric": True, "shape": [32, 128]}
    again = BitPlan.load(path, units=UNITS)
    assert again.layers == plan.layers and again.true_bpw == pytest.approx(plan.true_bpw)
    again.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == path.read_text()
    bits = 64 * 128 * 3 + 64 * 16 + 64 * 3 + 32 * 128 * 4 + 32 * 2 * 16 + 128 * 256 * 2 + 128 * 2 * 16 + 128 * 2 * 2
    assert plan.true_bpw == pytest.approx(bits / (64 * 128 + 32 * 128 + 128 * 256))


def test_plan_for_another_model_is_refused():
    plan = make_plan()
    with pytest.raises(BitallocError, match="does not have.*a.q"):
        plan.check_units([Unit("x", (64, 128))])
    with pytest.raises(BitallocError, match="lacks 1 layer.*extra"):
        plan.check_units(UNITS + [Unit("extra", (8, 8))])
    with pytest.raises(BitallocError, match="shapes differ"):
        plan.check_units([Unit("a.q", (64, 64)), *UNITS[1:]])


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["layers"]["a.q"].update(bits="3"), "'bits' must be an integer"),
    (lambda d: d["layers"]["a.q"].update(bits=7), "cannot be stored"),
    (lambda d: d["layers"]["a.q"].update(symmetric=0), "'symmetric' must be true or false"),
    (lambda d: d["layers"]["a.q"].pop("group_size"), "lacks 'group_size'"),
    (lambda d: d.update(version=3), "newer than this bitalloc"),
    (lambda d: d.update(format="other"), "not a bitalloc plan"),
    (lambda d: d.update(budget_bits="3"), "'budget_bits' must be a number"),
    (lambda d: d.update(layers=[]), "'layers' must be a non-empty object"),
])
def test_hand_edited_plan_errors(tmp_path, edit, match):
    data = make_plan().to_json()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BitallocError, match=match):
        BitPlan.load(path)


def test_not_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(BitallocError, match="not valid JSON"):
        BitPlan.load(path)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                           max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(data=json_values)
def test_loader_never_crashes_on_arbitrary_json(data):
    try:
        BitPlan.from_json(data)
    except BitallocError:
        pass


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(["bits", "group_size", "symmetric", "shape"]), value=json_values,
       top=st.sampled_from(["version", "budget_bits", "solver", "model", "true_bpw", "objective", None]),
       top_value=json_values)
def test_loader_on_mutated_plans(key, value, top, top_value):
    data = make_plan().to_json()
    data["layers"]["a.k"][key] = value
    if top:
        data[top] = top_value
    try:
        plan = BitPlan.from_json(data)
    except BitallocError:
        return
    assert all(isinstance(s, QuantSpec) for s in plan.layers.values())      # accepted only if well-formed


def test_repr_is_one_short_line():
    plan = BitPlan(layers={u.name: QuantSpec(b) for u, b in zip(UNITS, (2, 3, 4))},
                   shapes={u.name: u.shape for u in UNITS}, budget_bits=3.5, solver="ilp", probe="fisher")
    text = repr(plan)
    assert "\n" not in text and len(text) < 200
    assert "3 layers" in text and "budget 3.5" in text and f"true {plan.true_bpw:.4f}" in text
    assert "widths {2: " in text and "4: " in text


def test_version_flag(capsys):
    from bitalloc import __version__
    from bitalloc.cli import main
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"bitalloc {__version__}"

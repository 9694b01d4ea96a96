"""Results that used to be wrong without a word (issue #20): each test reproduces one and fails without its fix."""
import copy
import dataclasses
import json

import pytest
import torch
from bitalloc import api
from bitalloc.cli import main
from bitalloc.errors import BitallocError, BitallocWarning
from bitalloc.plan import BitPlan

FAST = ["--seq-len", "32", "--n-windows", "2"]


@pytest.fixture(scope="module")
def base(tiny_llama_dir, calib_text):
    return api.prepare(tiny_llama_dir, calibration=calib_text, seq_len=32, n_windows=2)


def _variants(base):
    """(what changed, prepared, probe, settings) for every input of a measurement, enumerated from the code:
    each top-level input of table_cache.key_inputs and each keyed field of every probe."""
    from bitalloc import table_cache
    from bitalloc.models.identity import model_info
    from bitalloc.options import parse_options
    from bitalloc.sensitivity import get_probe
    from bitalloc.sensitivity.base import PROBES

    def with_(**kw):
        return dataclasses.replace(base, **kw)
    other_model = copy.deepcopy(base.model)
    with torch.no_grad():
        other_model.model.layers[0].mlp.up_proj.weight[0, 0] += 1
    dtype = torch.bfloat16 if next(base.model.parameters()).dtype != torch.bfloat16 else torch.float32
    other_dtype = copy.deepcopy(base.model).to(dtype)
    reshaped = base.tokens.reshape(1, -1)
    ids = base.tokens.clone()
    ids[0, 0] = (ids[0, 0] + 1) % 8192
    fused = [dataclasses.replace(u, fused_group="g") if i < 2 else u for i, u in enumerate(base.units)]
    top = {"model": with_(model=other_model, info=model_info(other_model)),
           "dtype": with_(model=other_dtype),
           "data": with_(tokens=ids),
           "windows": with_(tokens=reshaped),
           "batch_size": with_(batch_size=base.batch_size + 1),
           "options": with_(options=parse_options("2,3,4,8", group_size=64)),
           "units": with_(units=base.units[1:])}
    out = [(k, p, "fisher", {}) for k, p in top.items()]
    out.append(("units (fused group)", with_(units=fused), "fisher", {}))
    out.append(("probe", base, "kfac", {}))
    for name in PROBES:
        probe = get_probe(name)
        for f in dataclasses.fields(probe):
            if f.name in probe.same_numbers:
                continue
            v = getattr(probe, f.name)
            new = {bool: lambda x: not x, int: lambda x: x + 1, float: lambda x: x * 2}.get(type(v))
            value = new(v) if new else 4 if v is None else {"rtn": "gptq", "auto": "on"}.get(v, v + "x")
            out.append((f"{name}.{f.name}", base, name, {f.name: value}))
    out.append(("numerics", None, "fisher", {}))
    assert {k for k, *_ in out} >= set(table_cache.key_inputs(base, "fisher", get_probe("fisher").settings())) - \
        {"probe", "settings"}, "an input of key_inputs is not varied here"
    return out


def test_every_measurement_input_changes_the_table_key(base, monkeypatch):
    """Item 1: N inputs varied -> N keys changed (the window shape once shared a key: 2 × 32 vs 1 × 64)."""
    from bitalloc import table_cache
    from bitalloc.sensitivity import get_probe
    changed, varied = [], _variants(base)
    for what, prepared, probe, settings in varied:
        before = table_cache.table_key(base, probe, get_probe(probe).settings())
        if what == "numerics":
            monkeypatch.setattr(table_cache, "TABLE_NUMERICS", table_cache.TABLE_NUMERICS + 1)
            prepared = base
        after = table_cache.table_key(prepared, probe, get_probe(probe, **settings).settings())
        if what == "probe":
            before = table_cache.table_key(base, "fisher", get_probe("fisher").settings())
        monkeypatch.undo()
        changed += [what] if after != before else []
    assert len(varied) > 20
    assert changed == [w for w, *_ in varied], f"unchanged keys: {set(w for w, *_ in varied) - set(changed)}"


def test_a_resolved_stream_mode_is_keyed_not_the_word_auto(base):
    """hessian_trace keyed the literal "auto": a streamed and a whole-model estimate shared a key."""
    from bitalloc import table_cache
    auto = table_cache.key_inputs(base, "hessian_trace", {"stream": "auto"})["settings"]["stream"]
    assert auto in ("on", "off")
    assert table_cache.table_key(base, "hessian_trace", {"stream": "auto"}) == \
        table_cache.table_key(base, "hessian_trace", {"stream": auto})


def _allocate(tmp_path, model, calib_file, name="plan.json", *extra):
    out = tmp_path / name
    assert main(["allocate", "--model", str(model), "--calib", str(calib_file), "--budget", "3.5", "--out", str(out),
                 *FAST, *extra]) == 0
    return out


def test_apply_refuses_a_partial_plan(tmp_path, tiny_llama_dir, calib_file, capsys):
    """Item 2: a plan listing 1 of the model's layers was packed ("packed 1 layers"), the rest left bf16."""
    plan = json.loads(_allocate(tmp_path, tiny_llama_dir, calib_file).read_text())
    first = next(iter(plan["layers"]))
    plan["layers"] = {first: plan["layers"][first]}
    plan["extra"].pop("scope")
    (tmp_path / "part.json").write_text(json.dumps(plan))
    code = main(["apply", "--model", str(tiny_llama_dir), "--plan", str(tmp_path / "part.json"), "--out",
                 str(tmp_path / "ck"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "plan lacks 13 layer(s)" in err and "--exclude" in err
    assert not (tmp_path / "ck").exists()


def test_a_plan_made_with_exclude_is_applied_and_scored_as_made(tmp_path, tiny_llama_dir, calib_file, capsys):
    """Item 6: eval refused plans made with --exclude ("made for another model"); apply now packs exactly them."""
    path = _allocate(tmp_path, tiny_llama_dir, calib_file, "plan.json", "--exclude", "model.layers.1.mlp.down_proj")
    text = tmp_path / "eval.txt"
    text.write_text(calib_file.read_text()[-20000:])
    assert main(["eval", "--model", str(tiny_llama_dir), "--plan", str(path), "--text", str(text), "--eval-windows",
                 "2", *FAST]) == 0
    assert main(["apply", "--model", str(tiny_llama_dir), "--plan", str(path), "--out", str(tmp_path / "ck"),
                 *FAST]) == 0
    assert "packed 13 layers" in capsys.readouterr().out


def _negated(tiny_llama_dir, tmp_path):
    import shutil

    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ".layers." in name:
                p.neg_()
    model.save_pretrained(tmp_path / "negated")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / f, tmp_path / "negated" / f)
    return tmp_path / "negated"


def test_a_plan_for_another_model_is_refused_unless_forced(tmp_path, tiny_llama_dir, calib_file, capsys):
    """Item 3: a plan applied to a model with every matrix negated passed, its plan.json naming the wrong model."""
    path = _allocate(tmp_path, tiny_llama_dir, calib_file)
    other = _negated(tiny_llama_dir, tmp_path)
    text = tmp_path / "eval.txt"
    text.write_text(calib_file.read_text()[-20000:])
    args = ["--model", str(other), "--plan", str(path), *FAST]
    assert main(["apply", *args, "--out", str(tmp_path / "ck")]) == 2
    assert "made for another model" in capsys.readouterr().err and not (tmp_path / "ck").exists()
    assert main(["eval", *args, "--text", str(text), "--eval-windows", "2"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["apply", *args, "--out", str(tmp_path / "ck"), "--force"]) == 0
    written = json.loads((tmp_path / "ck" / "plan.json").read_text())
    made = json.loads(path.read_text())["model"]
    assert written["model"]["hash"] != made["hash"] and written["extra"]["forced"]["made_for"]["hash"] == made["hash"]


def test_the_same_model_in_another_dtype_passes_the_check(tmp_path, tiny_llama_dir, calib_file):
    """The hash depends on the dtype the model is read in: the planned layers' weights decide then."""
    path = _allocate(tmp_path, tiny_llama_dir, calib_file)
    text = tmp_path / "eval.txt"
    text.write_text(calib_file.read_text()[-20000:])
    assert main(["eval", "--model", str(tiny_llama_dir), "--plan", str(path), "--text", str(text), "--eval-windows",
                 "2", "--dtype", "bf16", *FAST]) == 0


def test_a_plan_solved_from_a_table_csv_names_its_model(tmp_path, tiny_llama_dir, calib_file):
    """Item 3: plans from `solve` recorded "model": {} (nothing to check them against)."""
    assert main(["probe", "--model", str(tiny_llama_dir), "--calib", str(calib_file), "--out",
                 str(tmp_path / "t.csv"), *FAST]) == 0
    assert main(["solve", "--table", str(tmp_path / "t.csv"), "--budget", "3.5", "--out", str(tmp_path / "p.json")]) == 0
    plan = BitPlan.load(tmp_path / "p.json")
    assert plan.model.get("hash") and plan.extra.get("scope", {}).get("experts") == "per-expert"


def test_a_plan_without_a_model_warns(tmp_path, tiny_llama_dir, calib_file):
    from bitalloc.packed import apply
    from bitalloc.provenance import check_plan_model
    plan = BitPlan.load(_allocate(tmp_path, tiny_llama_dir, calib_file))
    plan.model = {}
    prepared = api.prepare(tiny_llama_dir, calibration=calib_file.read_text(), seq_len=32, n_windows=2)
    with pytest.warns(BitallocWarning, match="records no model"):
        check_plan_model(plan, prepared.model, prepared.units)
    with pytest.raises(BitallocError, match="another model"):      # the Python API checks too
        other = copy.deepcopy(prepared.model)
        with torch.no_grad():
            other.model.layers[0].mlp.up_proj.weight.neg_()
        apply(other, BitPlan.load(tmp_path / "plan.json"), progress=False)


def test_eval_calibrates_gptq_on_the_seq_len_apply_uses(tmp_path, tiny_llama_dir, calib_file, monkeypatch):
    """Item 6: eval --quantizer gptq calibrated on 512-token windows whatever --seq-len said."""
    from bitalloc import evaluate
    path = _allocate(tmp_path, tiny_llama_dir, calib_file)
    seen = []
    real = evaluate.score_plans
    monkeypatch.setattr(evaluate, "score_plans", lambda prepared, *a, **k: seen.append(prepared.tokens.shape)
                        or real(prepared, *a, **k))
    text = tmp_path / "eval.txt"
    text.write_text(calib_file.read_text()[-20000:])
    assert main(["eval", "--model", str(tiny_llama_dir), "--plan", str(path), "--text", str(text), "--quantizer",
                 "gptq", "--eval-windows", "2", *FAST]) == 0
    assert seen == [torch.Size([2, 32])]


def test_a_second_search_worker_with_other_settings_is_refused(tmp_path, tiny_llama_dir, calib_file, capsys):
    """Item 4: a worker with other calibration windows and --nominal joined the study, and the best plan written
    took 3.3492 true bpw on a 3.2 true budget."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    args = ["search", "--model", str(tiny_llama_dir), "--calib", str(calib_file), "--study", "s", "--storage", url,
            "--budget", "3.5", "--n-trials", "2", "--windows", "1", "--seq-len", "32"]
    assert main([*args, "--n-windows", "2"]) == 0
    capsys.readouterr()
    assert main([*args, "--n-windows", "3", "--out", str(tmp_path / "best.json")]) == 2
    assert "calibration" in capsys.readouterr().err and not (tmp_path / "best.json").exists()
    assert main([*args, "--n-windows", "2", "--nominal"]) == 2
    assert "count_overhead" in capsys.readouterr().err


def test_a_failed_search_gives_the_model_back(base):
    """Item 5: a search whose fitness fails left the caller's model fake-quantized."""
    from bitalloc.fitness import make_fitness
    from bitalloc.solvers import get_solver
    from bitalloc.quantize_model import unit_weights
    before = {k: v.clone() for k, v in unit_weights(base.model, base.units).items()}
    real = make_fitness(base, max_windows=1)

    class Failing:
        calls = 0
        restore = staticmethod(real.restore)

        def __call__(self, choice, n_windows=None):
            Failing.calls += 1
            if Failing.calls == 3:
                raise RuntimeError("the GPU fell off")
            return real(choice, n_windows)
    table = api.measure(base, "fisher", cache=False)
    for name, settings in (("evolutionary", {"generations": 4, "offspring": 2}), ("optuna", {"n_trials": 4})):
        Failing.calls = 0
        with pytest.raises(RuntimeError, match="fell off"):
            get_solver(name, fitness=Failing(), progress=False, **settings)(table, 3.5)
        after = unit_weights(base.model, base.units)
        assert all(torch.equal(before[k], after[k]) for k in before), name

"""allocate --target vllm|llama.cpp|transformers: only what that engine serves fast, recorded in the plan."""
import shutil

import pytest

from bitalloc.cli import main
from bitalloc.plan import BitPlan

FAST = ["--n-windows", "2", "--seq-len", "32"]


def _allocate(model, calib, out, *extra):
    return main(["allocate", "--model", str(model), "--calib", str(calib), "--budget", "5", "--out", str(out),
                 *FAST, *extra])


@pytest.mark.slow
def test_each_target_plans_only_what_its_engine_serves(tiny_llama_dir, calib_file, tmp_path, capsys):
    assert _allocate(tiny_llama_dir, calib_file, tmp_path / "v.json", "--target", "vllm") == 0
    plan = BitPlan.load(tmp_path / "v.json")
    assert {(s.bits, s.symmetric) for s in plan.layers.values()} <= {(4, True), (8, True)}
    for i in range(2):                                   # q/k/v and gate/up share one width
        qkv = {plan.layers[f"model.layers.{i}.self_attn.{p}_proj"] for p in "qkv"}
        gate_up = {plan.layers[f"model.layers.{i}.mlp.{p}_proj"] for p in ("gate", "up")}
        assert len(qkv) == 1 and len(gate_up) == 1
    assert plan.extra["target"] == "vllm"
    assert "--format compressed-tensors" in capsys.readouterr().out
    assert _allocate(tiny_llama_dir, calib_file, tmp_path / "l.json", "--target", "llama.cpp") == 0
    assert all(s.ggml for s in BitPlan.load(tmp_path / "l.json").layers.values())
    assert _allocate(tiny_llama_dir, calib_file, tmp_path / "t.json", "--target", "transformers") == 0
    assert all(s.symmetric for s in BitPlan.load(tmp_path / "t.json").layers.values())


@pytest.mark.slow
def test_a_transformers_plan_as_compressed_tensors_loads_with_from_pretrained(k_llama_dir, calib_file, tmp_path):
    """The default plan for --target transformers, written as compressed-tensors, is a file transformers' own
    from_pretrained loads, every weight (an asymmetric one it cannot: save warns)."""
    assert _allocate(k_llama_dir, calib_file, tmp_path / "t.json", "--target", "transformers") == 0
    assert main(["apply", "--model", str(k_llama_dir), "--plan", str(tmp_path / "t.json"), "--format",
                 "compressed-tensors", "--out", str(tmp_path / "ct"), *FAST]) == 0
    import transformers
    _, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))


@pytest.mark.slow
def test_vllm_gives_each_layers_experts_one_width(tmp_path, calib_file):
    from bitalloc.models import zoo
    model = zoo.tiny("mixtral")
    model.save_pretrained(tmp_path / "moe")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"alloc/model-data/refllama-s/{name}", tmp_path / "moe" / name)
    assert _allocate(tmp_path / "moe", calib_file, tmp_path / "p.json", "--target", "vllm") == 0
    plan = BitPlan.load(tmp_path / "p.json")
    assert plan.extra["scope"]["experts"] == "per-layer"
    assert not any(".experts." in n and n.rsplit(".", 1)[-1].isdigit() for n in plan.layers)


@pytest.mark.parametrize("extra,message", [(["--options", "2,3"], "drop --options 2,3"),
                                           (["--granularity", "row"], "drop --granularity row"),
                                           (["--experts", "per-layer"], "drop --experts")])
def test_flags_a_target_sets_are_refused_in_one_line(tiny_llama_dir, calib_file, tmp_path, capsys, extra, message):
    assert _allocate(tiny_llama_dir, calib_file, tmp_path / "p.json", "--target", "vllm", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (tmp_path / "p.json").exists()

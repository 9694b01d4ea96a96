"""apply --format gguf: a llama.cpp file that transformers' own GGUF loader reads back to the logits of our
fake-quantized model, with the tokenizer intact and the size the plan's ggml types say."""
import pytest
import torch

from bitalloc.cli import main
from bitalloc.errors import BitallocError
from bitalloc.plan import BitPlan

gguf = pytest.importorskip("gguf")
FAST = ["--n-windows", "4", "--seq-len", "64"]


def _read_back(path):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()


@pytest.mark.slow
def test_a_ggml_plan_reads_back_through_transformers_as_we_quantized_it(k_llama_dir, calib_file, tmp_path, capsys):
    from bitalloc.ggml.checkpoint import fake_quantize
    from bitalloc.ggml.imatrix import input_energy
    from bitalloc.models.loading import load_model
    plan_path, out = tmp_path / "plan.json", tmp_path / "m.gguf"
    assert main(["allocate", "--model", str(k_llama_dir), "--calib", str(calib_file), "--budget", "4.0",
                 "--options", "ggml", "--quantizer", "rtn", "--out", str(plan_path), *FAST]) == 0
    plan = BitPlan.load(plan_path)
    kinds = {s.ggml for s in plan.layers.values()}
    assert len(kinds) >= 2 and kinds <= {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"}
    assert abs(plan.true_bpw - 4.0) < 0.1
    capsys.readouterr()
    assert main(["apply", "--model", str(k_llama_dir), "--calib", str(calib_file), "--plan", str(plan_path),
                 "--format", "gguf", "--out", str(out), *FAST]) == 0
    said = capsys.readouterr().out
    assert f"{plan.true_bpw:.4f} bpw in ggml types" in said

    model, tokenizer, _ = load_model(k_llama_dir, dtype="fp32")
    from bitalloc.calibration import read_text, windows
    from bitalloc.packed import planned_units
    units = planned_units(model, plan)
    tokens = windows(tokenizer, read_text(calib_file), seq_len=64, n_windows=4)
    importance = input_energy(model, units, tokens, progress=False)
    fake_quantize(model, {**{u.name: plan.layers[u.name].ggml for u in units}, "model.embed_tokens": "Q8_0"},
                  importance)
    read = _read_back(out)
    x = tokens[:2]
    with torch.no_grad():
        ours, theirs = model(x).logits, read(x).logits
    assert (ours - theirs).abs().max() < 1e-4

    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == plan.layers["model.layers.0.self_attn.q_proj"].ggml
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output.weight"] == "F16"
    assert types["token_embd.weight"] == "Q8_0"                             # --embedding-type's default
    rest = sum(p.numel() * (8.5 / 8 if "embed_tokens" in n else 2 if p.dim() == 2 else 4)
               for n, p in model.named_parameters() if n.removesuffix(".weight") not in plan.layers)
    predicted = plan.size_bytes() + rest
    tensor_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    assert abs(tensor_bytes / predicted - 1) < 0.02

    import transformers
    theirs_tok = transformers.AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    text = "The quick brown fox, 1234 times: <|endoftext|> done."
    assert theirs_tok(text).input_ids == tokenizer(text).input_ids

    # what llama.cpp reads of the tokenizer beyond its vocabulary: whether it adds BOS/EOS itself (as the
    # model's tokenizer does), and the model's name (the folder's name, never a relative path)
    fields = {f.name: f for f in reader.fields.values()}
    value = lambda key: fields[key].contents()                                             # noqa: E731
    ids = tokenizer("a").input_ids
    assert value("tokenizer.ggml.add_bos_token") == (ids[0] == tokenizer.bos_token_id)
    assert value("tokenizer.ggml.add_eos_token") == (len(ids) > 1 and ids[-1] == tokenizer.eos_token_id)
    assert value("general.name") == k_llama_dir.name


@pytest.mark.slow
def test_a_plan_in_our_formats_takes_llama_cpp_fallbacks_on_narrow_rows(tiny_llama_dir, calib_file, tmp_path, capsys):
    plan_path, out = tmp_path / "plan.json", tmp_path / "m.gguf"
    assert main(["allocate", "--model", str(tiny_llama_dir), "--calib", str(calib_file), "--budget", "3.5",
                 "--out", str(plan_path), *FAST]) == 0
    capsys.readouterr()
    assert main(["apply", "--model", str(tiny_llama_dir), "--calib", str(calib_file), "--plan", str(plan_path),
                 "--format", "gguf", "--out", str(out), "--eval", str(calib_file), "--eval-windows", "2",
                 *FAST]) == 0
    captured = capsys.readouterr()
    assert "not a multiple of 256" in captured.err and "fallback" in captured.err
    assert "relative difference 0.00e+00" in captured.out
    reader = gguf.GGUFReader(out)
    assert {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.")} <= \
        {"Q4_0", "Q5_0", "Q5_1", "Q8_0", "F32", "F16"}                           # 64-wide rows: no K-quant fits


def test_bad_gguf_outputs_are_refused_in_one_line(tiny_llama_dir, calib_file, tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    assert main(["allocate", "--model", str(tiny_llama_dir), "--calib", str(calib_file), "--budget", "5",
                 "--options", "ggml", "--out", str(plan_path), *FAST]) == 0
    (tmp_path / "there.gguf").write_bytes(b"x")
    cases = [(tmp_path / "m.safetensors", "ending in .gguf"), (tmp_path / "there.gguf", "exists"),
             (tmp_path / "nope" / "m.gguf", "does not exist")]
    for out, message in cases:
        capsys.readouterr()
        code = main(["apply", "--model", str(tiny_llama_dir), "--plan", str(plan_path), "--format", "gguf",
                     "--out", str(out), *FAST])
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0 and len(err) == 1 and message in err[0], err
    capsys.readouterr()
    assert main(["apply", "--model", str(tiny_llama_dir), "--plan", str(plan_path), "--out",
                 str(tmp_path / "packed"), *FAST]) != 0                      # our packed format: no ggml types
    err = capsys.readouterr().err
    assert "--format gguf" in err and not (tmp_path / "packed").exists()
    assert main(["allocate", "--model", str(tiny_llama_dir), "--calib", str(calib_file), "--budget", "5",
                 "--options", "ggml", "--granularity", "row", "--out", str(tmp_path / "r.json"), *FAST]) != 0
    assert "--granularity layer" in capsys.readouterr().err and not (tmp_path / "r.json").exists()


def test_exact_refuses_a_row_plan(tiny_llama_dir):
    from bitalloc.ggml.plan_types import plan_types
    from bitalloc.models.loading import load_model
    from bitalloc.options import QuantSpec
    from bitalloc.units import find_units
    model, _, _ = load_model(tiny_llama_dir)
    units = find_units(model)
    rows = torch.full((units[0].shape[0],), 4, dtype=torch.int8)
    rows[0] = 3
    plan = BitPlan({u.name: QuantSpec(4) for u in units}, {u.name: u.shape for u in units}, 4.0,
                   row_bits={units[0].name: rows})
    with pytest.raises(BitallocError, match="one type per tensor"):
        plan_types(plan, units, exact=True)
    with pytest.warns(UserWarning, match="widest row"):
        assert plan_types(plan, units)[units[0].name] == "Q5_0"     # W4 on 64-wide rows: llama.cpp's fallback


def test_the_ggml_option_set_has_true_sizes():
    from bitalloc.options import parse_options
    specs = {s.ggml: s for s in parse_options("ggml")}
    assert specs["Q4_K"].bits_per_weight((4096, 4096)) == 4.5
    assert specs["Q3_K"].bits_per_weight((4096, 4096)) == 3.4375
    assert specs["Q2_K"].bits_per_weight((4096, 640)) == 4.5          # stored as Q4_0 on 640-wide rows
    assert specs["Q6_K"].ggml_for(640) == "Q8_0"
    again = BitPlan.from_json(BitPlan({"a": specs["Q3_K"]}, {"a": (256, 256)}, 3.5).to_json())
    assert again.layers["a"] == specs["Q3_K"] and again.layers["a"].label() == "Q3_K"


@pytest.mark.slow
def test_gptq_on_the_k_quant_grid_reads_back_as_it_was_rounded(k_llama_dir, calib_file, tmp_path, capsys):
    plan_path, out = tmp_path / "plan.json", tmp_path / "m.gguf"
    assert main(["allocate", "--model", str(k_llama_dir), "--calib", str(calib_file), "--budget", "3.5",
                 "--options", "ggml", "--quantizer", "gptq", "--out", str(plan_path), *FAST]) == 0
    capsys.readouterr()
    assert main(["apply", "--model", str(k_llama_dir), "--calib", str(calib_file), "--plan", str(plan_path),
                 "--format", "gguf", "--out", str(out), "--eval", str(calib_file), "--eval-windows", "2", *FAST]) == 0
    said = capsys.readouterr().out
    assert "(gptq)" in said and "relative difference 0.00e+00" in said


def test_gptq_on_a_ggml_grid_beats_the_search_on_correlated_inputs():
    from bitalloc.ggml.gptq import gptq_ggml
    from bitalloc.ggml.types import TYPES, quantize
    torch.manual_seed(0)
    X = torch.randn(1024, 256) @ (torch.eye(256) + 0.3 * torch.randn(256, 256))     # correlated inputs
    W = torch.randn(64, 256) * 0.05
    H = X.T @ X
    for name in ("Q2_K", "Q3_K", "Q4_K", "Q6_K"):
        searched = quantize(W, TYPES[name], torch.diag(H)).dequantize()
        q = gptq_ggml(W, H, TYPES[name])
        assert q.u.dtype == torch.uint8 and int(q.u.max()) < 2 ** TYPES[name].bits
        err = lambda V: float(((X @ (W - V).T) ** 2).sum())                          # noqa: E731
        assert err(q.dequantize()) < 0.9 * err(searched), name

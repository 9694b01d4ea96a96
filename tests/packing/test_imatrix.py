"""apply --format gguf --imatrix: llama.cpp's imatrix file (GGUF form) holding the calibration statistics the
GGUF's rounding used, under the GGUF's own tensor names."""
import numpy as np
import pytest
import torch

from bitalloc.cli import main
from bitalloc.plan import BitPlan

gguf = pytest.importorskip("gguf")
FAST = ["--n-windows", "4", "--seq-len", "64"]


def test_the_imatrix_file_holds_what_the_rounding_used(k_llama_dir, calib_file, tmp_path, capsys):
    from bitalloc.calibration import read_text, windows
    from bitalloc.ggml import layout
    from bitalloc.ggml.types import quantize
    from bitalloc.models.loading import load_model
    plan_path, out, imat = tmp_path / "plan.json", tmp_path / "m.gguf", tmp_path / "imatrix.gguf"
    assert main(["allocate", "--model", str(k_llama_dir), "--calib", str(calib_file), "--budget", "3.6",
                 "--options", "ggml", "--quantizer", "rtn", "--out", str(plan_path), *FAST]) == 0
    capsys.readouterr()
    assert main(["apply", "--model", str(k_llama_dir), "--calib", str(calib_file), "--plan", str(plan_path),
                 "--format", "gguf", "--out", str(out), "--imatrix", str(imat), *FAST]) == 0
    assert "llama-quantize --imatrix" in capsys.readouterr().out

    reader = gguf.GGUFReader(imat)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.type"] == "imatrix" and fields["imatrix.datasets"] == [calib_file.name]
    assert fields["imatrix.chunk_size"] == 64 and fields["imatrix.chunk_count"] == 4
    entries = {t.name: t for t in reader.tensors}
    model_tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    plan = BitPlan.load(plan_path)
    assert len(entries) == 2 * len(plan.layers)
    model, tokenizer, _ = load_model(k_llama_dir, dtype="fp32")
    tokens = windows(tokenizer, read_text(calib_file), seq_len=64, n_windows=4)
    for name, layer in [("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj"),
                        ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj")]:
        in_sum2, counts = entries[f"{name}.in_sum2"], entries[f"{name}.counts"]
        W = model.get_submodule(layer).weight.detach()
        assert [int(n) for n in in_sum2.shape] == [W.shape[1], 1] and float(counts.data.reshape(-1)[0]) == tokens.numel()
        x = {}
        handle = model.get_submodule(layer).register_forward_hook(lambda m, a, o: x.setdefault("x", []).append(a[0]))
        with torch.no_grad():
            model(tokens)
        handle.remove()
        direct = torch.cat(x["x"]).reshape(-1, W.shape[1]).double().square().sum(0)
        assert np.allclose(in_sum2.data.reshape(-1), direct.numpy(), rtol=1e-4)
        # llama-quantize's weighting is in_sum2 / counts: with it our quantizer writes the very bytes in the file
        importance = torch.from_numpy(in_sum2.data.reshape(-1).copy()) / float(counts.data.reshape(-1)[0])
        q = quantize(W, plan.layers[layer].ggml, importance)
        assert np.array_equal(layout.pack(q).reshape(-1), np.asarray(model_tensors[name].data).reshape(-1))


def test_imatrix_goes_with_gguf_only(k_llama_dir, tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    assert main(["allocate", "--model", str(k_llama_dir), "--budget", "4", "--out", str(plan_path), *FAST]) == 0
    capsys.readouterr()
    assert main(["apply", "--model", str(k_llama_dir), "--plan", str(plan_path), "--format", "compressed-tensors",
                 "--out", str(tmp_path / "ct"), "--imatrix", str(tmp_path / "i.gguf"), *FAST]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--format gguf" in err[0] and not (tmp_path / "ct").exists()

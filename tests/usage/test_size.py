"""--size (issues #34, #35): a budget as the bytes of the whole output: a GGUF file (the token embedding and head
planned like any layer) or a compressed-tensors / GPTQ folder; the plan predicts the exact size and apply writes
that many bytes."""
import json

import pytest

from bitalloc.budgets import parse_size
from bitalloc.cli import main
from bitalloc.config import AllocateConfig
from bitalloc.errors import SettingError


@pytest.mark.parametrize("text,size", [("240MB", 240_000_000), ("0.25GB", 250_000_000), ("230MiB", 230 << 20),
                                       ("241961920", 241_961_920), (" 12 mb ", 12_000_000), (1e6, 1_000_000)])
def test_sizes_read_as_users_write_them(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["12 parsecs", "-3MB", "MB", "0", ""])
def test_a_size_that_is_not_one_names_the_setting(text):
    with pytest.raises(SettingError) as e:
        parse_size(text)
    assert e.value.field == "size"


def test_a_size_needs_a_format_and_no_bits():
    with pytest.raises(SettingError, match="--format"):
        AllocateConfig(size="20MB")
    with pytest.raises(SettingError, match="llama.cpp"):
        AllocateConfig(size="20MB", format="gguf")
    with pytest.raises(SettingError, match="llama.cpp"):
        AllocateConfig(size="20MB", target="llama.cpp", format="gptq")
    assert AllocateConfig(size="20MB", target="vllm").format == "compressed-tensors"
    gptq = AllocateConfig(size="20MB", format="gptq")
    assert gptq.format == "gptq" and gptq.fuse                  # the format's q/k/v share one width
    with pytest.raises(SettingError, match="not both"):
        AllocateConfig(size="20MB", budget_bits=4.0, target="llama.cpp")
    config = AllocateConfig(size="20MB", target="llama.cpp")
    assert config.size == 20_000_000 and config.budget_bits is None and config.on_model


def _one_line_exit_2(argv, capsys, out):
    try:
        code = main(argv)
    except SystemExit as e:              # argparse
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("bitalloc: error:"), err
    assert not out.exists()
    return err[0]


FAST = ["--effort", "fast", "--n-windows", "2", "--seq-len", "64"]


def test_bad_sizes_are_one_line_before_any_file(tmp_path, capsys):
    out = tmp_path / "p.json"
    line = _one_line_exit_2(["allocate", "--size", "20MB", "--out", str(out)], capsys, out)
    assert "--size" in line and "--format" in line and "--target" in line
    line = _one_line_exit_2(["allocate", "--out", str(out)], capsys, out)
    assert "--budget" in line and "--size" in line
    line = _one_line_exit_2(["allocate", "--size", "2MB", "--target", "llama.cpp", *FAST, "--out", str(out)],
                            capsys, out)
    assert "below the smallest plan" in line and "MB" in line


@pytest.mark.slow
def test_the_file_written_is_the_size_predicted_and_within_half_a_percent_of_the_size_asked(tmp_path, capsys):
    plan_path, gguf = tmp_path / "p.json", tmp_path / "m.gguf"
    asked = 12_000_000
    assert main(["allocate", "--size", str(asked), "--target", "llama.cpp", *FAST, "--out", str(plan_path)]) == 0
    plan = json.loads(plan_path.read_text())
    sized = plan["extra"]["size"]
    assert sized["asked_bytes"] == asked and 0.995 * asked <= sized["predicted_bytes"] <= asked
    assert "model.embed_tokens" in plan["layers"] and "lm_head" in plan["layers"]     # refllama-s: untied head
    assert main(["apply", "--plan", str(plan_path), "--format", "gguf", "--out", str(gguf)]) == 0
    assert gguf.stat().st_size == sized["predicted_bytes"]
    assert "as predicted" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("fmt,flags", [("compressed-tensors", ["--target", "vllm"]),
                                       ("gptq", ["--format", "gptq", "--symmetric"])])
def test_a_folder_written_is_the_size_predicted_and_within_half_a_percent(fmt, flags, tmp_path, capsys):
    """compressed-tensors (float32 scales) and GPTQ folders: every file counted (weights with their header,
    config, plan, tokenizer), the 16-bit embedding and head fixed, the layers planned to fill the rest."""
    from bitalloc.api import prepare
    from bitalloc.budgets import predicted_bytes
    from bitalloc.options import QuantSpec
    from bitalloc.plan import BitPlan
    prepared = prepare(None, n_windows=1, seq_len=64)
    plans = [BitPlan.from_choice(prepared.units, [QuantSpec(b, 128, True)] * len(prepared.units)) for b in (4, 8)]
    low, high = (predicted_bytes(prepared.model, prepared.tokenizer, p, prepared.units, fmt) for p in plans)
    asked = (low + high) // 2
    plan_path, out = tmp_path / "p.json", tmp_path / "folder"
    assert main(["allocate", "--size", str(asked), *flags, *FAST, "--out", str(plan_path)]) == 0
    sized = json.loads(plan_path.read_text())["extra"]["size"]
    assert sized["format"] == fmt and 0.995 * asked <= sized["predicted_bytes"] <= asked
    capsys.readouterr()
    assert main(["apply", "--plan", str(plan_path), "--format", fmt, "--out", str(out)]) == 0
    written = sum(f.stat().st_size for f in out.iterdir())
    assert written == sized["predicted_bytes"], capsys.readouterr().out
    assert "as predicted" in capsys.readouterr().out


def test_a_folder_size_below_the_16_bit_parts_is_one_line(tmp_path, capsys):
    out = tmp_path / "p.json"
    line = _one_line_exit_2(["allocate", "--size", "2MB", "--target", "vllm", *FAST, "--out", str(out)], capsys, out)
    assert "below the smallest plan" in line

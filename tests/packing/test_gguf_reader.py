"""Our GGUF metadata reader (alloc/ggml/reader.py) reads what the gguf package writes, as the gguf package reads it."""
import gguf
import numpy as np
import pytest

from bitalloc.errors import BitallocError
from bitalloc.ggml.reader import metadata, value


def _written(path):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.rope.freq_base", 10000.5)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_int64("test.negative", -7)
    w.add_token_list(["<s>", "hé", "▁the"] + [f"t{i}" for i in range(5000)])
    w.add_token_scores([float(-i) / 3 for i in range(5003)])
    w.add_token_types([1] * 5003)
    w.add_key_value("test.raw", [b"\xff\xfe", b"ok"], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)
    w.add_tensor("t", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_reads_what_the_gguf_package_reads(tmp_path):
    path = _written(tmp_path / "m.gguf")
    ours = metadata(path)
    theirs = {k: f for k, f in gguf.GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}
    assert set(ours) == set(theirs)
    for key, field in theirs.items():
        assert ours[key].type == int(field.types[0]), key
        if key == "test.raw":                       # not UTF-8: kept as bytes, written back unchanged
            assert ours[key].value == [b"\xff\xfe", "ok"]
            continue
        expected = field.contents()
        got = ours[key].value
        if isinstance(expected, list) and expected and isinstance(expected[0], float):
            assert np.allclose(got, expected), key
        else:
            assert got == expected, key
    assert ours["tokenizer.ggml.tokens"].sub_type == int(gguf.GGUFValueType.STRING)
    assert value(path, "general.architecture") == "llama"


def test_round_trip_through_the_writer(tmp_path):
    """What the GGUF writer's _copy_metadata does: every value written back from our reading is the same."""
    src = metadata(_written(tmp_path / "a.gguf"))
    w = gguf.GGUFWriter(str(tmp_path / "b.gguf"), "llama")
    for key, v in src.items():
        if key != "general.architecture":
            w.add_key_value(key, v.value, gguf.GGUFValueType(v.type),
                            sub_type=None if v.sub_type is None else gguf.GGUFValueType(v.sub_type))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    assert metadata(tmp_path / "b.gguf") == src


def test_bad_files_are_refused_in_one_line(tmp_path):
    path = _written(tmp_path / "m.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(BitallocError, match="truncated"):
        metadata(cut)
    other = tmp_path / "x.gguf"
    other.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(BitallocError, match="not a GGUF file"):
        metadata(other)
    with pytest.raises(BitallocError, match="no 'llama.context_length'"):
        value(path, "llama.context_length")

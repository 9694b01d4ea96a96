import pytest

from bitalloc import BitallocError, QuantSpec
from bitalloc.options import parse_options


@pytest.mark.parametrize("bits,group,sym,shape,expected", [
    (3, 128, False, (4096, 4096), 3 + 16 / 128 + 3 / 128),      # codes + fp16 scale + 3-bit zero per group
    (4, 128, True, (4096, 4096), 4 + 16 / 128),                  # symmetric: no zero points
    (2, 64, False, (4096, 4096), 2 + 16 / 64 + 2 / 64),
    (8, -1, False, (4096, 4096), 8 + 16 / 4096 + 8 / 4096),      # one group per row
])
def test_true_bits_per_weight(bits, group, sym, shape, expected):
    assert QuantSpec(bits, group, sym).bits_per_weight(shape) == pytest.approx(expected)
    assert QuantSpec(bits, group, sym).bits_per_weight(shape, count_overhead=False) == bits


def test_padding_is_counted():
    # in=100 pads codes to 128 per row; one partial group; zeros pad out=10 to 32
    spec = QuantSpec(4, 128, False)
    assert spec.size_bits((10, 100)) == 10 * 128 * 4 + 10 * 16 + 32 * 4


@pytest.mark.parametrize("kwargs", [dict(bits=7), dict(bits=1), dict(bits=3, group_size=100), dict(bits=3, group_size=0),
                                    dict(bits=3.0), dict(bits=3, symmetric="no")])
def test_invalid_specs_are_refused(kwargs):
    with pytest.raises(BitallocError):
        QuantSpec(**kwargs)


def test_parse_options():
    assert parse_options(None) == [QuantSpec(b, 128) for b in (2, 3, 4, 8)]
    assert parse_options("3g64,2", group_size=32) == [QuantSpec(2, 32), QuantSpec(3, 64)]
    with pytest.raises(BitallocError, match="not understood"):
        parse_options("three")
    with pytest.raises(BitallocError, match="twice"):
        parse_options("3,3")

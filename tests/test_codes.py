import numpy as np
import pyarrow as pa
import pytest

from binllm.codes import (code_table, code_text, pack_bits, packed_to_uint32, parse_code_text, read_code_table,
                          uint32_to_packed, unpack_bits)

USER_BITS = "10110010011100001111010100101101"
ITEM_BITS = "01001101110000101011001011110001"


def test_spec_worked_example_compresses_to_dotted_decimal():
    packed = parse_code_text([USER_BITS, ITEM_BITS], "binary")
    assert code_text(packed, "dotted") == ["178.112.245.45", "77.194.178.241"]
    assert code_text(packed, "binary") == [USER_BITS, ITEM_BITS]


def test_signs_map_plus_one_to_1_and_zero_counts_as_positive():
    signs = np.array([[1.0, -1.0, 0.0, -0.0, 1e-9, -1e-9, 1.0, -1.0]])
    assert code_text(pack_bits(signs), "binary") == ["10111010"]
    assert code_text(pack_bits(np.array([[1, 0, 1, 0, 0, 0, 0, 1]], dtype=np.uint8)), "binary") == ["10100001"]


@pytest.mark.parametrize("bits", [8, 16, 32, 64, 128])
def test_round_trip_for_any_multiple_of_8(bits):
    rng = np.random.default_rng(bits)
    signs = rng.choice([-1.0, 1.0], size=(50, bits))
    packed = pack_bits(signs)
    assert packed.shape == (50, bits // 8)
    np.testing.assert_array_equal(unpack_bits(packed), (signs > 0).astype(np.uint8))
    for fmt in ("binary", "dotted"):
        np.testing.assert_array_equal(parse_code_text(code_text(packed, fmt), fmt), packed)
    ids, back = read_code_table(code_table([f"u{i}" for i in range(50)], packed))
    np.testing.assert_array_equal(back, packed)
    assert list(ids[:2]) == ["u0", "u1"]


def test_code_table_schema_uses_uint32_for_32_bits():
    packed = parse_code_text([USER_BITS], "binary")
    table = code_table(["7"], packed)
    assert table.schema.field("bits").type == pa.uint32()
    assert table.column("bits")[0].as_py() == int(USER_BITS, 2)
    assert table.column("dotted")[0].as_py() == "178.112.245.45"
    np.testing.assert_array_equal(uint32_to_packed(packed_to_uint32(packed)), packed)
    assert code_table(["a"], np.zeros((1, 8), np.uint8)).schema.field("bits").type == pa.binary(8)


def test_malformed_codes_are_named():
    with pytest.raises(ValueError, match="1012"):
        parse_code_text(["1012"], "binary")
    with pytest.raises(ValueError, match="1.2.300.4"):
        parse_code_text(["1.2.300.4"], "dotted")
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_bits(np.ones((2, 7)))
    with pytest.raises(ValueError, match="missing column 'bits'"):
        read_code_table(pa.table({"id": ["a"]}), "codes/users.parquet")

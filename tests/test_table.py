"""The (address, flat offset, length, aligned) table every kernel reads the parameters through."""

import pytest
import torch

from fastavg.table import ALIGN_BYTES, ALIGN_ELEMENTS, CHUNK, build_table


@pytest.mark.parametrize("chunk", [CHUNK, 8, 24, 1 << 16])
def test_rows_tile_every_parameter_in_order(chunk):
    storage = torch.randn(3 * CHUNK + 40).bfloat16()
    # Sizes 1, 7, 4099 and one over two default chunks, views of one 64-byte-aligned storage.
    params = [storage[:1], storage[8:15], storage[16:4115], storage[4121 : 4121 + 2 * CHUNK + 3]]
    table = build_table(params, chunk)
    assert table.dtype == torch.int64 and table.shape[1] == 4
    rows, flat_start = iter(table.tolist()), 0
    for i, p in enumerate(params):
        covered = 0
        while covered < p.numel():  # full chunks, then the parameter's remainder
            address, offset, length, aligned = next(rows)
            assert offset == flat_start + covered and address == p.data_ptr() + covered * p.element_size()
            assert length == min(chunk, p.numel() - covered)
            # 16-byte vectors are valid for params, averages and rings alike: both alignments hold
            assert aligned == int(address % ALIGN_BYTES == 0 and offset % ALIGN_ELEMENTS == 0)
            # Known here: the 1-element view at flat 0; 7 at flat 1 (misplaced in the flat buffers); 4099
            # at flat 8, 32 bytes in; the last 1 element into the storage.
            assert aligned == [1, 0, 1, 0][i]
            covered += length
        flat_start += p.numel()
    assert next(rows, None) is None


@pytest.mark.parametrize("chunk", [0, -8, 12])
def test_a_chunk_that_would_break_vector_rows_is_refused(chunk):
    with pytest.raises(ValueError, match="multiple of 8"):
        build_table([torch.zeros(16)], chunk)


def test_no_parameters_give_an_empty_table():
    assert build_table([]).shape == (0, 4)


def test_one_parameter_gives_its_rows_on_its_device():
    p = torch.zeros(CHUNK + 5, dtype=torch.float16)
    table = build_table([p])
    assert table.device == p.device
    assert table.tolist() == [[p.data_ptr(), 0, CHUNK, 1], [p.data_ptr() + 2 * CHUNK, CHUNK, 5, 1]]

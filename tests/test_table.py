"""The (address, flat offset, length, aligned) table every kernel reads the parameters through."""

import pytest
import torch

from fastavg.table import ALIGN_BYTES, ALIGN_ELEMENTS, CHUNK, build_table


def _expected_rows(params, chunk):
    rows, offset = [], 0
    for p in params:
        for start in range(0, p.numel(), chunk):
            address = p.data_ptr() + start * p.element_size()
            aligned = address % ALIGN_BYTES == 0 and (offset + start) % ALIGN_ELEMENTS == 0
            rows.append([address, offset + start, min(chunk, p.numel() - start), int(aligned)])
        offset += p.numel()
    return rows


@pytest.mark.parametrize("chunk", [CHUNK, 8, 24, 1 << 16])
def test_rows_tile_every_parameter_in_order(chunk):
    storage = torch.randn(3 * CHUNK + 40).bfloat16()
    # Sizes 1, 7, 4099 and one over two default chunks; the last view starts 1 element in: misaligned.
    params = [storage[:1], storage[8:15], storage[16:4115], storage[4121 : 4121 + 2 * CHUNK + 3]]
    table = build_table(params, chunk)
    assert table.dtype == torch.int64 and table.shape[1] == 4
    assert table.tolist() == _expected_rows(params, chunk)
    assert table[:, 2].sum() == sum(p.numel() for p in params) and table[:, 2].max() <= chunk
    assert table[-1, 3] == 0 and table[2, 3] == 1  # the misaligned view, an aligned one


@pytest.mark.parametrize("chunk", [0, -8, 12])
def test_a_chunk_that_would_break_vector_rows_is_refused(chunk):
    with pytest.raises(ValueError, match="multiple of 8"):
        build_table([torch.zeros(16)], chunk)


def test_no_parameters_give_an_empty_table():
    assert build_table([]).shape == (0, 4)

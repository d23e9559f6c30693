import pytest
import torch

from qruntime.formats.packing import (
    dequantize_int4,
    dequantize_int8,
    int4_padded_k,
    pack_int4,
    quantize_int4,
    quantize_int8_per_channel,
    unpack_int4,
)


def _nibble_oracle(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Code of column k, straight from the documented layout: byte k // 2, low nibble for even k."""
    return (packed[:, k // 2].long() >> (4 * (k % 2))) & 0xF


@pytest.mark.parametrize("n,kp", [(1, 2), (3, 32), (17, 130)])
def test_int4_pack_unpack_round_trip_exact(n, kp):
    codes = torch.randint(0, 16, (n, kp), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (n, kp // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    for k in (0, 1, kp - 1):
        assert torch.equal(_nibble_oracle(packed, k), codes[:, k].long())
    # and the other way: every byte value survives unpack -> pack
    all_bytes = torch.arange(256, dtype=torch.uint8).reshape(2, 128)
    assert torch.equal(pack_int4(unpack_int4(all_bytes)), all_bytes)


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueError, match="4 bits"):
        pack_int4(torch.full((2, 4), 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))


def test_int8_per_channel_error_bound_and_layout():
    w = torch.randn(33, 70) * torch.rand(33, 1) * 3
    q, s = quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and q.shape == (33, 70) and s.shape == (33,) and s.dtype == torch.float32
    assert int(q.abs().max()) <= 127
    # the largest magnitude in each row maps to +-127
    assert torch.equal(q.abs().amax(1), torch.full((33,), 127, dtype=torch.int8))
    err = (w.double() - q.double() * s.double()[:, None]).abs()
    assert (err <= s.double()[:, None] / 2 * (1 + 1e-5)).all()
    assert torch.allclose(dequantize_int8(q, s), q.float() * s[:, None])


def test_int8_zero_row_dequantizes_to_zero():
    w = torch.randn(4, 16)
    w[2] = 0
    q, s = quantize_int8_per_channel(w)
    assert torch.equal(dequantize_int8(q, s)[2], torch.zeros(16))


@pytest.mark.parametrize("group_size", [None, 16, 32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [64, 100, 576, 9])
def test_int4_quantize_bound_padding_and_layout(group_size, symmetric, k):
    n = 7
    w = torch.randn(n, k) * 2 + (0.0 if symmetric else 0.5)
    qweight, scales, zeros, gs = quantize_int4(w, group_size, symmetric)
    kp = int4_padded_k(k, group_size)
    assert kp % 2 == 0 and kp >= k and (group_size is None or kp % group_size == 0) and kp - k < (gs if group_size else 2)
    g = kp // gs
    assert qweight.shape == (n, kp // 2) and scales.shape == (g, n)
    assert (zeros is None) == symmetric
    # oracle dequantization in float64 from the documented layout
    deq = torch.empty(n, k, dtype=torch.float64)
    for col in range(k):
        code = _nibble_oracle(qweight, col).double()
        z = 8.0 if zeros is None else zeros[col // gs].double()
        deq[:, col] = (code - z) * scales[col // gs].double()
    assert torch.allclose(dequantize_int4(qweight, scales, zeros, gs, k).double(), deq, rtol=1e-6, atol=1e-7)
    # round to nearest: every element within half a step of its group's scale
    step = scales.double().t().repeat_interleave(gs, dim=1)[:, :k]
    assert ((w.double() - deq).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()
    # padded columns hold the zero point (they dequantize to exactly 0)
    if kp > k:
        full = dequantize_int4(qweight, scales, zeros, gs, kp)
        assert torch.equal(full[:, k:], torch.zeros(n, kp - k))


def test_quantize_rejects_non_float():
    with pytest.raises(TypeError, match="floating-point"):
        quantize_int8_per_channel(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="2 dims"):
        quantize_int4(torch.ones(2, 2, 2), 16, True)

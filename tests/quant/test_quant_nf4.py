"""Our 4-bit quantization against bitsandbytes (CPU backend) as the oracle."""

import pytest
import torch

from loratune.quant import code_4bit, dequantize_4bit, dynamic_map, quantize_4bit
from loratune.quant.nf4 import _block_absmax, _scale_blocks

bnb_f = pytest.importorskip("bitsandbytes.functional")

CASES = [((64, 64), 64, "nf4"), ((33, 77), 64, "nf4"), ((128, 300), 128, "fp4"),
         ((1000, 513), 64, "nf4"), ((7, 4099), 4096, "nf4"), ((300, 200), 32, "fp4"),
         ((576, 1536), 64, "nf4")]


def test_code_tables_equal_bitsandbytes():
    assert torch.equal(dynamic_map(), bnb_f.create_dynamic_map(signed=True))
    assert torch.equal(dynamic_map(signed=False), bnb_f.create_dynamic_map(signed=False))
    for kind in ("nf4", "fp4"):
        assert torch.equal(code_4bit(kind), bnb_f.get_4bit_type(kind, device="cpu"))


@pytest.mark.parametrize("case", range(len(CASES)))
def test_bytes_equal_bitsandbytes(case):
    shape, blocksize, kind = CASES[case]
    torch.manual_seed(case)
    x = torch.randn(shape) * 0.02
    ref_packed, ref = bnb_f.quantize_4bit(x, blocksize=blocksize, compress_statistics=True,
                                          quant_type=kind)
    q = quantize_4bit(x, blocksize, kind, double_quant=True)
    assert torch.equal(q.packed, ref_packed.view(-1))  # 4-bit codes, byte for byte
    assert torch.equal(q.offset, ref.offset)
    assert torch.equal(q.absmax2, ref.state2.absmax)
    # 8-bit codes of the block scales: bitsandbytes' CPU kernel uses an approximate binary
    # search that, close to a midpoint, can pick a farther code. Where we differ, ours must
    # be at least as near as theirs.
    differ = (q.absmax != ref.absmax).nonzero().flatten()
    assert len(differ) <= 0.005 * q.absmax.numel()
    centred = (_block_absmax(x.reshape(-1).float(), blocksize) - q.offset)
    scaled = _scale_blocks(centred, q.absmax2, 256)
    code = dynamic_map()
    for i in differ.tolist():
        ours, theirs = int(q.absmax[i]), int(ref.absmax[i])
        assert abs(scaled[i] - code[ours]) <= abs(scaled[i] - code[theirs])
    # Dequantized error statistics agree.
    ours_w, ref_w = dequantize_4bit(q), bnb_f.dequantize_4bit(ref_packed, ref)
    err, ref_err = (ours_w - x).abs(), (ref_w - x).abs()
    assert err.mean().item() == pytest.approx(ref_err.mean().item(), rel=1e-3)
    assert err.max().item() == pytest.approx(ref_err.max().item(), rel=0.05)


def test_without_double_quant_and_dtypes():
    x = torch.randn(96, 40)
    q = quantize_4bit(x, 64, "nf4", double_quant=False)
    ref_packed, ref = bnb_f.quantize_4bit(x, blocksize=64, compress_statistics=False,
                                          quant_type="nf4")
    assert torch.equal(q.packed, ref_packed.view(-1)) and torch.equal(q.absmax, ref.absmax)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = dequantize_4bit(q, dtype)
        assert w.dtype == dtype and w.shape == x.shape
    # ~4.5 bits per weight without double quant; ~4.127 with it (for large tensors)
    big = torch.randn(4096, 1024)
    assert quantize_4bit(big, 64, "nf4", False).nbytes() * 8 / big.numel() == pytest.approx(4.5)
    assert quantize_4bit(big).nbytes() * 8 / big.numel() == pytest.approx(4.127, abs=0.002)


def test_chunked_dequantization_matches_whole():
    x = torch.randn(37, 91)  # odd count, short last block
    q = quantize_4bit(x, 64)
    torch.testing.assert_close(dequantize_4bit(q, chunk_blocks=3), dequantize_4bit(q),
                               atol=0, rtol=0)

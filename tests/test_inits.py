"""The init functions on plain tensors: exactness of the cheap OLoRA path, PiSSA, LoRA."""

import math

import pytest
import torch

from qolora.inits import INITS, adapter_scale, lora_factors, olora_factors, pissa_factors, residual_


def assert_close(actual, expected, rtol, what=""):
    diff = (actual - expected).abs()
    rel = float(diff.max() / expected.abs().max().clamp_min(1e-12))
    assert rel <= rtol, (f"{what}: max|diff|={float(diff.max()):.3g} mean={float(diff.mean()):.3g} "
                         f"rel={rel:.3g} > {rtol}")


@pytest.mark.parametrize("shape", [(96, 64), (64, 96), (128, 128)])
@pytest.mark.parametrize("rank", [1, 8, 32])
def test_thin_qr_equals_full_qr_factors(shape, rank):
    torch.manual_seed(0)
    w = torch.randn(*shape)
    q, r = torch.linalg.qr(w)  # PEFT's definition: full reduced QR
    a, b = olora_factors(w, rank, scale=1.0)
    assert a.shape == (rank, shape[1]) and b.shape == (shape[0], rank)
    assert_close(b, q[:, :rank], 1e-5, "B vs Q[:, :r]")
    assert_close(a, r[:rank], 1e-5, "A vs R[:r]")


def test_olora_b_is_orthonormal_and_a_is_upper_triangular():
    torch.manual_seed(1)
    w = torch.randn(200, 80)
    a, b = olora_factors(w, 16, 1.0)
    assert_close(b.T @ b, torch.eye(16), 1e-5, "B^T B")
    assert torch.allclose(torch.tril(a[:, :16], diagonal=-1), torch.zeros(16, 16), atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 2.0, 0.5])
def test_residual_restores_weight_for_every_scale(scale):
    torch.manual_seed(2)
    w = torch.randn(64, 48)
    a, b = olora_factors(w, 8, scale)
    res = residual_(w.clone(), a, b, scale)
    assert_close(res + scale * b @ a, w, 1e-6, "W_res + s*B@A")
    # with s != 1 the residual keeps (1 - s) * B@A of the projected part (documented, as PEFT)
    assert_close(res, w - scale * b @ a, 1e-6)


def test_pissa_is_the_truncated_svd():
    torch.manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(80, 80))
    v, _ = torch.linalg.qr(torch.randn(60, 60))
    s = torch.cat([torch.linspace(10, 5, 8), torch.logspace(-1, -3, 52)])
    w = u[:, :60] @ torch.diag(s) @ v.T  # a clear spectral gap after 8: the randomised SVD is accurate
    a, b = pissa_factors(w, 8, 2.0, torch.Generator().manual_seed(0))
    uu, ss, vv = torch.linalg.svd(w, full_matrices=False)
    assert_close(2.0 * b @ a, uu[:, :8] @ torch.diag(ss[:8]) @ vv[:8], 1e-3, "s*B@A vs rank-8 SVD")


def test_pissa_is_seeded():
    w = torch.randn(40, 30)
    f1 = pissa_factors(w, 4, 1.0, torch.Generator().manual_seed(5))
    f2 = pissa_factors(w, 4, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(f1[0], f2[0]) and torch.equal(f1[1], f2[1])


def test_lora_init_matches_peft_kaiming_bounds_and_zero_b():
    w = torch.randn(32, 100)
    a, b = lora_factors(w, 4, 1.0, torch.Generator().manual_seed(0))
    assert torch.count_nonzero(b) == 0
    assert float(a.abs().max()) <= 1 / math.sqrt(100)
    assert not INITS["lora"].needs_residual and INITS["olora"].needs_residual and INITS["pissa"].needs_residual


def test_scale():
    assert adapter_scale(32, 16, False) == 2.0
    assert adapter_scale(32, 16, True) == 8.0

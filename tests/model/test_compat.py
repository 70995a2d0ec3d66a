"""Adapters saved by earlier qolora versions keep loading exactly (on-disk format stability).

``fixtures/adapter_v1`` was written by qolora 0.1.0 (before the module restructure) with
``fixtures/make_adapter_v1.py``: a tiny bf16 base, a trained 4-bit OLoRA adapter, and the logits
qolora 0.1.0's ``load`` gives for it on a CPU whose bitsandbytes dequantizes correctly (its
``expected.json`` says how they were made, and why the first recorded logits were wrong).

The fixture's layers have rows of 32 or 64 with blocks of 64: the shapes bitsandbytes' AVX-512 CPU
kernel dequantizes wrongly. :mod:`qolora.base.bnb_cpu_fix` replaces that kernel where it is wrong; the
second test emulates such a CPU so that the guard is exercised on any machine.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import qolora

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "adapter_v1"


def _fixture_logits() -> tuple[torch.Tensor, torch.Tensor]:
    expected = json.loads((FIXTURE / "expected.json").read_text())
    model = qolora.load(FIXTURE / "base", FIXTURE / "adapter", device="cpu", progress=False)
    with torch.no_grad():
        logits = model(torch.tensor([expected["prompt"]])).logits[0]
    return logits, torch.tensor(expected["logits"])


def test_an_adapter_saved_by_qolora_0_1_0_loads_to_the_same_logits():
    logits, want = _fixture_logits()
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)


# bitsandbytes' AVX-512 branch of dequantizeBlockwise4bitCpu: blocks indexed per row (n // blocksize per row)
AVX512_KERNEL = '''
import torch
from bitsandbytes.backends.utils import _get_4bit_code

def avx512_like(A, absmax, blocksize, quant_type, shape, dtype):
    A = A.view(torch.uint8).reshape(-1)
    code = _get_4bit_code(quant_type, A.device)
    values = torch.stack([code[(A >> 4).long()], code[(A & 0xF).long()]], -1).reshape(-1)
    n = shape[-1]
    m = values.numel() // n
    values = values[: m * n].reshape(m, n)
    block = torch.arange(m)[:, None] * (n // blocksize) + torch.arange(n)[None, :] // blocksize
    return (values * absmax.float()[block]).reshape(shape).to(dtype)

torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", avx512_like)
'''


def test_the_fixture_loads_right_on_a_cpu_whose_bitsandbytes_kernel_is_wrong():
    script = AVX512_KERNEL + textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
        from qolora.base.bnb_cpu_fix import cpu_dequantize_agrees, ensure_cpu_dequantize_correct
        assert not cpu_dequantize_agrees()        # the emulated kernel is wrong on these shapes
        from test_compat import _fixture_logits
        logits, want = _fixture_logits()          # qolora's first bitsandbytes use registers the fix
        assert ensure_cpu_dequantize_correct()    # ... and says so
        assert cpu_dequantize_agrees()
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
        import bitsandbytes.functional as F       # aligned rows keep the native kernel, still right
        w = torch.randn(8, 128)
        q, s = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
        assert (F.dequantize_4bit(q, s) - w).norm() / w.norm() < 0.12
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]

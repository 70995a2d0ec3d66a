"""qolora.prepare on the real pretrained SmolLM2-135M-Instruct (slow: converts/loads ~260 MB)."""

import pytest
import torch

import qolora
from qolora.layer import adapter_layers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_dir():
    from qolora.assets import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    batch = tok(["The capital of France is", "def fibonacci(n):"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    return tok, batch, logits, model


def test_bits16_olora_is_exact_on_the_real_model(smollm2_dir, reference):
    _, batch, ref_logits, _ = reference
    model = qolora.prepare(smollm2_dir, bits=16, rank=16, dtype="fp32", progress=False)
    with torch.no_grad():
        diff = (model(**batch).logits - ref_logits).abs().max()
    assert diff < 1e-3, diff


def test_4bit_olora_is_more_faithful_than_plain_qlora(smollm2_dir, reference):
    tok, batch, ref_logits, ref_model = reference
    model = qolora.prepare(smollm2_dir, bits=4, rank=16, compare_plain=True, progress=False)
    report = model.qolora_report
    assert len(report.layers) == 30 * 7
    assert report.ratio_to_plain <= 0.97, report.summary()
    # factors on the real weights are OLoRA's: B orthonormal, B == Q[:, :r] of the full QR
    name, layer = next(adapter_layers(model))
    w = ref_model.get_submodule(name).weight.detach().float()
    q, _ = torch.linalg.qr(w)
    assert torch.allclose(layer.lora_B.weight, q[:, :16], atol=1e-4)
    with torch.no_grad():
        out = model.generate(**tok(["The capital of France is"], return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert "Paris" in tok.decode(out[0])

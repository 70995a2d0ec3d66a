"""qolora.prepare on the real pretrained SmolLM2-135M-Instruct (slow: converts/loads ~260 MB)."""

import pytest
import torch

import qolora
from qolora.adapters.layer import adapter_layers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_dir():
    from qolora.data.assets import default_model_dir

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
        out = model.generate(**tok(["The capital of France is"], return_tensors="pt"), max_new_tokens=5,
                             do_sample=False)
    assert "Paris" in tok.decode(out[0])


def test_save_load_export_merge_on_the_real_model(smollm2_dir, reference, tmp_path):
    """A few training steps, then every way out: exact reload, PEFT export, dequantized merge."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok, batch, _, _ = reference
    model = qolora.prepare(smollm2_dir, bits=4, rank=8, progress=False, device="cpu")
    text = tok(["The capital of France is Paris. The capital of Italy is Rome."], return_tensors="pt")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(3):
        model(**text, labels=text["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    prompt = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        trained_logits = model(**batch).logits
        trained_text = tok.decode(model.generate(**prompt, max_new_tokens=8, do_sample=False)[0])

    adapter = qolora.save_adapter(model, tmp_path / "adapter")
    reloaded = qolora.load(smollm2_dir, adapter, progress=False)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, trained_logits)

    merged_dir = tmp_path / "merged"
    qolora.merge(smollm2_dir, adapter, merged_dir, dtype="fp32", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (merged(**batch).logits - trained_logits).abs().max() < 1e-3
        assert tok.decode(merged.generate(**prompt, max_new_tokens=8, do_sample=False)[0]) == trained_text

    report = qolora.export_lora(adapter, tmp_path / "lora")
    assert report  # the dropped residual quantization error is reported
    original_merge = tmp_path / "merged_original"
    qolora.merge(smollm2_dir, adapter, original_merge, dtype="fp32", into="original", progress=False)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32), tmp_path / "lora").eval()
    dense = AutoModelForCausalLM.from_pretrained(original_merge, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (peft_model(**batch).logits - dense(**batch).logits).abs().max() < 1e-3

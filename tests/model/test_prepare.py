"""qolora.prepare on tiny random checkpoints: exactness, PEFT parity, quantization, bad input."""


import pytest
import torch

import qolora
from qolora import ConfigError
from qolora.adapters.layer import adapter_layers
from qolora.base.quant import dequantize_weight, quantization_kind

LLAMA_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def original(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def tokens(vocab=320, batch=2, length=16, seed=0):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def rel_err(a, b):
    return float((a - b).detach().abs().max() / b.detach().abs().max())


# ----------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("init", ["olora", "pissa", "lora"])
def test_bits16_model_is_unchanged_at_step0(tiny_llama_dir, init):
    model = qolora.prepare(tiny_llama_dir, bits=16, rank=8, init=init, alpha=16, progress=False)
    x = tokens()
    with torch.no_grad():
        diff = (model(x).logits - original(tiny_llama_dir)(x).logits).abs().max()
    assert diff < 1e-4, f"logits differ by {diff}"


@pytest.mark.parametrize("alpha", [8, 16])
def test_factors_and_residual_match_peft_olora(tiny_llama_dir, alpha):
    from peft import LoraConfig, get_peft_model

    ref = get_peft_model(original(tiny_llama_dir), LoraConfig(
        r=8, lora_alpha=alpha, target_modules="all-linear", init_lora_weights="olora"))
    ref_layers = {n.removeprefix("base_model.model."): m for n, m in ref.named_modules()
                  if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    ours = dict(adapter_layers(qolora.prepare(tiny_llama_dir, bits=16, rank=8, alpha=alpha, progress=False)))
    assert set(ours) == set(ref_layers) and len(ours) == 14
    for name, layer in ours.items():
        peft_layer = ref_layers[name]
        assert rel_err(layer.lora_A.weight, peft_layer.lora_A["default"].weight) <= 1e-5, name
        assert rel_err(layer.lora_B.weight, peft_layer.lora_B["default"].weight) <= 1e-5, name
        assert rel_err(layer.base_layer.weight, peft_layer.base_layer.weight) <= 1e-5, name
        assert layer.scaling == peft_layer.scaling["default"]


def test_b_has_orthonormal_columns(tiny_llama_dir):
    model = qolora.prepare(tiny_llama_dir, bits=4, rank=8, progress=False)
    for name, layer in adapter_layers(model):
        b = layer.lora_B.weight
        assert torch.allclose(b.T @ b, torch.eye(8), atol=1e-5), name


# -------------------------------------------------------------------------------- quantization
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_error_is_below_plain_quantization(tiny_llama_dir, bits):
    model = qolora.prepare(tiny_llama_dir, bits=bits, rank=8, compare_plain=True, progress=False)
    report = model.qolora_report
    assert len(report.layers) == 14
    assert report.ratio_to_plain < 1.0, report.summary()
    # the report measures the real thing: W vs what the layer computes with
    ref = original(tiny_llama_dir)
    rows = {r.name: r for r in report.layers}
    for name, layer in adapter_layers(model):
        w = ref.get_submodule(name).weight.detach()
        measured = float(torch.linalg.norm(w - layer.effective_weight().detach()))
        assert abs(measured - rows[name].error) < 1e-3 * rows[name].error, name
    # ... and the model stays close to the original
    x = tokens()
    with torch.no_grad():
        assert rel_err(model(x).logits, ref(x).logits) < 0.5  # 4-bit on random weights: coarse


def test_quantization_settings_are_honoured(tiny_llama_dir):
    model = qolora.prepare(tiny_llama_dir, bits=4, rank=4, quant_type="fp4", blocksize=128, double_quant=False,
                           quant_storage="bf16", progress=False)
    for _, layer in adapter_layers(model):
        w = layer.base_layer.weight
        assert quantization_kind(w) == "4bit"  # detected by class although its dtype is bf16
        assert w.dtype == torch.bfloat16
        assert (w.quant_type, w.blocksize, w.compress_statistics) == ("fp4", 128, False)
    model8 = qolora.prepare(tiny_llama_dir, bits=8, rank=4, progress=False)
    assert all(quantization_kind(adapter.base_layer.weight) == "8bit" for _, adapter in adapter_layers(model8))


def test_untargeted_linears_are_quantized_plainly_and_head_is_kept(tiny_llama_dir):
    model = qolora.prepare(tiny_llama_dir, bits=4, rank=4, target_modules=["q_proj", "v_proj"], progress=False)
    adapted = {n.rsplit(".", 1)[-1] for n, _ in adapter_layers(model)}
    assert adapted == {"q_proj", "v_proj"}
    assert quantization_kind(model.model.layers[0].mlp.up_proj.weight) == "4bit"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, unquantized


# ---------------------------------------------------------------------------------- trainability
def test_only_adapters_are_trainable(tiny_llama_dir):
    model = qolora.prepare(tiny_llama_dir, bits=4, rank=8, progress=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 28
    assert all(n.endswith(("lora_A.weight", "lora_B.weight")) for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_a_few_steps_lower_the_loss(tiny_llama_dir, bits):
    model = qolora.prepare(tiny_llama_dir, bits=bits, rank=8, progress=False, gradient_checkpointing=True)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    x = tokens(batch=4, length=24, seed=1)
    losses = []
    for _ in range(6):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05, losses


def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama_dir):
    x = tokens(batch=2, length=12, seed=2)
    grads = []
    for ckpt in (False, True):
        model = qolora.prepare(tiny_llama_dir, bits=4, rank=4, init="pissa", progress=False,
                               gradient_checkpointing=ckpt)
        model.train()
        model(input_ids=x, labels=x).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_merge_unmerge_on_unquantized_base(tiny_llama_dir):
    model = qolora.prepare(tiny_llama_dir, bits=16, rank=4, progress=False)
    layer = next(adapter for _, adapter in adapter_layers(model))
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        layer.lora_B.weight.add_(0.1)
        before = layer(x)
        layer.merge()
        layer.merge()  # idempotent
        assert torch.allclose(layer(x), before, atol=1e-5)
        layer.unmerge()
        layer.unmerge()
        assert torch.allclose(layer(x), before, atol=1e-5)
    q = next(adapter for _, adapter in adapter_layers(qolora.prepare(tiny_llama_dir, bits=4, rank=4, progress=False)))
    with pytest.raises(RuntimeError, match="qolora.merge"):
        q.merge()


# --------------------------------------------------------------------------- GPT-2 / Conv1D
def test_conv1d_weights_are_factored_in_the_right_orientation(tiny_gpt2_dir):
    model = qolora.prepare(tiny_gpt2_dir, bits=16, rank=4, progress=False)
    ref = original(tiny_gpt2_dir)
    layers = dict(adapter_layers(model))
    assert {n.rsplit(".", 1)[-1] for n in layers} == {"c_attn", "c_proj", "c_fc"}
    attn = layers["transformer.h.0.attn.c_attn"]
    assert attn.fan_in_fan_out and attn.lora_A.weight.shape == (4, 64) and attn.lora_B.weight.shape == (192, 4)
    w = ref.transformer.h[0].attn.c_attn.weight.detach().T  # Conv1D stores (in, out)
    q, r = torch.linalg.qr(w)
    assert rel_err(attn.lora_B.weight, q[:, :4]) < 1e-5
    x = tokens(vocab=320)
    with torch.no_grad():
        assert (model(x).logits - ref(x).logits).abs().max() < 1e-4
    model4 = qolora.prepare(tiny_gpt2_dir, bits=4, rank=4, compare_plain=True, progress=False)
    assert model4.qolora_report.ratio_to_plain < 1.0
    with torch.no_grad():
        assert torch.isfinite(model4(x).logits).all()


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=3), r"bits=3 .*allowed: 4, 8, 16"),
    (dict(rank=0), r"rank=0 must be an integer >= 1"),
    (dict(rank=33), r"rank=33 is larger than a targeted weight allows.*32x64.*<= 32"),
    (dict(alpha=0), r"alpha=0 must be a finite number > 0"),
    (dict(alpha=-1.5), r"alpha=-1.5 must be a finite number > 0"),
    (dict(target_modules=["qkv", "q_proj"]),
     r"target_modules \['qkv'\] match no linear layer.*available: \['down_proj'"),
    (dict(init="svd"), r"init='svd' is unknown; allowed: \['lora', 'olora', 'pissa'\]"),
    (dict(quant_type="int4"), r"quant_type='int4'.*'nf4', 'fp4'"),
    (dict(blocksize=100), r"blocksize=100"),
    (dict(adapter_dtype="fp8"), r"adapter_dtype='fp8'"),
    (dict(colour="red"), r"unknown option\(s\) \['colour'\]"),
])
def test_bad_options_fail_fast_with_one_clear_error(tiny_llama_dir, no_weight_reads, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        qolora.prepare(tiny_llama_dir, progress=False, **kwargs)


def test_all_problems_are_reported_at_once(tiny_llama_dir, no_weight_reads):
    with pytest.raises(ConfigError) as info:
        qolora.prepare(tiny_llama_dir, bits=5, rank=-1, alpha=0, init="nope", progress=False)
    assert len(info.value.problems) == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_options_without_cuda(tiny_llama_dir, no_weight_reads, device):
    with pytest.raises(ConfigError, match=f"device='{device}' needs CUDA, but no CUDA device is available"):
        qolora.prepare(tiny_llama_dir, device=device, progress=False)


@pytest.mark.parametrize("path, message", [
    ("/nonexistent/model", r"model path does not exist: '/nonexistent/model'"),
    ("./relative/missing", r"model path does not exist"),
    ("some-org/some-model-that-is-not-cached", r"is not a local folder and could not be fetched from the hub"),
])
def test_missing_model(path, message):
    with pytest.raises(ConfigError, match=message):
        qolora.prepare(path, progress=False)


def test_folder_without_config(tmp_path):
    with pytest.raises(ConfigError, match="has no config.json"):
        qolora.prepare(tmp_path, progress=False)


# ------------------------------------------------------------- checkpoints stored quantized
@pytest.fixture(scope="module", params=[4, 8])
def stored_quantized_dir(request, tiny_llama_dir, tmp_path_factory):
    """A tiny checkpoint saved by transformers + bitsandbytes in 4-bit (double quant) or 8-bit."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True) if request.param == 4 \
        else dict(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=BitsAndBytesConfig(**kw),
                                                 dtype=torch.float32)
    path = tmp_path_factory.mktemp(f"stored{request.param}")
    model.save_pretrained(path)
    return request.param, path


def test_stored_quantized_checkpoint_is_dequantized_then_requantized_with_a_warning(stored_quantized_dir, caplog):
    from transformers import AutoModelForCausalLM

    from qolora.base.quant import dequantize_weight as deq

    stored_bits, path = stored_quantized_dir
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    exact = qolora.prepare(path, bits=16, rank=4, progress=False)  # dequantized stored weights, exact adapters
    for name, layer in adapter_layers(exact):
        stored = deq(ref.get_submodule(name))
        assert torch.allclose(layer.effective_weight(), stored, atol=1e-6), name
    with caplog.at_level("WARNING", logger="qolora.model.prepare"):
        model = qolora.prepare(path, bits=4, rank=4, progress=False)
    assert model.qolora_report.requantized == f"{stored_bits}bit"
    assert model.qolora_report.total_error > 0
    assert (f"is stored {stored_bits}bit" in caplog.text and "quantized twice" in caplog.text
            and "% of their norm" in caplog.text)


def test_dequantize_8bit_after_a_forward_pass(tiny_llama_dir):
    """bitsandbytes moves an 8-bit layer's statistics to layer.state on the first forward."""
    model = qolora.prepare(tiny_llama_dir, bits=8, rank=4, progress=False)
    layer = next(adapter for _, adapter in adapter_layers(model))
    before = dequantize_weight(layer.base_layer)
    with torch.no_grad():
        model(tokens())
    assert torch.equal(dequantize_weight(layer.base_layer), before)

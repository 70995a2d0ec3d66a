"""CUDA paths (skipped without a GPU): factoring on the GPU, 4/8-bit kernels, paged optimizers."""

import pytest
import torch

import qolora
from qolora.adapters.layer import adapter_layers

pytestmark = pytest.mark.gpu


def tokens(batch=4, length=32, seed=0):
    return torch.randint(4, 384, (batch, length), generator=torch.Generator().manual_seed(seed)).cuda()


@pytest.mark.parametrize("bits", [4, 8])
def test_prepare_on_cuda_factors_on_the_gpu(tiny_llama_dir, bits):
    model = qolora.prepare(tiny_llama_dir, bits=bits, rank=8, device="cuda", compare_plain=True, progress=False)
    cpu = dict(adapter_layers(qolora.prepare(tiny_llama_dir, bits=16, rank=8, device="cpu", progress=False)))
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # default dtype on CUDA
    for name, layer in adapter_layers(model):
        assert layer.lora_A.weight.device.type == "cuda" and layer.base_layer.weight.device.type == "cuda"
        assert torch.allclose(layer.lora_B.weight.cpu(), cpu[name].lora_B.weight, atol=1e-4), name
    assert model.qolora_report.ratio_to_plain < 1.0
    with torch.no_grad():
        assert torch.isfinite(model(tokens()).logits).all()


@pytest.mark.parametrize("optim", ["PagedAdamW8bit", "PagedAdamW32bit"])
def test_paged_optimizer_trains_a_4bit_model_on_cuda(tiny_llama_dir, optim):
    import bitsandbytes as bnb

    model = qolora.prepare(tiny_llama_dir, bits=4, rank=8, device="cuda", gradient_checkpointing=True, progress=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = getattr(bnb.optim, optim)(params, lr=2e-3)
    x = tokens(seed=1)
    losses = []
    for _ in range(8):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses


def test_bf16_quant_storage_on_cuda(tiny_llama_dir):
    model = qolora.prepare(tiny_llama_dir, bits=4, rank=4, device="cuda", quant_storage="bf16", progress=False)
    w = next(adapter_layers(model))[1].base_layer.weight
    assert w.dtype == torch.bfloat16 and type(w).__name__ == "Params4bit"
    with torch.no_grad():
        assert torch.isfinite(model(tokens()).logits).all()

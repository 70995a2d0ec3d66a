"""Mixture-of-Experts checkpoints and renamed weights, as the hub stores them (issue 23).

Tiny random Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 and V2-Lite, GLM-4-MoE, ERNIE-4.5-MoE (per-expert
tensors that transformers fuses when it loads; Mixtral's and Phi-MoE's ``block_sparse_moe.experts.<e>.w1/w2/w3``),
Granite-MoE (experts stored fused as ``input_linear`` / ``output_linear``) and GPT-NeoX (``embed_out`` for
``lm_head``), each written by transformers' own ``save_pretrained``: read with transformers' rules, experts
quantized and adapted one by one, trained, saved and reloaded exactly, merged into a folder plain transformers
loads, exported to PEFT's format for 3-D parameters.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import qolora
from qolora.adapters.layer import adapter_layers
from qolora.base.experts import SplitExperts, is_router
from qolora.base.reader import BaseCheckpoint, linear_layers, select_targets
from qolora.errors import ConfigError

MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "deepseek_v2", "phimoe", "granitemoe", "glm4_moe",
       "ernie4_5_moe", "gpt_oss")
ALL = (*MOE, "gpt_neox")
DENSE_FIRST = ("deepseek_v3", "deepseek_v2", "glm4_moe", "ernie4_5_moe")  # layer 0 dense: one MoE layer of two
VOCAB = 128


def tiny_config(arch: str):
    """A 2-layer config of ``arch``: hidden 64, 4 experts of width 24 (2I = 48, so in/out never coincide)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, tie_word_embeddings=False)
    moe = dict(num_experts_per_tok=2, moe_intermediate_size=24)
    if arch == "mixtral":
        return tf.MixtralConfig(**common, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(**common, **moe, intermediate_size=96, shared_expert_intermediate_size=40,
                                 num_experts=4, decoder_sparse_step=1)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, **moe, intermediate_size=96, num_experts=4, head_dim=16)
    if arch == "deepseek_v3":
        return tf.DeepseekV3Config(**{**common, "num_key_value_heads": 4}, **moe, intermediate_size=96,
                                   n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                                   topk_group=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
                                   qk_nope_head_dim=16, v_head_dim=16)
    if arch == "deepseek_v2":  # DeepSeek-V2-Lite: no q compression (q_proj), a dense first layer, a shared expert
        return tf.DeepseekV2Config(**{**common, "num_key_value_heads": 4}, **moe, intermediate_size=96,
                                   n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None,
                                   kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
    if arch == "gpt_oss":
        return tf.GptOssConfig(**common, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=16)
    if arch == "phimoe":
        return tf.PhimoeConfig(**common, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    if arch == "granitemoe":
        return tf.GraniteMoeConfig(**common, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    if arch == "glm4_moe":
        return tf.Glm4MoeConfig(**common, **moe, intermediate_size=96, n_routed_experts=4, n_shared_experts=1,
                                first_k_dense_replace=1, head_dim=16)
    if arch == "ernie4_5_moe":
        return tf.Ernie4_5_MoeConfig(**common, intermediate_size=96, moe_intermediate_size=24, moe_k=2,
                                     moe_num_experts=4, moe_num_shared_experts=1, moe_layer_start_index=1)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=128, tie_word_embeddings=False)
    raise ValueError(arch)


def make_tiny(arch: str, path: Path, seed: int = 0) -> Path:
    """Save a tiny random ``arch`` with transformers' ``save_pretrained`` (the hub's layout)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    with torch.no_grad():  # larger than the default init, so quantization and adapters matter visibly
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    return Path(path)


class _Lazy(dict):
    """``{arch: value}`` made on first use (a ``-k`` selection builds only its architectures)."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, arch):
        self[arch] = value = self.make(arch)
        return value


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return _Lazy(lambda arch: make_tiny(arch, root / arch))


def ids(seed: int = 0, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


# ------------------------------------------------------------------------------------ reading
@pytest.mark.parametrize("arch", ALL)
def test_every_tensor_is_mapped_by_transformers_rules(tiny, arch):
    base = BaseCheckpoint.open(tiny[arch])
    skeleton = base.skeleton()
    plan = base.read_plan(skeleton)
    assert plan.missing == [] and plan.unexpected == []
    experts = [n for n, m in skeleton.named_modules() if isinstance(m, SplitExperts)]
    assert len(experts) == (0 if arch == "gpt_neox" else 1 if arch in DENSE_FIRST else 2)
    layers = linear_layers(skeleton)
    for name in experts:
        for e in range(4):
            assert tuple(layers[f"{name}.{e}.gate_up_proj"].weight.shape) == (48, 64)
            assert tuple(layers[f"{name}.{e}.down_proj"].weight.shape) == (64, 24)


@pytest.mark.parametrize("arch", ALL)
def test_16_bit_model_computes_what_transformers_computes(tiny, arch):
    """The split experts' loop and the renamed head give transformers' own logits (fp32, no adapter change)."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny[arch]).eval()
    model = qolora.prepare(tiny[arch], bits=16, rank=4, progress=False)
    tokens = ids()
    torch.testing.assert_close(logits(model, tokens), logits(reference, tokens), atol=2e-5, rtol=1e-4)


def test_a_fused_checkpoint_reads_like_the_per_expert_one(tiny, tmp_path):
    """A checkpoint stored with the model's own fused names (E, 2I, H) is read one expert slice at a time."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["qwen3_moe"])
    fused = tmp_path / "fused"
    fused.mkdir()
    shutil.copy(tiny["qwen3_moe"] / "config.json", fused / "config.json")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert state["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 48, 64)
    save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
    a = qolora.prepare(tiny["qwen3_moe"], bits=4, rank=4, progress=False)
    b = qolora.prepare(fused, bits=4, rank=4, progress=False)
    assert torch.equal(logits(a, ids()), logits(b, ids()))


def test_gpt_oss_experts_split_with_their_biases_and_own_gating(tiny):
    """gpt-oss: fused (E, in, out) experts with interleaved gate/up rows, biases and a clamped SwiGLU of its own.
    Each expert layer holds its slice of the fused weight (rows in the stored order) and its row of the fused
    bias; the module's own ``_apply_gate`` runs with its alpha and limit."""
    from safetensors.torch import load_file
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    stored = load_file(str(tiny["gpt_oss"] / "model.safetensors"))
    assert stored["model.layers.1.mlp.experts.gate_up_proj"].shape == (4, 64, 48)  # transposed, as the hub stores it
    model = qolora.prepare(tiny["gpt_oss"], bits=4, rank=4, progress=False)
    experts = model.get_submodule("model.layers.1.mlp.experts")
    assert isinstance(experts, SplitExperts) and experts.gating is GptOssExperts and experts.act_fn is None
    assert (experts.alpha, experts.limit) == (1.702, 7.0)
    layers = dict(adapter_layers(model))
    for e in range(4):
        for proj in ("gate_up_proj", "down_proj"):
            layer = layers[f"model.layers.1.mlp.experts.{e}.{proj}"]
            assert type(layer.base_layer).__name__ == "Linear4bit"
            assert torch.equal(layer.base_layer.bias, stored[f"model.layers.1.mlp.experts.{proj}_bias"][e])
    bits16 = qolora.prepare(tiny["gpt_oss"], bits=16, rank=4, init="lora", progress=False)
    weight = bits16.get_submodule("model.layers.1.mlp.experts.2.gate_up_proj").base_layer.weight
    assert torch.equal(weight, stored["model.layers.1.mlp.experts.gate_up_proj"][2].T)  # interleaved rows kept


def test_a_checkpoint_stored_in_mxfp4_is_refused_before_any_weight_is_read(tiny, tmp_path, no_weight_reads):
    """gpt-oss as the hub stores it (experts as MXFP4 blocks and scales): one error naming the model type, the
    method and what qolora reads instead."""
    hub = tmp_path / "gpt-oss-mxfp4"
    shutil.copytree(tiny["gpt_oss"], hub)
    config = json.loads((hub / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (hub / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"\(gpt_oss\) is stored quantized with 'mxfp4'; qolora reads full-precision "
                                          r".*bitsandbytes 4/8-bit.*Mxfp4Config\(dequantize=True\)"):
        qolora.prepare(hub, bits=4, rank=4, progress=False)


def test_unmapped_names_are_refused_before_any_weight_is_read(tiny, tmp_path, no_weight_reads):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny["mixtral"], broken)
    state = load_file(str(broken / "model.safetensors"))
    state["model.layers.1.block_sparse_moe.experts.2.w9.weight"] = state.pop(
        "model.layers.1.block_sparse_moe.experts.2.w3.weight")
    state["model.layers.0.self_attn.qq_proj.weight"] = state.pop("model.layers.0.self_attn.q_proj.weight")
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError) as info:
        qolora.prepare(broken, bits=4, rank=4, progress=False)
    message = str(info.value)
    for named in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.experts.2.gate_up_proj.weight",
                  "model.layers.0.self_attn.qq_proj.weight", "experts.2.w9.weight", "mixtral"):
        assert named in message


def test_an_expert_of_the_wrong_shape_is_refused_before_reading(tiny, tmp_path, no_weight_reads):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny["qwen2_moe"], broken)
    state = load_file(str(broken / "model.safetensors"))
    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    state[key] = state[key][:, :32].contiguous()
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"experts\.3\.up_proj\.weight.*\(24, 32\).*\(rows, 64\)"):
        qolora.prepare(broken, bits=4, rank=4, progress=False)


# ------------------------------------------------------------------------------------ prepare
@pytest.mark.parametrize("arch", MOE)
def test_experts_are_quantized_and_adapted_with_less_error_than_plain_4bit(tiny, arch):
    model = qolora.prepare(tiny[arch], bits=4, rank=4, compare_plain=True, progress=False)
    layers = dict(adapter_layers(model))
    experts = [n for n in layers if ".experts." in n]
    assert len(experts) == (8 if arch in DENSE_FIRST else 16)
    for name in experts:
        assert type(layers[name].base_layer).__name__ == "Linear4bit"
        assert layers[name].init_factors is not None  # OLoRA: this expert's own QR, subtracted
    report = model.qolora.report
    assert report.total_error < report.total_plain_error
    rows = {r.name: r for r in report.layers}
    assert all(rows[n].error < rows[n].plain_error for n in experts)
    routers = [n for n, m in model.named_modules() if is_router(m)]
    for name in routers:  # Qwen2-MoE's shared_expert_gate, Phi-MoE's router (an nn.Linear): 16-bit, not adapted
        assert type(model.get_submodule(name)).__module__.startswith(("torch.", "transformers."))
        assert model.get_submodule(name).weight.dtype == torch.float32


def test_the_default_targets_leave_routers_out_and_the_rank_error_names_the_layer(tiny):
    base = BaseCheckpoint.open(tiny["qwen2_moe"])
    layers = linear_layers(base.skeleton())
    assert not any(n.endswith("shared_expert_gate") for n in select_targets(layers, None))
    model = qolora.prepare(tiny["qwen2_moe"], bits=4, rank=16, progress=False)  # was refused: a 1x64 router
    assert model.qolora.config.rank == 16
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.shared_expert_gate \(1x64\).*<= 1.*"
                                          r"--target-modules q_proj"):
        qolora.prepare(tiny["qwen2_moe"], bits=4, rank=4, target_modules=["shared_expert_gate", "q_proj"],
                       progress=False)


def test_gpt_neox_reads_its_embed_out_as_the_head(tiny):
    from safetensors.torch import load_file

    model = qolora.prepare(tiny["gpt_neox"], bits=4, rank=4, progress=False)
    stored = load_file(str(tiny["gpt_neox"] / "model.safetensors"))["embed_out.weight"]
    assert torch.equal(model.get_output_embeddings().weight, stored)


# ----------------------------------------------------------------- train, save, reload, merge, export
def train_steps(model, steps: int = 4, lr: float = 1e-2) -> list[float]:
    """A few AdamW steps on one fixed batch; the losses before each step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    tokens, losses = ids(1, 4, 16), []
    model.train()
    for _ in range(steps):
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """Per architecture: a 4-bit model trained a few steps, its losses and its saved adapter."""
    root = tmp_path_factory.mktemp("trained")

    def make(arch):
        model = qolora.prepare(tiny[arch], bits=4, rank=4, progress=False)
        losses = train_steps(model)
        return model, losses, qolora.save_adapter(model, root / arch)

    return _Lazy(make)


@pytest.mark.parametrize("arch", ALL)
def test_training_lowers_the_loss_and_moves_the_experts(trained, arch):
    model, losses, _ = trained[arch]
    assert losses[-1] < losses[0]
    if arch not in MOE:
        return
    layers = dict(adapter_layers(model))
    moved = [n for n, layer in layers.items() if ".experts." in n
             and not torch.equal(layer.lora_B.weight.detach().cpu(), layer.init_factors[1])]
    assert moved  # the routed experts train too


@pytest.mark.parametrize("arch", ALL)
def test_save_and_reload_is_exact(tiny, trained, arch):
    model, _, adapter = trained[arch]
    reloaded = qolora.load(tiny[arch], adapter, progress=False)
    record = json.loads((adapter / "qolora_config.json").read_text())
    slots = [r["expert"] for r in record["layers"].values() if "expert" in r]
    assert {s["count"] for s in slots} == ({4} if arch in MOE else set())
    tokens = ids(2)
    assert torch.equal(logits(model, tokens), logits(reloaded, tokens))


@pytest.mark.parametrize("arch", ALL)
def test_the_merged_folder_loads_in_transformers_as_the_trained_model(tiny, trained, arch, tmp_path):
    from safetensors import safe_open

    _, _, adapter = trained[arch]
    tokens = ids(3, 1, 12)[0].tolist()
    result = qolora.merge(tiny[arch], adapter, tmp_path / "merged", dtype="fp32", prompts=[tokens], progress=False)
    check = result["logit_check"]
    assert check["max_abs_diff"] < 1e-4 * check["max_abs_logit"]
    with safe_open(str(tiny[arch] / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == stored  # written back in the checkpoint's own (per-expert) layout


@pytest.mark.parametrize("arch", ALL)
def test_the_peft_export_loads_in_peft_as_the_trained_model(tiny, arch, tmp_path):
    """At 16 bits the export is exact: PEFT's target_parameters adapters on the fused experts compute what
    qolora's per-expert adapters computed."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = qolora.prepare(tiny[arch], bits=16, rank=4, progress=False)
    train_steps(model, steps=2)
    qolora.export_lora(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    if arch in MOE:
        assert {"experts.gate_up_proj", "experts.down_proj"} <= set(config["target_parameters"])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny[arch]), tmp_path / "peft").eval()
    tokens = ids(4)
    torch.testing.assert_close(logits(peft_model, tokens), logits(model, tokens), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("options", [dict(bits=8), dict(bits=4, init="pissa"), dict(bits=4, init="lora"),
                                     dict(bits=4, refine=1, gradient_checkpointing=True)])
def test_experts_take_every_init_and_bit_width(tiny, options):
    model = qolora.prepare(tiny["qwen3_moe"], rank=4, compare_plain=True, progress=False, **options)
    report = model.qolora.report
    experts = [r for r in report.layers if ".experts." in r.name]
    assert len(experts) == 16
    if options.get("init") != "lora":  # LoRA leaves the base as it is: plain quantization's error
        assert report.total_error < report.total_plain_error
    losses = train_steps(model, steps=3)
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------------------------- plan
def test_plan_gives_the_moe_configs_on_24_gib():
    from qolora.planning.plan import plan

    mixtral = plan("mixtral-8x7b", gpu_memory="24GiB", offload="auto")
    qwen = plan("qwen3-30b-a3b", gpu_memory="24GiB")
    assert mixtral.fits and qwen.fits
    for p, total, active in ((mixtral, 46.70e9, 12.88e9), (qwen, 30.53e9, 3.35e9)):
        moe = p.details["moe"]
        assert moe["total_params"] == pytest.approx(total, rel=1e-3)
        assert moe["active_params"] == pytest.approx(active, rel=1e-3)
        assert "per token" in p.format_table()
    assert qwen.details["moe"]["num_experts"] == 128 and qwen.n_adapted_layers == 48 * (4 + 2 * 128)


def test_plan_counts_each_expert_and_keeps_routers_in_16_bits(tiny):
    """The plan's weights and adapters are the prepared model's bytes: every expert quantized, the router not."""
    from benchmarks.memtrack import model_bytes
    from qolora.planning.plan import plan

    for arch in MOE:
        p = plan(str(tiny[arch]), rank=4, device="cpu", compute_dtype="fp32")
        model = qolora.prepare(tiny[arch], bits=4, rank=4, progress=False)
        assert p.weights_bytes + p.adapter_bytes == pytest.approx(model_bytes(model), rel=1e-3)
        assert p.n_adapted_layers == len(dict(adapter_layers(model)))
    with pytest.raises(ConfigError, match=r"shared_expert_gate \(1x64\).*--target-modules"):
        plan(str(tiny["qwen2_moe"]), rank=4, target_modules=["shared_expert_gate", "q_proj"])


def test_a_synthetic_moe_checkpoint_streams_and_writes_in_transformers_layout(tmp_path):
    """SyntheticCheckpoint names an MoE model as transformers does (fused experts): prepare streams it one
    expert slice at a time with no disk, and the written folder loads in plain transformers to the same logits."""
    from transformers import AutoModelForCausalLM

    from qolora.base.synthetic import SyntheticCheckpoint

    synthetic = SyntheticCheckpoint(tiny_config("qwen3_moe"), dtype=torch.float32)
    assert ("model.layers.0.mlp.experts.gate_up_proj", (4, 48, 64), torch.float32) in synthetic.tensors
    streamed = qolora.prepare(BaseCheckpoint.from_source(synthetic, name="tiny-moe"), bits=16, rank=4, progress=False)
    folder = synthetic.write(tmp_path / "synthetic")
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.testing.assert_close(logits(streamed, ids()), logits(reference, ids()), atol=2e-5, rtol=1e-4)

"""GGUF export (qolora.export.gguf) and ``qolora export`` (qolora.cli.export), checked by real readers.

Tiny random models with the tiny byte-level BPE ChatML tokenizer, on the CPU. The reader is
transformers' own GGUF loader (``from_pretrained(folder, gguf_file=...)``): it rebuilds the config,
the tokenizer and the weights from the file (undoing llama.cpp's Q/K permutation), so a wrong tensor
name, shape, permutation, type or tokenizer key shows up as wrong logits or tokens. llama.cpp itself
is exercised by the slow test at the end (skipped without ``llama_cpp``).
"""

import argparse
import json
import os
import sys

import numpy as np
import pytest
import torch

import qolora
from qolora.cli import commands as cli
from qolora.cli.export import add_export_command
from qolora.errors import ConfigError
from qolora.export.gguf import (
    GGUF_TYPES,
    MODELFILE,
    UNAVAILABLE_TYPES,
    _pre_tokenizer_name,
    export_gguf,
    export_gguf_lora,
    ollama_modelfile,
)
from qolora.export.merge import merge
from qolora.model.adapter_folder import save_adapter
from tiny_tokenizer import CHAT_TEMPLATE, make_tiny_tokenizer

gguf = pytest.importorskip("gguf")
VOCAB = 384  # the tiny tokenizer's


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tokens(seed=7, length=24):
    return torch.randint(4, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def logits_of(model, x=None):
    with torch.no_grad():
        return model(tokens() if x is None else x).logits.float()


def from_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def from_folder(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def relative(got, ref):
    return float((got - ref).abs().max() / ref.abs().max())


def make_tiny(path, model_type, *, tie=True, vocab=VOCAB, **extra):
    """A 2-layer random ``model_type`` checkpoint (hidden 64, 4 heads / 2 KV heads) with the tiny tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=3, pad_token_id=0, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08) if p.dim() == 2 else p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    make_tiny_tokenizer(path)
    return path


def train(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for i in range(steps):
        x = tokens(seed=i, length=16)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def trained(chat_model_dir, tmp_path_factory):
    """A 4-bit OLoRA adapter on the tiny chat Llama, trained 3 steps; its fp32 merge and that merge's logits."""
    root = tmp_path_factory.mktemp("gguf")
    model = train(qolora.prepare(chat_model_dir, bits=4, rank=8, alpha=16, device="cpu", progress=False))
    adapter = save_adapter(model, root / "adapter")
    merge(chat_model_dir, adapter, root / "merged", dtype="fp32", progress=False)
    return adapter, logits_of(from_folder(root / "merged"))


# ------------------------------------------------------------------------------- read back
@pytest.mark.parametrize("type, bound", [("f32", 1e-5), ("f16", 1e-2), ("q8_0", 5e-2)])
def test_transformers_loads_the_export_and_matches_the_merged_model(trained, chat_model_dir, tmp_path, type, bound):
    adapter, ref = trained
    out = tmp_path / "model.gguf"
    result = export_gguf(adapter, out, base=chat_model_dir, type=type, progress=False)
    assert result["architecture"] == "llama" and result["tensors"] == 2 * 9 + 2  # tied: no output.weight
    assert relative(logits_of(from_gguf(out)), ref) <= bound


def test_every_listed_type_loads_and_gets_its_tensor_type(trained, chat_model_dir, tmp_path):
    adapter, ref = trained
    for type in GGUF_TYPES:
        out = tmp_path / type / "model.gguf"
        export_gguf(adapter, out, base=chat_model_dir, type=type, modelfile=False, progress=False)
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
        assert types["blk.0.attn_q.weight"] == GGUF_TYPES[type][0]
        assert types["blk.0.attn_norm.weight"] == "F32"  # norms stay F32, as llama.cpp's converter writes them
        assert relative(logits_of(from_gguf(out)), ref) < 0.6  # loads and computes (4-bit: coarse on this model)


def test_the_tokenizer_and_chat_template_survive(trained, chat_model_dir, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "model.gguf"
    export_gguf(trained[0], out, base=chat_model_dir, type="f16", progress=False)
    ours = AutoTokenizer.from_pretrained(chat_model_dir)
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    text = "Hello world, how are you? 123 4567 <|im_start|>user\nhi there<|im_end|>\n"
    assert theirs(text).input_ids == ours(text).input_ids
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert theirs.apply_chat_template(messages, tokenize=False) == ours.apply_chat_template(messages, tokenize=False)
    fields = gguf.GGUFReader(out).fields
    value = lambda key: fields[key].contents()  # noqa: E731
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    assert value("tokenizer.ggml.eos_token_id") == ours.eos_token_id
    assert value("tokenizer.ggml.add_bos_token") is False  # this tokenizer adds no BOS
    assert value("tokenizer.chat_template") == CHAT_TEMPLATE
    assert value("qolora.into") == "trained"


QWEN2_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": None}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}


def _qwen2_pre_tokenizer(folder):
    """Give the tiny tokenizer Qwen2's pre-tokenizer (as in Qwen2's own tokenizer.json)."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    data = json.loads((folder / "tokenizer.json").read_text())
    data["pre_tokenizer"] = json.loads(json.dumps(QWEN2_PRE))
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = PRETOKENIZE_REGEX
    (folder / "tokenizer.json").write_text(json.dumps(data))


@pytest.mark.parametrize("model_type, tie, extra", [
    ("mistral", False, {}),
    ("qwen2", True, {"vocab": 392}),  # Qwen2Tokenizer adds <|endoftext|> (385 ids); 386-391 unused
    ("qwen3", False, {}),  # head_dim 128: transformers' GGUF reader takes Qwen3's default
], ids=["mistral-untied", "qwen2-bias-qwen2pre", "qwen3-qknorm"])
def test_the_llama_family(tmp_path, model_type, tie, extra):
    from transformers import AutoTokenizer

    base = make_tiny(tmp_path / "base", model_type, tie=tie, **extra)
    if model_type == "qwen2":
        _qwen2_pre_tokenizer(base)
    adapter = save_adapter(qolora.prepare(base, bits=4, rank=4, device="cpu", progress=False), tmp_path / "adapter")
    merge(base, adapter, tmp_path / "merged", dtype="fp32", progress=False)
    out = tmp_path / "model.gguf"
    result = export_gguf(adapter, out, base=base, type="f32", progress=False)
    assert result["architecture"] == {"mistral": "llama"}.get(model_type, model_type)
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert ("output.weight" in names) != tie
    assert relative(logits_of(from_gguf(out)), logits_of(from_folder(tmp_path / "merged"))) < 1e-5
    if model_type == "qwen2":
        assert "blk.0.attn_q.bias" in names
        text = "Numbers 12345 and words: isn't it?\n\n  done"
        assert AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)(text).input_ids == \
            AutoTokenizer.from_pretrained(base)(text).input_ids
    if model_type == "qwen3":
        assert "blk.0.attn_q_norm.weight" in names


def test_llama3_rope_gets_llama_cpps_frequency_factors(tmp_path):
    """rope_type llama3 is written as rope_freqs.weight; its factors are transformers' own scaling."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    base = make_tiny(tmp_path / "base", "llama", rope_parameters=rope)
    adapter = save_adapter(qolora.prepare(base, bits=16, rank=4, device="cpu", progress=False), tmp_path / "adapter")
    out = tmp_path / "model.gguf"
    export_gguf(adapter, out, base=base, type="f16", modelfile=False, progress=False)
    factors = {t.name: np.array(t.data) for t in gguf.GGUFReader(out).tensors}["rope_freqs.weight"]
    config = LlamaConfig.from_pretrained(base)
    scaled = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0]
    plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    np.testing.assert_allclose(factors, (plain / scaled).numpy(), rtol=1e-5)


def test_lora_gguf_applied_as_llama_cpp_applies_it_is_the_merge_into_the_original(trained, chat_model_dir, tmp_path):
    """W + alpha/rank * B@A over the file's factors (Q/K rows permuted back as transformers' reader
    does) equals merge(into="original"): names, shapes, permutation and alpha are llama.cpp's."""
    from safetensors.torch import load_file

    out = tmp_path / "lora.gguf"
    result = export_gguf_lora(trained[0], out, base=chat_model_dir, type="f32")
    reader = gguf.GGUFReader(out)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    alpha = fields["adapter.lora.alpha"]
    factors = {t.name: torch.tensor(np.array(t.data)) for t in reader.tensors}
    assert len(factors) == result["tensors"] == 2 * 14
    merge(chat_model_dir, trained[0], tmp_path / "original", dtype="fp32", into="original", progress=False)
    merged = load_file(tmp_path / "original" / "model.safetensors")
    base = load_file(chat_model_dir / "model.safetensors")
    unpermute = {"attn_q": 4, "attn_k": 2}  # heads, KV heads: transformers' LlamaTensorProcessor inverse
    for layer in range(2):
        for gguf_name, hf_name in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                                   ("ffn_down", "mlp.down_proj")):
            a = factors[f"blk.{layer}.{gguf_name}.weight.lora_a"]
            b = factors[f"blk.{layer}.{gguf_name}.weight.lora_b"]
            assert a.shape[0] == b.shape[1] == result["rank"] == 16
            delta = alpha / a.shape[0] * b @ a
            if gguf_name in unpermute:
                n = unpermute[gguf_name]
                delta = delta.reshape(n, delta.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(delta.shape)
            key = f"model.layers.{layer}.{hf_name}.weight"
            torch.testing.assert_close(base[key] + delta, merged[key], atol=1e-5, rtol=1e-4)


# -------------------------------------------------------------------------- refused early
def test_unavailable_types_are_refused_saying_why(trained, chat_model_dir, tmp_path, no_weight_reads):
    with pytest.raises(ConfigError, match="llama-quantize"):
        export_gguf(trained[0], tmp_path / "m.gguf", base=chat_model_dir, type="q4_k_m")
    with pytest.raises(ConfigError, match="allowed: \\['f32', 'f16'"):
        export_gguf(trained[0], tmp_path / "m.gguf", base=chat_model_dir, type="int4")
    assert not list(tmp_path.iterdir())


def test_the_listed_types_are_exactly_what_gguf_can_write():
    """GGUF_TYPES round-trip through gguf.quants; the K-quants are refused because gguf cannot write them."""
    x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    for type, (qtype, _) in GGUF_TYPES.items():
        q = gguf.GGMLQuantizationType[qtype]
        back = gguf.quants.dequantize(gguf.quants.quantize(x, q), q)
        assert np.abs(back - x).max() < 0.5, type
    for type in ("q4_k_m", "q6_k", "iq4_xs"):
        assert type in UNAVAILABLE_TYPES
        name = type.upper().removesuffix("_M").removesuffix("_S")
        with pytest.raises(NotImplementedError):
            gguf.quants.quantize(x, gguf.GGMLQuantizationType[name])


def test_other_architectures_are_refused_by_name_before_any_weight(tiny_gpt2_dir, tmp_path, monkeypatch):
    adapter = save_adapter(qolora.prepare(tiny_gpt2_dir, bits=16, rank=4, device="cpu", progress=False),
                           tmp_path / "adapter")
    from qolora.base.reader import BaseCheckpoint

    monkeypatch.setattr(BaseCheckpoint, "tensors", lambda *a, **k: pytest.fail("a weight was read"))
    with pytest.raises(ConfigError, match="does not support architecture 'gpt2'.*supported: \\['llama'"):
        export_gguf(adapter, tmp_path / "m.gguf", base=tiny_gpt2_dir)


@pytest.mark.parametrize("case, message", [
    ("no tokenizer.json", "needs the base's tokenizer.json"),
    ("unknown pre-tokenizer", "pre-tokenizer .* is none that llama.cpp implements"),
])
def test_bad_tokenizers_give_one_clear_error_before_any_weight(trained, chat_model_dir, tmp_path, no_weight_reads,
                                                               case, message):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(chat_model_dir, base)
    if case == "no tokenizer.json":
        (base / "tokenizer.json").unlink()
    else:
        data = json.loads((base / "tokenizer.json").read_text())
        data["pre_tokenizer"] = {"type": "Whitespace"}
        (base / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message):
        export_gguf(trained[0], tmp_path / "out" / "m.gguf", base=base)
    assert not (tmp_path / "out").exists()


def test_a_recorded_base_that_is_gone_is_named(chat_model_dir, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(chat_model_dir, base)
    adapter = save_adapter(qolora.prepare(base, bits=16, rank=4, device="cpu", progress=False), tmp_path / "adapter")
    shutil.rmtree(base)
    with pytest.raises(ConfigError, match="the base recorded in adapter .* is gone; pass the base"):
        export_gguf(adapter, tmp_path / "m.gguf")
    assert run_cli(["export", str(adapter), str(tmp_path / "merged"), "--format", "merged"]) == cli.EXIT_ERROR


def test_pre_tokenizer_names():
    """Recognised from tokenizer.json; the split regexes are the ones transformers' GGUF reader maps
    llama.cpp's names back to."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert _pre_tokenizer_name(byte_level) == "gpt-2"
    assert _pre_tokenizer_name({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level]}) == "smollm"
    for name in ("qwen2", "llama-bpe"):
        split = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": GGUF_PRE_TOKENIZER_SPLITS[name]}, "behavior": "Isolated",
             "invert": False}, {**byte_level, "use_regex": False}]}
        assert _pre_tokenizer_name(split) == name
    assert _pre_tokenizer_name({**byte_level, "add_prefix_space": True}) is None
    assert _pre_tokenizer_name({"type": "Metaspace"}) is None


# --------------------------------------------------------------------------- output safety
def test_outputs_are_never_replaced_without_overwrite_nor_when_not_qolora_s(trained, chat_model_dir, tmp_path,
                                                                            no_weight_reads):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"GGUF someone else's model")
    with pytest.raises(ConfigError, match="already exists; pass overwrite"):
        export_gguf(trained[0], out, base=chat_model_dir)
    with pytest.raises(ConfigError, match="qolora did not write it"):
        export_gguf(trained[0], out, base=chat_model_dir, overwrite=True)
    out.unlink()
    (tmp_path / MODELFILE).write_text("FROM llama3\n")
    with pytest.raises(ConfigError, match="Modelfile' exists and qolora did not write it"):
        export_gguf(trained[0], out, base=chat_model_dir, overwrite=True)
    with pytest.raises(ConfigError, match="ending in .gguf"):
        export_gguf(trained[0], tmp_path / "model.bin", base=chat_model_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MODELFILE]


def test_overwrite_replaces_its_own_export_and_an_interrupted_one_leaves_the_old(trained, chat_model_dir, tmp_path,
                                                                                monkeypatch):
    import qolora.export.gguf as g

    out = tmp_path / "model.gguf"
    export_gguf(trained[0], out, base=chat_model_dir, type="f16", progress=False)
    before = out.read_bytes()
    calls = []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = g._write_tensor
    monkeypatch.setattr(g, "_write_tensor", dies)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(trained[0], out, base=chat_model_dir, type="q8_0", overwrite=True, progress=False)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [MODELFILE, "model.gguf"]  # no temporaries left
    monkeypatch.setattr(g, "_write_tensor", real)
    export_gguf(trained[0], out, base=chat_model_dir, type="q8_0", overwrite=True, progress=False)
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0


# ---------------------------------------------------------------------------------- Modelfile
SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_modelfile_translates_chatml_with_its_default_system_prompt(caplog):
    tok = make_tiny_tokenizer()
    text, translated = ollama_modelfile("model.gguf", tok)
    assert translated and "FROM ./model.gguf\n" in text and "SYSTEM" not in text
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text
    tok.chat_template = SMOL_TEMPLATE
    text, translated = ollama_modelfile("model.gguf", tok)
    assert translated and 'SYSTEM """You are a helpful AI assistant"""' in text
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    text, translated = ollama_modelfile("model.gguf", tok)
    assert not translated and "TEMPLATE" not in text.replace("no TEMPLATE", "")
    assert "not ChatML" in caplog.text


# ------------------------------------------------------------------------------------- CLI
def run_cli(argv):
    """``qolora ARGV`` with ``export`` registered as cli.py registers it (if it does not already)."""
    build = cli.build_parser

    def with_export():
        parser = build()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "export" not in sub.choices:
            add_export_command(sub)
        return parser

    cli.build_parser = with_export
    try:
        return cli.main(argv)
    finally:
        cli.build_parser = build


def test_cli_exports_gguf_with_the_recorded_base_merged_and_peft(trained, chat_model_dir, tmp_path, capsys):
    adapter = str(trained[0])
    assert run_cli(["export", adapter, str(tmp_path / "g" / "model.gguf"), "--format", "gguf", "--type", "q8_0",
                    "--no-progress"]) == 0
    assert (tmp_path / "g" / MODELFILE).read_text().startswith("# Ollama Modelfile written by qolora")
    assert run_cli(["export", adapter, str(tmp_path / "m"), "--format", "merged", "--type", "fp32", "--base",
                    str(chat_model_dir), "--no-progress"]) == 0
    assert relative(logits_of(from_folder(tmp_path / "m")), trained[1]) < 1e-6
    assert run_cli(["export", adapter, str(tmp_path / "p"), "--format", "peft"]) == 0
    assert (tmp_path / "p" / "adapter_model.safetensors").is_file()
    assert run_cli(["export", adapter, str(tmp_path / "lora.gguf"), "--format", "gguf-lora", "--type", "q8_0"]) == 0
    assert gguf.GGUFReader(tmp_path / "lora.gguf").fields["adapter.type"].contents() == "lora"
    out = capsys.readouterr().out
    assert "ollama create NAME -f" in out and "merged 14 adapted layers" in out


@pytest.mark.parametrize("argv, message", [
    (["--format", "gguf", "--type", "q4_k_m"], "--type GGUF type 'q4_k_m' is not available: .*llama-quantize"),
    (["--format", "merged", "--type", "q8_0"], "not a type of a merged checkpoint"),
    (["--format", "peft", "--type", "f16"], "--type do\\(es\\) not apply to --format peft"),
    (["--format", "gguf-lora", "--type", "q4_0"], "not a type of a LoRA GGUF"),
])
def test_cli_refuses_bad_options_in_one_line_with_exit_code_2(trained, tmp_path, capsys, no_weight_reads, argv,
                                                              message):
    import re

    assert run_cli(["export", str(trained[0]), str(tmp_path / "out.gguf"), *argv]) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not list(tmp_path.iterdir())


def test_cli_help_names_the_types_it_cannot_write(capsys):
    with pytest.raises(SystemExit):
        run_cli(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "q4_k_m" in text and "llama-quantize" in text and "tq1_0" in text and "q5_1" in text


# ----------------------------------------------------------------------------------- memory
_MEMORY_CHILD = r"""
import json, sys, threading, time
import torch
torch.set_num_threads(1)
from qolora.export.gguf import export_gguf
adapter, base, out, warm = sys.stdin.readline().rstrip("\n").split("\t")
export_gguf(adapter, warm, base=base, type="q8_0", progress=False)  # every import and lazy init, on the same model
def anon():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))
start = anon(); peak = [start]; stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], anon()); time.sleep(0.002)
thread = threading.Thread(target=sample, daemon=True); thread.start()
export_gguf(adapter, out, base=base, type="q8_0", progress=False)
stop.set(); thread.join()
print(json.dumps({"growth": max(peak[0], anon()) - start}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="measures RssAnon from /proc (Linux)")
def test_export_streams_with_memory_well_below_the_model_size(tmp_path):
    """A 12-layer, 38 MB fp32 model: the export's resident growth stays a fraction of it (one tensor,
    one slice, the tokenizer), where holding the model would need all of it."""
    import subprocess

    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=12,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    base = tmp_path / "base"
    config.save_pretrained(base)
    make_tiny_tokenizer(base)
    with init_empty_weights():
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
    gen = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=gen) * 0.05 for k, s in shapes.items()}
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    size = sum(t.numel() * 4 for t in tensors.values())
    adapter = save_adapter(qolora.prepare(base, bits=4, rank=8, device="cpu", progress=False), tmp_path / "adapter")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(os.path.dirname(os.path.dirname(qolora.__file__))),
                                          os.environ.get("PYTHONPATH", "")])}
    args = "\t".join([str(adapter), str(base), str(tmp_path / "out.gguf"), str(tmp_path / "warm" / "warm.gguf")])
    proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD], input=args + "\n", capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = json.loads(proc.stdout.strip().splitlines()[-1])["growth"]
    print(f"GGUF export of a {size / 1e6:.0f} MB fp32 model: peak RssAnon growth {growth / 1e6:.1f} MB")
    assert growth < 0.25 * size


# ---------------------------------------------------------------------------------- llama.cpp
HELD_OUT = ("The history of the bicycle begins in the early nineteenth century. The first machines had no pedals:"
            " riders pushed themselves along with their feet. Later designs added cranks to the front wheel, "
            "which grew larger and larger to go faster, until the safety bicycle, with two wheels of equal size "
            "and a chain driving the rear one, replaced them. Today bicycles are used for commuting, sport and "
            "travel all over the world, and many cities build separate lanes for them. Water boils at 100 degrees"
            " Celsius at sea level. The Moon orbits the Earth about once a month, and the Earth orbits the Sun "
            "once a year.")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The real SmolLM2-135M-Instruct with a 4-bit OLoRA adapter trained 3 steps, and llama.cpp."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp's Python binding (pip install llama-cpp-python)")
    from transformers import AutoTokenizer

    from qolora.data.assets import default_model_dir

    root = tmp_path_factory.mktemp("smollm2")
    base = default_model_dir()
    tok = AutoTokenizer.from_pretrained(base)
    model = qolora.prepare(base, bits=4, rank=8, device="cpu", progress=False)
    text = tok(["The capital of France is Paris. The capital of Italy is Rome."], return_tensors="pt")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(3):
        model(**text, labels=text["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    adapter = save_adapter(model.eval(), root / "adapter")
    return llama_cpp, base, tok, adapter, root


def llama_logits(llama_cpp, path, ids, lora=None):
    llm = llama_cpp.Llama(str(path), n_ctx=512, logits_all=True, n_threads=1, verbose=False, seed=0,
                          **({"lora_path": str(lora)} if lora else {}))
    try:
        assert llm.tokenize(HELD_OUT.encode(), add_bos=False, special=True) == ids  # llama.cpp tokenizes alike
        llm.eval(ids)
        return torch.tensor(np.array(llm.scores[:len(ids)]), dtype=torch.float32), llm
    except BaseException:
        llm.close()
        raise


def perplexity(logits, ids):
    return float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).exp())


@pytest.mark.slow
def test_llama_cpp_answers_like_the_merged_model_on_the_real_smollm2(smollm2):
    """llama.cpp (llama-cpp-python) on the f16 and q8_0 exports: the merged model's tokens, logits
    within the type's error, its perplexity on held-out text, and its greedy chat answer."""
    llama_cpp, base, tok, adapter, root = smollm2
    merge(base, adapter, root / "merged", dtype="fp32", progress=False)
    merged = from_folder(root / "merged")
    ids = tok(HELD_OUT).input_ids
    with torch.no_grad():
        ref = merged(torch.tensor([ids])).logits[0].float()
    prompt = tok(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, tokenize=False)).input_ids
    with torch.no_grad():
        ref_answer = merged.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):]
    for type, (logit_bound, ppl_bound) in {"f16": (0.01, 0.005), "q8_0": (0.08, 0.02)}.items():
        out = root / type / "model.gguf"
        export_gguf(adapter, out, base=base, type=type, progress=False)
        got, llm = llama_logits(llama_cpp, out, ids)
        try:
            ppl, ref_ppl = perplexity(got, ids), perplexity(ref, ids)
            print(f"llama.cpp {type}: max |logit diff| {relative(got, ref):.2%} of max |logit|, perplexity "
                  f"{ppl:.3f} vs merged {ref_ppl:.3f} ({ppl / ref_ppl - 1:+.2%}) on {len(ids)} tokens")
            assert relative(got, ref) < logit_bound and abs(ppl / ref_ppl - 1) < ppl_bound
            answer = []
            for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
                if token == llm.token_eos() or len(answer) == len(ref_answer):
                    break
                answer.append(token)
            assert answer == ref_answer.tolist(), (tok.decode(answer), tok.decode(ref_answer))
        finally:
            llm.close()


@pytest.mark.slow
def test_llama_cpp_applies_the_lora_gguf_as_the_merge_into_the_original(smollm2):
    """The base as GGUF (an untrained plain LoRA merged: exactly W) plus the exported --lora file gives
    what the f32 GGUF of merge(into="original") gives, in llama.cpp; the base alone does not."""
    llama_cpp, base, tok, adapter, root = smollm2
    zero = save_adapter(qolora.prepare(base, bits=16, rank=4, init="lora", device="cpu", progress=False),
                        root / "zero")  # B = 0: the merge is the base itself
    export_gguf(zero, root / "base.gguf", base=base, type="f32", into="original", modelfile=False, progress=False)
    export_gguf(adapter, root / "original.gguf", base=base, type="f32", into="original", modelfile=False,
                progress=False)
    export_gguf_lora(adapter, root / "lora.gguf", base=base, type="f32")
    ids = tok(HELD_OUT).input_ids
    results = {}
    for name, path, lora in (("original", "original.gguf", None), ("base", "base.gguf", None),
                             ("base+lora", "base.gguf", "lora.gguf")):
        logits, llm = llama_logits(llama_cpp, root / path, ids, lora and root / lora)
        llm.close()
        results[name] = logits
    with_lora, without = relative(results["base+lora"], results["original"]), relative(results["base"],
                                                                                       results["original"])
    print(f"llama.cpp base + LoRA GGUF vs merged-original GGUF: {with_lora:.3%} of max |logit| (base alone: "
          f"{without:.3%})")
    assert with_lora < 5e-3 and with_lora < 0.05 * without

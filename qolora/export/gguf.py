"""GGUF export: a trained adapter merged into its base, as one file for llama.cpp, Ollama, LM Studio.

:func:`export_gguf` computes the same merged weights as :func:`qolora.export.merge.merge` (by default
``into="trained"``: ``deq(q(W_res)) + s*B@A``, the function the quantized model was trained as) and
writes them, tensor by tensor, into a GGUF file with the ``gguf`` package (llama.cpp's own Python
writer), instead of into a safetensors checkpoint:

* **everything decided before a weight is read**: the architecture (the Llama family: ``llama``,
  ``mistral``, ``qwen2``, ``qwen3``; anything else is refused, named), the tokenizer (byte-level BPE,
  its pre-tokenizer recognised from ``tokenizer.json``), the RoPE kind, the tensor names (through
  ``gguf``'s own :class:`gguf.TensorNameMap`, never a table of ours), each tensor's GGML type, size
  and offset. The header, the metadata and the tensor index are written first;
* **then the stream**: each merged tensor is permuted where llama.cpp wants it (Llama's Q/K rows,
  as ``convert_hf_to_gguf.py``'s ``LlamaModel.permute``), converted or quantized with
  :func:`gguf.quants.quantize` a slice of rows at a time and written at its offset. The order the
  base checkpoint hands tensors out in does not matter, and nothing beyond the tensor being merged
  (and one slice of it) is held: the peak is one merged tensor plus the base reader's.

Types: ``--type`` ``f32``, ``f16``, ``bf16``, ``q8_0``, ``q5_1``, ``q5_0``, ``q4_1``, ``q4_0``: the ones
``gguf.quants`` can write in Python (:data:`GGUF_TYPES`; norms and other 1-D tensors stay F32, and a
tensor whose rows do not divide into the type's blocks falls back to F16, as in llama.cpp's own
converter). K-quants and i-quants cannot be written from Python (:data:`UNAVAILABLE_TYPES` says why);
quantize the ``f16``/``bf16`` export with llama.cpp's ``llama-quantize`` for those.

The file carries the tokenizer as llama.cpp's converter writes a GPT-2-style BPE one (tokens, token
types, merges, special token ids, whether BOS/EOS are added, the chat template: ``gguf.SpecialVocab``).
Beside it goes an Ollama ``Modelfile`` (``FROM ./NAME.gguf``, the chat template in Ollama's Go
template syntax where qolora recognises it: ChatML, with a default system prompt as SmolLM2 and
Qwen have; the stop tokens). Both are written to temporary siblings and renamed into place; an
existing file is replaced only with ``overwrite``, and only when qolora wrote it (its ``qolora.*``
metadata, the Modelfile's first line).

:func:`export_gguf_lora` writes the adapter instead as a llama.cpp LoRA GGUF (``--lora``, the format of
llama.cpp's ``convert_lora_to_gguf.py``): the plain LoRA of :func:`qolora.export.peft.export_lora`, for a
GGUF of the original base.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..base.reader import BaseCheckpoint, LinearWeight
from ..errors import ConfigError
from ..files import atomic_file, atomic_write_text, check_out_file
from ..model.adapter_folder import AdapterError, SavedAdapter, read_adapter
from ..model.load import FingerprintCheck, check_base_structure, resolve_device_config

__all__ = ["export_gguf", "export_gguf_lora", "gguf_type", "ollama_modelfile", "recorded_base", "GGUF_TYPES",
           "LORA_TYPES", "UNAVAILABLE_TYPES", "ARCHITECTURES", "MODELFILE"]

logger = logging.getLogger(__name__)

#: ``--type`` -> (GGML tensor type, llama.cpp file type): what ``gguf.quants`` writes in pure Python.
GGUF_TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}

_KQUANTS = "the gguf package reads these but has no Python quantizer for them: export f16 or bf16, then run " \
           "llama.cpp's llama-quantize (e.g. llama-quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M)"
#: Types llama.cpp knows that :func:`export_gguf` cannot write, and why.
UNAVAILABLE_TYPES = {
    **dict.fromkeys(("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
                     "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_s", "iq3_m",
                     "iq4_nl", "iq4_xs"), _KQUANTS),
    **dict.fromkeys(("tq1_0", "tq2_0"), "ternary types, for models trained ternary (BitNet); they would destroy "
                                        "ordinary weights"),
    "mxfp4": "llama.cpp's MXFP4 file type quantizes only mixture-of-experts weights trained in MXFP4 (gpt-oss)",
}

#: transformers ``model_type`` -> (llama.cpp architecture, whether Q/K rows are permuted for its RoPE).
ARCHITECTURES = {
    "llama": ("LLAMA", True),
    "mistral": ("LLAMA", True),  # llama.cpp's converter writes Mistral as "llama" too
    "qwen2": ("QWEN2", False),
    "qwen3": ("QWEN3", False),
}
INTO = ("trained", "original")
MODELFILE = "Modelfile"
#: First line of every Modelfile qolora writes; the GGUF carries the metadata key :data:`MARKER_KEY`.
MODELFILE_HEADER = "# Ollama Modelfile written by qolora"
MARKER_KEY = "qolora.version"
#: Rows quantized per write: bounds the working copies of a large tensor (the embedding).
_SLICE_ELEMENTS = 1 << 20

# Pre-tokenizer regexes as they appear in tokenizer.json, and llama.cpp's name for each (its
# llama-vocab.cpp keeps the same regexes under these names).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PRE = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def _gguf():
    try:
        import gguf
    except ImportError as exc:
        raise ConfigError("GGUF export needs the gguf package (llama.cpp's writer): pip install gguf") from exc
    return gguf


# ------------------------------------------------------------------------------------- checks
def gguf_type(type: str) -> str:
    """``type`` as a key of :data:`GGUF_TYPES` (case-insensitive).

    Raises:
        ConfigError: not a type :func:`export_gguf` writes, naming why when llama.cpp knows it.
    """
    key = str(type).lower()
    if key in GGUF_TYPES:
        return key
    why = UNAVAILABLE_TYPES.get(key)
    reason = f": {why}" if why else ""
    raise ConfigError(f"GGUF type {type!r} is not available{reason}; allowed: {list(GGUF_TYPES)}")


def _out_paths(out_file: str | os.PathLike, overwrite: bool, modelfile: bool) -> tuple[Path, Path | None]:
    """The .gguf path and the Modelfile path beside it; refuses what exists unless ``overwrite``."""
    path = Path(out_file).expanduser()
    if path.suffix.lower() != ".gguf":
        raise ConfigError(f"GGUF output {str(path)!r} must be a file name ending in .gguf, e.g. model.gguf")
    if path.is_dir():
        raise ConfigError(f"GGUF output {str(path)!r} is a folder; give a file path ending in .gguf")
    check_out_file(path, overwrite, "GGUF file", _written_by_qolora)
    beside = path.parent / MODELFILE if modelfile else None
    if beside is not None:
        check_out_file(beside, overwrite, "Modelfile", _written_by_qolora)
    return path, beside


def _written_by_qolora(path: Path) -> bool:
    """A GGUF whose metadata begins with qolora's key, or a Modelfile with qolora's first line."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    if path.suffix.lower() == ".gguf":  # qolora's keys come right after general.architecture
        return head[:4] == b"GGUF" and MARKER_KEY.encode() in head
    return head.startswith(MODELFILE_HEADER.encode())


def recorded_base(saved: SavedAdapter, adapter_dir) -> str:
    """The base recorded in an adapter (as the user named it in training).

    Raises:
        ConfigError: none is recorded, or it was a local path that is gone.
    """
    recorded = saved.base_name_or_path
    if not recorded:
        raise ConfigError(f"adapter {adapter_dir} records no base; pass base (--base)")
    looks_like_path = os.path.isabs(recorded) or recorded.startswith((".", "~")) or recorded.count("/") > 1
    if looks_like_path and not Path(recorded).expanduser().exists():
        raise ConfigError(f"the base recorded in adapter {adapter_dir}, {recorded!r}, is gone; pass the base "
                          "checkpoint it was trained on (base=, --base)")
    logger.info("base: %s (recorded in the adapter)", recorded)
    return recorded


def _architecture(hf_config) -> tuple[str, bool]:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ConfigError(f"GGUF export does not support architecture {model_type!r} "
                          f"({', '.join(getattr(hf_config, 'architectures', None) or [])}); supported: "
                          f"{list(ARCHITECTURES)} (use --format merged or peft for other models)")
    return ARCHITECTURES[model_type]


def _rope(hf_config) -> dict:
    """The RoPE parameters (transformers 5 ``rope_parameters`` or older ``rope_theta`` / ``rope_scaling``)."""
    rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(hf_config, "rope_theta", None))
    kind = rope.get("rope_type", rope.get("type")) or "default"
    if kind not in ("default", "linear", "yarn", "llama3"):
        raise ConfigError(f"RoPE type {kind!r} is not supported by the GGUF export; supported: default, linear, "
                          "yarn, llama3")
    return {**rope, "rope_type": kind}


# ------------------------------------------------------------------------------------ tokenizer
@dataclass
class _Vocab:
    tokens: list[str]
    toktypes: list[int]
    pre: str
    special: object  # gguf.SpecialVocab
    tokenizer: object  # the transformers tokenizer (for the Modelfile)


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a byte-level BPE pre-tokenizer of ``tokenizer.json``, or None."""
    if not isinstance(pre, dict):
        return None
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not steps or steps[-1].get("type") != "ByteLevel" or steps[-1].get("add_prefix_space"):
        return None
    byte_level, rest = steps[-1], steps[:-1]
    if byte_level.get("use_regex", True):
        if not rest:
            return "gpt-2"
        if rest == [{"type": "Digits", "individual_digits": True}]:
            return "smollm"
        return None
    if len(rest) == 1 and rest[0].get("type") == "Split" and rest[0].get("behavior") == "Isolated" \
            and not rest[0].get("invert"):
        return _SPLIT_PRE.get((rest[0].get("pattern") or {}).get("Regex"))
    return None


def _tokenizer_json(model_dir: Path) -> dict:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"GGUF export needs the base's tokenizer.json (a byte-level BPE tokenizer); {model_dir} has "
                          "none (SentencePiece-only tokenizers, as Llama 2's or Gemma's, are not supported)")
    data = json.loads(path.read_text(encoding="utf-8"))
    model, decoder = data.get("model") or {}, data.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise ConfigError(f"GGUF export supports byte-level BPE tokenizers (Llama 3, Qwen2/3, SmolLM2, GPT-2 style); "
                          f"{path} is a {model.get('type')} model with a {decoder.get('type')} decoder"
                          f"{' and byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}")
    return data


def _vocab(model_dir: Path, vocab_size: int) -> _Vocab:
    """Tokens, token types and special tokens as llama.cpp's converter writes a GPT-2 BPE vocabulary
    (``TextModel.get_vocab_base`` / ``_set_vocab_gpt2``)."""
    gguf = _gguf()
    from ..data.tokens import load_tokenizer

    pre = _pre_tokenizer_name(_tokenizer_json(model_dir).get("pre_tokenizer"))
    if pre is None:
        raise ConfigError(f"the pre-tokenizer in {model_dir / 'tokenizer.json'} is none that llama.cpp implements "
                          "(GPT-2 byte-level, SmolLM digits + byte-level, Llama 3 or Qwen2 split + byte-level)")
    tokenizer = load_tokenizer(model_dir)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ConfigError(f"the tokenizer of {model_dir} has ids up to {max(vocab.values())}, beyond the model's "
                          f"vocab_size {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, toktypes = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            toktypes.append(gguf.TokenType.UNUSED)
            continue
        kind = gguf.TokenType.NORMAL
        if token in added:
            if not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            looks_special = token.startswith("<|") and token.endswith("|>")
            kind = gguf.TokenType.CONTROL if decoder[i].special or looks_special else gguf.TokenType.USER_DEFINED
        tokens.append(token)
        toktypes.append(kind)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    special.add_special_token.update(_adds_bos_eos(tokenizer))
    return _Vocab(tokens, toktypes, pre, special, tokenizer)


def _adds_bos_eos(tokenizer) -> dict[str, bool]:
    """Whether encoding adds BOS / EOS, as the tokenizer actually does it (llama.cpp reads both flags)."""
    plain = tokenizer.encode("Hello world", add_special_tokens=False)
    full = tokenizer.encode("Hello world", add_special_tokens=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    extra = len(full) - len(plain)
    return {"bos": extra > 0 and bos is not None and full[0] == bos and full[1:1 + len(plain)] == plain,
            "eos": extra > 0 and eos is not None and full[-1] == eos}


# ------------------------------------------------------------------------------------- metadata
def _write_metadata(writer, hf_config, arch: str, rope: dict, type: str, name: str, vocab: _Vocab,
                    origin: dict) -> None:
    """qolora's keys (``origin``), then architecture, RoPE, file type and tokenizer keys, as
    ``convert_hf_to_gguf.py`` writes them."""
    gguf = _gguf()
    writer.add_string(MARKER_KEY, _version())
    for key, value in origin.items():
        writer.add_string(f"qolora.{key}", str(value))
    c = hf_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if arch == "LLAMA":
        writer.add_vocab_size(c.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    if rope["rope_type"] in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType[rope["rope_type"].upper()])
        writer.add_rope_scaling_factor(float(rope["factor"]))
        if rope["rope_type"] == "yarn":
            writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    writer.add_file_type(gguf.LlamaFileType[GGUF_TYPES[type][1]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.toktypes)
    vocab.special.add_to_gguf(writer, quiet=True)


def _llama3_rope_factors(hf_config, rope: dict) -> torch.Tensor:
    """``rope_freqs.weight`` for ``rope_type="llama3"`` (as ``LlamaModel.generate_extra_tensors``)."""
    base = rope.get("rope_theta", 10000.0)
    dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


# ------------------------------------------------------------------------------------ the plan
@dataclass
class _Entry:
    """One tensor of the file: where it goes and how it is converted."""

    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # PyTorch order, (out, in) for a weight
    qtype: object  # gguf.GGMLQuantizationType
    nbytes: int
    permute_heads: int | None = None  # Llama Q/K: the head count the rows are permuted with
    offset: int = 0  # from the start of the tensor data
    written: bool = False


def _entry_type(gguf_name: str, shape: tuple[int, ...], wanted):
    """The GGML type of one tensor: F32 for 1-D tensors and norms, F16 where the rows do not divide into
    the wanted type's blocks (both as llama.cpp's converter), else ``wanted``."""
    gguf = _gguf()
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith((".weight", ".lora_a",
                                                                                        ".lora_b")):
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block:
        logger.info("%s: rows of %d values do not divide into %s blocks of %d; written as F16", gguf_name, shape[-1],
                    wanted.name, block)
        return gguf.GGMLQuantizationType.F16
    return wanted


def _plan(skeleton, hf_config, arch: str, permute: bool, wanted, extra: dict[str, torch.Tensor]) -> dict[str, _Entry]:
    """Every tensor of the file by model name (``extra`` by GGUF name), with GGUF names from the
    ``gguf`` package's tensor name map; refuses names it cannot map, before any weight is read."""
    gguf = _gguf()
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch], hf_config.num_hidden_layers)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    heads = {"q_proj": hf_config.num_attention_heads,
             "k_proj": getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads}
    plan, unmapped = {}, []
    for name, tensor in skeleton.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp reads the output projection from token_embd when output.weight is absent
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            unmapped.append(name)
            continue
        shape = tuple(tensor.shape)
        module = name.rsplit(".", 2)[-2]
        plan[name] = _Entry(gguf_name, shape, _entry_type(gguf_name, shape, wanted), 0,
                            heads.get(module) if permute else None)
    if unmapped:
        raise ConfigError(f"{len(unmapped)} tensor(s) of this {hf_config.model_type} model have no GGUF name in the "
                          f"gguf package's tensor map, e.g. {unmapped[:3]}: not exportable")
    for gguf_name, tensor in extra.items():
        plan[gguf_name] = _Entry(gguf_name, tuple(tensor.shape), gguf.GGMLQuantizationType.F32, 0)
    for entry in plan.values():
        byte_shape = gguf.quant_shape_to_byte_shape(entry.shape, entry.qtype)
        entry.nbytes = math.prod(byte_shape[:-1]) * byte_shape[-1]
    return plan


# ------------------------------------------------------------------------------------ the file
def _write_header(path: Path, plan: dict[str, _Entry], arch: str, metadata) -> tuple[int, int]:
    """Header, metadata and tensor index through ``gguf.GGUFWriter``; sets each entry's offset as the
    writer assigns it (index order, each tensor padded to the alignment). Returns where the tensor
    data begins and where the file ends."""
    gguf = _gguf()
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch]])
    metadata(writer)
    offset = 0
    for entry in plan.values():
        writer.add_tensor_info(entry.name, entry.shape, np.dtype(np.float32), entry.nbytes, raw_dtype=entry.qtype)
        entry.offset = offset
        offset += gguf.GGUFWriter.ggml_pad(entry.nbytes, writer.data_alignment)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    data_start = gguf.GGUFWriter.ggml_pad(path.stat().st_size, writer.data_alignment)
    return data_start, data_start + offset


def _permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Q/K row order for its RoPE (``LlamaModel.permute``); weights and biases alike."""
    shape = weight.shape
    return weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _write_tensor(f, data_start: int, entry: _Entry, tensor: torch.Tensor, via: torch.dtype | None = None) -> None:
    """Convert ``tensor`` to the entry's type a slice of rows at a time and write it at its offset.

    ``via``: a dtype each slice is rounded through first (the training dtype of a tensor handed out
    as stored), so that a large stored tensor (the embedding) is never widened whole.
    """
    gguf = _gguf()
    if entry.written:
        raise AdapterError(f"the base checkpoint holds {entry.name} twice")
    if tuple(tensor.shape) != entry.shape:
        raise AdapterError(f"{entry.name}: the merged tensor is {tuple(tensor.shape)}, the model's {entry.shape}")
    x = tensor.detach()
    if entry.permute_heads:
        x = _permute_rows(x if via is None else x.to(via), entry.permute_heads)
        via = None
    rows = x.reshape(-1, x.shape[-1])
    step = max(1, _SLICE_ELEMENTS // rows.shape[1])
    f.seek(data_start + entry.offset)
    written = 0
    for i in range(0, rows.shape[0], step):
        part = rows[i:i + step] if via is None else rows[i:i + step].to(via)
        part = part.to("cpu", torch.float32).contiguous().numpy()
        data = gguf.quants.quantize(part, entry.qtype)
        f.write(data.tobytes())
        written += data.nbytes
    if written != entry.nbytes:  # pragma: no cover - a gguf package that sizes types differently
        raise AssertionError(f"{entry.name}: wrote {written} bytes, planned {entry.nbytes}")
    entry.written = True


# ---------------------------------------------------------------------------------- merged stream
def _merged_tensors(checkpoint: BaseCheckpoint, skeleton, saved: SavedAdapter, config, into: str,
                    check: FingerprintCheck) -> Iterator[tuple[str, torch.Tensor, torch.dtype | None]]:
    """``(model name, tensor, via)`` for every tensor of the merged model (:func:`qolora.export.merge.merged_stream`,
    the stream :func:`qolora.export.merge.merge` writes); ``via`` is the dtype a tensor handed out as stored goes
    through first (None: as it is), applied here slice by slice."""
    from .merge import merged_stream

    for item, via in merged_stream(checkpoint, skeleton, saved, config, into, check):
        if isinstance(item, LinearWeight):
            yield f"{item.module}.weight", item.weight, None
        elif item.name is None:
            logger.warning("tensor %r of the base is no part of the model: left out of the GGUF", item.key)
        else:
            yield item.name, item.tensor, via
        del item


def _write_stream(path: Path, layout: tuple[int, int], plan: dict[str, _Entry], tensors, extra,
                  progress: bool) -> None:
    """Every planned tensor at its offset (``extra`` ones first, then the merged stream); the file is
    then cut to its end, the last tensor's padding included."""
    from tqdm.auto import tqdm

    data_start, end = layout
    with open(path, "r+b") as f, tqdm(total=len(plan), desc="gguf", unit="tensor", disable=not progress) as bar:
        for gguf_name, tensor in extra.items():
            _write_tensor(f, data_start, plan[gguf_name], tensor)
            bar.update(1)
        for name, tensor, via in tensors:
            entry = plan.get(name)
            if entry is None:  # e.g. lm_head.weight stored although tied to the embedding
                continue
            _write_tensor(f, data_start, entry, tensor, via)
            del tensor
            bar.update(1)
        missing = [e.name for e in plan.values() if not e.written]
        if missing:
            raise AdapterError(f"the base checkpoint lacks {len(missing)} tensor(s) of the model, e.g. {missing[:3]}")
        f.truncate(end)


# ------------------------------------------------------------------------------------- export
def export_gguf(
    adapter_dir: str | os.PathLike,
    out_file: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    type: str = "q8_0",
    into: str = "trained",
    overwrite: bool = False,
    modelfile: bool = True,
    device: str | None = None,
    allow_base_mismatch: bool = False,
    progress: bool = True,
) -> dict:
    """Merge a saved adapter into its base and write one GGUF file (and an Ollama Modelfile beside it).

    Args:
        adapter_dir: a folder written by :func:`qolora.save_adapter`.
        out_file: the ``.gguf`` file to write.
        base: the checkpoint the adapter was trained on (default: the base recorded in the adapter).
        type: tensor type of the weights, one of :data:`GGUF_TYPES` (norms and 1-D tensors stay F32).
        into: ``"trained"`` (the function trained on the quantized base) or ``"original"`` (the update
            added to the full-precision weights), as :func:`qolora.export.merge.merge`.
        overwrite: replace an existing ``out_file`` (and ``Modelfile``), once the new one is complete.
        modelfile: also write an Ollama ``Modelfile`` beside ``out_file``.
        device: where layers are requantized / merged (default: the saved setting).
        allow_base_mismatch: export even if base weights differ from the training base (warning).
        progress: show a progress bar.

    Returns:
        ``out_file``, ``modelfile`` (path or None), ``template_translated``, ``type``, ``into``,
        ``architecture``, ``tensors``, ``bytes``, ``seconds``.

    Raises:
        ConfigError: an unavailable type, an existing output, an unsupported architecture, tokenizer or
            RoPE kind, a missing base: all before any base weight is read.
        AdapterError: a bad adapter folder, or a base with other layers or shapes.
        BaseMismatchError: a base weight differs from the training base (unless allowed).
    """
    start = time.perf_counter()
    type = gguf_type(type)
    if into not in INTO:
        raise ConfigError(f"into={into!r} is not supported; allowed: {list(INTO)}")
    path, modelfile_path = _out_paths(out_file, overwrite, modelfile)
    gguf = _gguf()
    saved = read_adapter(adapter_dir)
    base = str(base) if base is not None else recorded_base(saved, adapter_dir)
    checkpoint = BaseCheckpoint.open(base)
    hf_config = checkpoint.hf_config
    arch, permute = _architecture(hf_config)
    rope = _rope(hf_config)
    if getattr(hf_config, "tie_word_embeddings", False) and "lm_head" in saved.layers:
        raise ConfigError("the adapter adapts lm_head of a model whose head is tied to its embedding: a GGUF has one "
                          "tensor for both; export --format merged instead")
    vocab = _vocab(checkpoint.dir, hf_config.vocab_size)
    config = resolve_device_config(saved, device)
    skeleton = checkpoint.skeleton()
    check_base_structure(skeleton, saved, base)
    check = FingerprintCheck(saved, base, allow_base_mismatch)
    extra = {}
    if rope["rope_type"] == "llama3":
        extra[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = _llama3_rope_factors(hf_config, rope)
    plan = _plan(skeleton, hf_config, arch, permute, gguf.GGMLQuantizationType[GGUF_TYPES[type][0]], extra)
    name = f"{checkpoint.dir.name}-qolora"

    origin = {"into": into, "init": saved.config.init, "bits": saved.config.bits, "rank": saved.config.rank,
              "base": base}

    def metadata(writer):
        _write_metadata(writer, hf_config, arch, rope, type, name, vocab, origin)

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        layout = _write_header(tmp, plan, arch, metadata)
        tensors = _merged_tensors(checkpoint, skeleton, saved, config, into, check)
        _write_stream(tmp, layout, plan, tensors, extra, progress)
        if path.exists() and not overwrite:  # appeared meanwhile
            raise ConfigError(f"{str(path)!r} appeared while exporting; pass overwrite=True to replace it")
    size = path.stat().st_size
    translated = None
    if modelfile_path is not None:
        text, translated = ollama_modelfile(path.name, vocab.tokenizer)
        atomic_write_text(modelfile_path, text)
    result = {"out_file": str(path), "modelfile": None if modelfile_path is None else str(modelfile_path),
              "template_translated": translated, "type": type, "into": into,
              "architecture": gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch]], "tensors": len(plan), "bytes": size,
              "seconds": time.perf_counter() - start}
    logger.info("exported %s (%s, %s, %d tensors, %.1f MB) in %.1f s", path, result["architecture"], type, len(plan),
                size / 1e6, result["seconds"])
    return result


# ----------------------------------------------------------------------------------- LoRA GGUF
LORA_TYPES = ("f32", "f16", "bf16", "q8_0")


def _lora_factors(saved: SavedAdapter, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain LoRA on the original base, as :func:`qolora.export.peft.export_lora` writes it:
    ``A' = [A; A0]``, ``B' = [B, -B0]`` (the adapter itself for ``init="lora"``)."""
    a, b = (t.float() for t in saved.weights[name])
    if saved.needs_residual:
        a0, b0 = (t.float() for t in saved.init[name])
        a, b = torch.cat([a, a0], 0), torch.cat([b, -b0], 1)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise AdapterError(f"layer {name}: the adapter has non-finite values (did training diverge?)")
    return a, b


def export_gguf_lora(
    adapter_dir: str | os.PathLike,
    out_file: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    type: str = "f16",
    overwrite: bool = False,
) -> dict:
    """Write the adapter as a llama.cpp LoRA GGUF (``llama-cli -m BASE.gguf --lora OUT``), its converter's format.

    Like :func:`qolora.export.peft.export_lora` it is a plain LoRA for the *original* full-precision base
    (rank 2r for OLoRA / PiSSA): on that base it computes ``W_res + s*B@A``, dropping the quantization
    error of the residual that training saw (the merged GGUF of :func:`export_gguf` keeps it). Only the
    base's ``config.json`` is read.

    Args:
        adapter_dir: a folder written by :func:`qolora.save_adapter`.
        out_file: the ``.gguf`` file to write.
        base: the checkpoint the adapter was trained on (default: the base recorded in the adapter).
        type: ``f32``, ``f16``, ``bf16`` or ``q8_0`` (a factor whose rows do not divide into blocks: F16).
        overwrite: replace an existing ``out_file`` written by qolora.

    Returns:
        ``out_file``, ``rank``, ``alpha``, ``scale``, ``tensors``, ``bytes``.

    Raises:
        ConfigError: a type other than :data:`LORA_TYPES`, an existing output, an unsupported
            architecture, an adapted head tied to the embedding.
        AdapterError: a bad adapter folder, or one with non-finite values.
    """
    if gguf_type(type) not in LORA_TYPES:
        raise ConfigError(f"LoRA GGUF type {type!r} is not supported; allowed: {list(LORA_TYPES)}")
    path, _ = _out_paths(out_file, overwrite, modelfile=False)
    gguf = _gguf()
    saved = read_adapter(adapter_dir)
    hf_config = BaseCheckpoint.open(str(base) if base is not None else recorded_base(saved, adapter_dir)).hf_config
    arch, permute = _architecture(hf_config)
    if getattr(hf_config, "tie_word_embeddings", False) and "lm_head" in saved.layers:
        raise ConfigError("the adapter adapts lm_head, which this model ties to its embedding: llama.cpp cannot apply "
                          "a LoRA to it; export --format gguf (merged) instead")
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch], hf_config.num_hidden_layers)
    heads = {"q_proj": hf_config.num_attention_heads,
             "k_proj": getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads}
    wanted = gguf.GGMLQuantizationType[GGUF_TYPES[gguf_type(type)][0]]
    rank = 2 * saved.config.rank if saved.needs_residual else saved.config.rank
    alpha = saved.scale * rank  # llama.cpp scales by alpha / rank, for LoRA and rsLoRA alike
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch]])
    writer.add_string(MARKER_KEY, _version())
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for name in saved.layers:
        target = name_map.get_name(f"{name}.weight", try_suffixes=(".weight",))
        if target is None:
            raise ConfigError(f"adapted layer {name} has no GGUF name in the gguf package's tensor map")
        a, b = _lora_factors(saved, name)
        module = name.rsplit(".", 1)[-1]
        if permute and module in heads:
            b = _permute_rows(b, heads[module])
        for suffix, factor in ((".lora_a", a), (".lora_b", b)):
            qtype = _entry_type(target + suffix, tuple(factor.shape), wanted)
            data = gguf.quants.quantize(factor.contiguous().numpy(), qtype)
            writer.add_tensor(target + suffix, data, raw_dtype=qtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if path.exists() and not overwrite:  # appeared meanwhile
            raise ConfigError(f"{str(path)!r} appeared while exporting; pass overwrite=True to replace it")
    logger.info("exported a rank-%d llama.cpp LoRA (scale %g) to %s, for the ORIGINAL full-precision base: it drops "
                "the residual's quantization error that training saw (the merged --format gguf keeps it)", rank,
                saved.scale, path)
    return {"out_file": str(path), "rank": rank, "alpha": alpha, "scale": saved.scale,
            "tensors": 2 * len(saved.layers), "bytes": path.stat().st_size}


def _version() -> str:
    from ..version import __version__

    return __version__


# ------------------------------------------------------------------------------------ Modelfile
_CHATML_TEMPLATE = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                    "<|im_start|>assistant\n")


def _chatml(messages) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def _chatml_default_system(tokenizer) -> tuple[bool, str | None]:
    """Whether the tokenizer's chat template renders ChatML, and the system prompt it adds when a
    conversation has none (SmolLM2, Qwen), found by rendering it, not by reading its Jinja source."""
    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    turns = [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"},
             {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
    try:
        if render(turns) != _chatml(turns) + "<|im_start|>assistant\n":
            return False, None
        alone = render(turns[1:2])
    except Exception:  # noqa: BLE001 - a template that cannot render these is simply not ChatML
        return False, None
    plain = _chatml(turns[1:2]) + "<|im_start|>assistant\n"
    if alone == plain:
        return True, None
    head, tail = "<|im_start|>system\n", "<|im_end|>\n" + plain
    if alone.startswith(head) and alone.endswith(tail):
        return True, alone[len(head):-len(tail)]
    return False, None


def ollama_modelfile(gguf_name: str, tokenizer) -> tuple[str, bool]:
    """An Ollama Modelfile for ``gguf_name`` (in the same folder) and whether the chat template was translated.

    Args:
        gguf_name: the GGUF file's name (the Modelfile says ``FROM ./gguf_name``).
        tokenizer: the model's transformers tokenizer (its chat template and special tokens).

    Returns:
        ``(text, translated)``; without a translation Ollama falls back to the template it detects
        from the GGUF's ``tokenizer.chat_template``.
    """
    lines = [f"{MODELFILE_HEADER}; import with: ollama create NAME -f Modelfile",
             f"FROM ./{gguf_name}"]
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    is_chatml, system = _chatml_default_system(tokenizer) if tokenizer.chat_template else (False, None)
    if is_chatml:
        lines.append(f'TEMPLATE """{_CHATML_TEMPLATE}"""')
        if system is not None and '"""' not in system:
            lines.append(f'SYSTEM """{system}"""')
        stops += ["<|im_end|>", "<|im_start|>"]
    else:
        logger.warning("the chat template is not ChatML: the Modelfile carries no TEMPLATE (Ollama will use what it "
                       "detects from the GGUF's tokenizer.chat_template); check the answers' format")
        lines.append("# no TEMPLATE: qolora translates ChatML templates only")
    for stop in dict.fromkeys(s for s in stops if s):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    return "\n".join(lines) + "\n", is_chatml

"""Talk to a fine-tuned model: an adapter on its base, or a merged checkpoint, answers streamed.

    model, tokenizer = qolora.cli.chat.load_chat_model(adapter="qolora-output/adapter")
    qolora.cli.chat.reply(model, tokenizer, [{"role": "user", "content": "Hello!"}], stream=True)

An adapter is loaded exactly as trained (:func:`qolora.load`: the recorded base by default, its
fingerprints checked), then, when memory allows, turned into a plain model: every adapted layer
becomes an ``nn.Linear`` holding its effective weight ``deq(W_res) + s * B @ A`` and every other
quantized layer its dequantized weight (the same math as ``qolora.merge``, in memory). A CPU runs such
a model faster than bitsandbytes' 4-bit kernels plus the adapter (SmolLM2-135M on a busy 2-core CPU, one
thread: 10.7 tokens/s against 7.4), and it computes the trained function (up to float rounding of the
order of the adapter's). ``dequantize=False`` keeps the 4-bit model.

A merged folder (``qolora merge``) is an ordinary checkpoint, loaded with ``trust_remote_code=False``
and its ``config.json`` checked like every base (:func:`qolora.base.reader.load_hf_config`).

Prompts are rendered like training rendered them (:class:`qolora.data.records.Renderer`: the chat template,
or the plain ``### Instruction`` template), answers are greedy by default and stream token by token.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..adapters.layer import AdapterLinear, replace_module
from ..base.quant import dequantize_weight, quantization_kind
from ..data.records import Renderer
from ..devices import resolve_device
from ..errors import ConfigError
from ..memory.host_embedding import host_embeddings
from ..memory.host_memory import available_host_bytes
from ..model.adapter_folder import read_adapter

__all__ = ["dequantize_model", "load_chat_model", "prompt_tensor", "reply"]

logger = logging.getLogger(__name__)


def _quantized_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Adapter layers and bitsandbytes-quantized linear layers, by name."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            found.append((name, module))
        elif hasattr(module, "weight") and isinstance(getattr(module, "weight", None), torch.Tensor) \
                and quantization_kind(module.weight) is not None:
            found.append((name, module))
    return [(n, m) for n, m in found if not any(n.startswith(p + ".") for p, _ in found if p != n)]


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace, in place, every adapter layer by an ``nn.Linear`` holding its effective weight
    (``deq(W_res) + s * B @ A``) and every other quantized linear layer by its dequantized weight.

    Returns:
        How many layers were replaced. The model then holds no bitsandbytes layer and no adapter.
    """
    replaced = 0
    for name, module in _quantized_linears(model):
        if isinstance(module, AdapterLinear):
            weight = module.effective_weight()  # (out, in) fp32
            bias = module.base_layer.bias
        else:
            weight = dequantize_weight(module)  # (out, in) fp32
            bias = module.bias
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().to(weight.device, dtype), requires_grad=False)
        replace_module(model, name, linear)
        replaced += 1
    for param in model.parameters():  # the rest (embeddings, norms) computes in the same dtype
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    for embedding in host_embeddings(model):  # a host-memory weight is not a parameter (qolora.memory.host_embedding)
        embedding.weight = embedding.weight.to(dtype)
    if hasattr(model, "qolora"):
        del model.qolora  # no longer an adapter model: nothing may save it as one
    model.eval()
    return replaced


def _dequantized_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    size = torch.finfo(dtype).bits // 8
    total = 0
    for _, module in _quantized_linears(model):
        layer = module.base_layer if isinstance(module, AdapterLinear) else module
        out_f = getattr(layer, "out_features", None) or module.out_features
        in_f = getattr(layer, "in_features", None) or module.in_features
        total += out_f * in_f * size
    return total


def load_chat_model(
    *,
    adapter: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    merged: str | os.PathLike | None = None,
    device: str = "auto",
    dequantize: bool | None = None,
    progress: bool = True,
):
    """The model and tokenizer to chat with.

    Args:
        adapter: an adapter folder (``OUTPUT_DIR/adapter`` of ``qolora finetune``).
        base: the adapter's base; default: the base recorded in its ``qolora_config.json``.
        merged: a merged checkpoint folder instead of ``adapter`` (``qolora merge``).
        device: where to run: ``"auto"`` (CUDA when there is one, else the CPU), ``"cpu"``, ``"cuda"``, ...
        dequantize: turn an adapter model into a plain fp32 one (fast on the CPU); default: on the CPU
            when the dequantized copy fits in half the available memory.
        progress: show progress bars while loading.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        ConfigError: neither or both of ``adapter`` / ``merged``, ``base`` with ``merged``, a missing
            folder, or a folder whose model needs its own code.
        AdapterError, BaseMismatchError: see :func:`qolora.load`.
    """
    from ..data.tokens import load_tokenizer

    if (adapter is None) == (merged is None):
        raise ConfigError("give exactly one of adapter (--adapter) and merged (--merged)")
    try:
        device = str(resolve_device(device))
    except RuntimeError as exc:  # torch's own "Expected one of cpu, cuda, ... device type"
        raise ConfigError(f"device={device!r} (--device) is not a device: {str(exc).splitlines()[0]}") from None
    if merged is not None:
        if base is not None:
            raise ConfigError("base (--base) goes with an adapter (--adapter), not with a merged folder (--merged)")
        return _load_merged(Path(merged).expanduser(), device), load_tokenizer(Path(merged).expanduser())

    from ..base.reader import BaseCheckpoint
    from ..model.load import load

    if base is None:
        base = read_adapter(adapter).base_name_or_path
        if not base:
            raise ConfigError(f"adapter {adapter} records no base; pass base (--base)")
        logger.info("base: %s (recorded in the adapter)", base)
    model_dir = BaseCheckpoint.open(base).dir
    tokenizer = load_tokenizer(model_dir)  # before the model: a folder without a tokenizer fails fast
    model = load(base, adapter, device=device, progress=progress)
    if dequantize is None:
        free = available_host_bytes()
        need = _dequantized_bytes(model, torch.float32)
        dequantize = torch.device(device).type == "cpu" and need < free // 2
        if not dequantize and torch.device(device).type == "cpu":
            logger.warning("keeping the 4-bit model (slower on the CPU): a dequantized copy needs %.1f GB, %.1f GB "
                           "of memory is available", need / 1e9, free / 1e9)
    if dequantize:
        n = dequantize_model(model, torch.float32)
        logger.info("dequantized %d layers into a plain fp32 model for fast generation", n)
    return model, tokenizer


def _load_merged(folder: Path, device: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from ..base.reader import BaseCheckpoint

    checkpoint = BaseCheckpoint.open(folder)  # config checked (no remote code), weight files listed
    dtype = torch.float32 if torch.device(device).type == "cpu" else None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(checkpoint.dir), config=checkpoint.hf_config,
                                                     trust_remote_code=False, dtype=dtype or "auto")
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"cannot load the merged checkpoint {folder}: {type(exc).__name__}: {exc}") from exc
    return model.to(device).eval()


def prompt_tensor(tokenizer, messages: Sequence[dict], device: torch.device) -> torch.Tensor:
    """The conversation rendered as training rendered it, ending with the generation prompt: (1, T) ids."""
    renderer = Renderer(tokenizer)
    text = renderer.render(list(messages), add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=not renderer.use_chat_template)["input_ids"]
    return torch.tensor([ids], device=device)


@torch.no_grad()
def reply(
    model: nn.Module,
    tokenizer,
    messages: Sequence[dict],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    stream: bool | Callable[[str], None] = False,
) -> str:
    """The model's answer to the conversation ``messages`` (``[{"role", "content"}]``).

    Args:
        max_new_tokens: answer length limit.
        temperature: 0 = greedy (deterministic); above 0 samples.
        stream: True prints the answer to stdout token by token as it is generated; a callable gets
            each piece of text instead.

    Returns:
        The whole answer, special tokens removed.
    """
    from transformers import TextStreamer

    device = next(model.parameters()).device
    ids = prompt_tensor(tokenizer, messages, device)  # (1, T)
    streamer = None
    if stream:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        if callable(stream):
            streamer.on_finalized_text = lambda text, stream_end=False: stream(text)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         eos_token_id=eos, pad_token_id=pad, use_cache=True, streamer=streamer, **sampling)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

"""The frozen input embedding in host memory: only its row gather runs there.

A QLoRA model leaves its input embedding unquantized and untrained, and reads a few rows of it per
step: Llama-3-70B's is 128256 x 8192 bf16 = 1.96 GiB, of which a step of 2048 tokens reads 32 MiB.
So it need not live on the GPU. :class:`HostEmbedding` keeps the weight in host memory (pinned when
the compute device is CUDA) and does each lookup there::

    ids (B, T) on the device -> host (B*T*8 bytes) -> index_select into a pinned buffer -> rows to the device

The rows (``B*T*hidden`` in the weight's dtype) are exactly what ``nn.Embedding`` would have made on
the device, so every later computation is unchanged, bit for bit.

**Trade-off.** The GPU saves the whole table; each forward pass pays a device -> host copy of the ids
(a synchronisation: the host must read them), a gather by the CPU (memory bound, ``B*T*hidden*a``
bytes) and the host -> device copy of the rows (asynchronous from pinned memory, 32 MiB for 2048
tokens of a 70B model: about a millisecond over PCIe). Next to a 70B step (seconds) that is noise; on
a small model it is a visible share of a fast step, for little memory. A *tied* head cannot use it:
the output projection reads every row of the same weight every step, so that weight must be on the
device (:func:`check_untied` refuses it before any weight is read).

**How transformers keeps working.** ``PreTrainedModel.device`` and ``.dtype`` are the device and
dtype of the model's first parameter, which is the input embedding's. The host weight is therefore
held as a plain tensor attribute, *not* a registered parameter or buffer: ``parameters()``,
``buffers()``, ``state_dict()``, ``model.to()`` / ``.cuda()``, FSDP and qolora's own buffer and
offload passes never see it, so nothing can move it to the GPU after the fact. In its place the module
registers :attr:`HostEmbedding.anchor`, a zero-element parameter on the compute device in the weight's
dtype: the first parameter transformers reads, so ``model.device`` and ``model.dtype`` are what they
were with an ``nn.Embedding`` (0 bytes). The attributes transformers reads from an input embedding
(``weight``, ``num_embeddings``, ``embedding_dim``, ``padding_idx``) are there, and the output is an
ordinary device tensor, so ``enable_input_require_grads``' forward hook (``output.requires_grad_()``),
gradient checkpointing and ``generate`` (one row per decode step) work as before.

**Placement without a GPU copy.** :func:`qolora.model.prepare.build_model` builds the module as the
checkpoint streams past: the stored tensor (memory-mapped on the host) is copied once into a host
tensor of the compute dtype (:func:`host_tensor`), never to the device.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["HostEmbedding", "check_offload_embedding", "check_untied", "host_embeddings", "host_tensor",
           "input_embedding_name"]


def _tied(hf_config) -> bool:
    text = getattr(hf_config, "text_config", None)
    return bool(getattr(hf_config, "tie_word_embeddings", False)
                or (text is not None and getattr(text, "tie_word_embeddings", False)))


def check_offload_embedding(offload_embedding) -> None:
    """``offload_embedding`` must be a bool.

    Raises:
        ConfigError: anything else.
    """
    if not isinstance(offload_embedding, bool):
        raise ConfigError(f"offload_embedding={offload_embedding!r} must be True or False")


def check_untied(hf_config, option: str = "offload_embedding") -> None:
    """Refuse host-memory input embeddings for a model whose output head shares their weight.

    Raises:
        ConfigError: ``tie_word_embeddings`` is set (read from the config: before any weight).
    """
    if _tied(hf_config):
        raise ConfigError(f"{option}=True needs untied input and output embeddings, but this "
                          f"{hf_config.model_type} model ties them (tie_word_embeddings=True): the output head reads "
                          f"the whole weight every step, so it must stay on the device; use {option}=False")


def input_embedding_name(model: nn.Module) -> str:
    """The module name of ``model``'s input embedding, checked to be one :class:`HostEmbedding` can replace.

    Works on the ``meta`` skeleton (reads nothing).

    Raises:
        ConfigError: the model has no input embedding, it is not a plain ``nn.Embedding`` (e.g. one that
            scales its output), or the output head shares its weight.
    """
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embedding is None:
        raise ConfigError(f"offload_embedding=True: {type(model).__name__} has no input embedding to keep on the host")
    if type(embedding) is not nn.Embedding or embedding.max_norm is not None:
        raise ConfigError(f"offload_embedding=True supports a plain nn.Embedding input embedding; "
                          f"{type(model).__name__} uses {type(embedding).__name__}"
                          + (" with max_norm" if isinstance(embedding, nn.Embedding) and embedding.max_norm else "")
                          + "; use offload_embedding=False")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is embedding.weight:
        raise ConfigError(f"offload_embedding=True needs untied input and output embeddings, but "
                          f"{type(model).__name__} ties them; use offload_embedding=False")
    return next(n for n, m in model.named_modules() if m is embedding)


def host_tensor(tensor: torch.Tensor, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """``tensor`` as a new host tensor of ``dtype`` (pinned when ``pin``): one copy, on the host."""
    out = torch.empty(tensor.shape, dtype=dtype, device="cpu", pin_memory=pin)
    out.copy_(tensor)
    return out


class HostEmbedding(nn.Module):
    """A frozen input embedding whose weight stays in host memory; its output is on ``device``.

    Args:
        weight: the ``(num_embeddings, embedding_dim)`` table, on the CPU (pinned for a CUDA ``device``,
            so the rows' copy is asynchronous).
        device: the compute device the rows are copied to.
        padding_idx: kept for what reads it (the weight is frozen, so it changes nothing here).

    Raises:
        ValueError: ``weight`` is not a 2-D tensor on the CPU.
    """

    def __init__(self, weight: torch.Tensor, device: torch.device | str, padding_idx: int | None = None):
        super().__init__()
        if weight.dim() != 2 or weight.device.type != "cpu":
            raise ValueError(f"HostEmbedding needs a 2-D weight on the CPU, got shape {tuple(weight.shape)} on "
                             f"{weight.device}")
        self.weight = weight.detach().requires_grad_(False)  # a plain attribute: see the module docstring
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx
        self.anchor = nn.Parameter(torch.empty(0, dtype=weight.dtype, device=device), requires_grad=False)

    def _apply(self, fn, recurse=True):
        """``model.to(dtype)`` / ``.half()`` / ``.bfloat16()`` reach the anchor; the host weight follows its
        dtype (a new host tensor, pinned as before), never its device."""
        result = super()._apply(fn, recurse)
        if self.weight.dtype != self.anchor.dtype:
            self.weight = host_tensor(self.weight, self.anchor.dtype, pin=self.weight.is_pinned())
        return result

    @property
    def device(self) -> torch.device:
        """The compute device (where the rows go)."""
        return self.anchor.device

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        weight, device = self.weight, self.anchor.device
        ids = input_ids.to("cpu")  # the host must read them: waits for the device to produce them
        pinned = device.type != "cpu" and weight.is_pinned()
        rows = torch.empty((ids.numel(), self.embedding_dim), dtype=weight.dtype, pin_memory=pinned)
        torch.index_select(weight, 0, ids.reshape(-1), out=rows)  # what F.embedding computes
        rows = rows.view(*ids.shape, self.embedding_dim)
        return rows if device.type == "cpu" else rows.to(device, non_blocking=pinned)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, host={'pinned' if self.weight.is_pinned() else 'cpu'}, "
                f"device={self.anchor.device}" + (f", padding_idx={self.padding_idx}"
                                                  if self.padding_idx is not None else ""))


def host_embeddings(model: nn.Module) -> list[HostEmbedding]:
    """The :class:`HostEmbedding` modules of ``model``."""
    return [m for m in model.modules() if isinstance(m, HostEmbedding)]


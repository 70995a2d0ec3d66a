"""The answer of the memory planner (:func:`qolora.planning.plan.plan`): one figure per component, the
predicted peak of one training step, what fits, and the table ``qolora plan`` prints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["MemoryPlan", "MARGIN_FRACTION"]

GiB = 1024**3
MARGIN_FRACTION = 0.05  # the allocator margin: max(256 MiB, this fraction of the rest), CUDA only


def gib(n: int | float) -> str:
    return f"{n / GiB:.2f}"


def checkpointing_text(mode) -> str:
    if mode == "offload":
        return "offloaded to host"
    if mode == "auto":
        return "auto (planned as every layer; chosen at launch)"
    if not isinstance(mode, bool):
        return f"first {mode} layers"
    return "on" if mode else "off"


@dataclass
class MemoryPlan:
    """Predicted memory of fine-tuning one model (bytes). See the module docstring for the formulas.

    Attributes:
        quantized_weights_bytes: the quantized linear layers (packed weights + quantization statistics).
        other_weights_bytes: embeddings, norms, head, biases and buffers, unquantized.
        weights_bytes: all base weights as stored (the two above).
        adapter_bytes: trainable adapter weights.
        adapter_grad_bytes: their gradients alive at the peak moment (none at the loss with one micro-batch per
            step; every layer's but the recomputed one's in a layer: see ``step_memory``).
        optimizer_bytes: optimizer states.
        activation_bytes: activations kept at the peak moment (incl. working gradients and one dequantized weight).
        loss_bytes: logits and loss buffers at the peak moment (0 when the peak is inside the layers).
        peak_moment: ``"loss"`` (start of the backward pass), ``"layer"`` (backward through a layer) or
            ``"optimizer"`` (the optimizer step: only gradients and states are alive).
        step_bytes: the peak of one training step above the prepared model (activations + loss + adapter
            gradients + optimizer states).
        cuda_context_bytes / margin_bytes: CUDA context and allocator margin (0 on the CPU).
        total_bytes: predicted peak of everything (GPU and host).
        checkpoint_host_bytes: with offloaded checkpointing, the decoder layers' checkpointed inputs held in
            pinned host memory (``activation_bytes`` is then what stays on the GPU).
        offload / offloaded_layers: the offload setting and the decoder layers whose frozen base lives in host memory.
        offloaded_bytes: those layers' frozen bytes (quantized weights, statistics, norms, biases).
        offload_embedding / embedding_host_bytes: whether the input embedding is kept in host memory (asked for,
            or chosen by ``offload="auto"`` before any layer) and its bytes there (0 on the CPU: one memory).
        in_flight_bytes: the largest two offloaded layers: on the GPU at once (computing + prefetched).
        gpu_bytes: ``total_bytes - host_bytes + in_flight_bytes``; host_bytes: ``offloaded_bytes +
            checkpoint_host_bytes + embedding_host_bytes`` (pinned).
        host_memory: host memory to check ``host_bytes`` against (None: not checked).
        fits: ``gpu_bytes <= gpu_memory`` (and ``host_bytes <= host_memory`` when given) when ``gpu_memory`` was given.
        max_seq_len / max_batch_size: the longest sequence (at ``batch_size``) and the largest batch (at
            ``seq_len``) that fit ``gpu_memory`` (None without it, 0 when nothing fits); with ``offload="auto"``
            as many layers offloaded as that takes.
        suggestions: changes that make it fit, each with its predicted total.
        fewest_checkpointed_layers: when it fits with every layer checkpointed, the fewest decoder layers
            that still need checkpointing to fit (``gradient_checkpointing=N``: the others keep their
            activations and skip the recompute, a faster step); 0 means it fits without checkpointing; None
            when every layer needs it (or without ``gpu_memory``).
    """

    model: str
    model_type: str
    num_layers: int
    settings: dict
    quantized_weights_bytes: int
    other_weights_bytes: int
    adapter_bytes: int
    adapter_grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    loss_bytes: int
    peak_moment: str
    cuda_context_bytes: int
    margin_bytes: int
    n_adapted_layers: int = 0
    trainable_params: int = 0
    details: dict = field(default_factory=dict)
    gpu_memory: int | None = None
    max_seq_len: int | None = None
    max_batch_size: int | None = None
    suggestions: list[dict] = field(default_factory=list)
    offload: str | None = None
    offloaded_layers: list[int] = field(default_factory=list)
    offloaded_bytes: int = 0
    in_flight_bytes: int = 0
    host_memory: int | None = None
    checkpoint_host_bytes: int = 0
    fewest_checkpointed_layers: int | None = None
    offload_embedding: bool = False
    embedding_host_bytes: int = 0

    @property
    def num_offloaded_layers(self) -> int:
        return len(self.offloaded_layers)

    @property
    def weights_bytes(self) -> int:
        return self.quantized_weights_bytes + self.other_weights_bytes

    @property
    def step_bytes(self) -> int:
        return (self.activation_bytes + self.checkpoint_host_bytes + self.loss_bytes + self.adapter_grad_bytes
                + self.optimizer_bytes)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.adapter_bytes + self.step_bytes + self.cuda_context_bytes + self.margin_bytes

    @property
    def gpu_bytes(self) -> int:
        return self.total_bytes - self.host_bytes + self.in_flight_bytes

    @property
    def host_bytes(self) -> int:
        return self.offloaded_bytes + self.checkpoint_host_bytes + self.embedding_host_bytes

    @property
    def host_fits(self) -> bool | None:
        return None if self.host_memory is None else self.host_bytes <= self.host_memory

    @property
    def fits(self) -> bool | None:
        if self.gpu_memory is None:
            return None
        return self.gpu_bytes <= self.gpu_memory and self.host_fits is not False

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("weights_bytes", "step_bytes", "total_bytes", "gpu_bytes", "host_bytes", "fits", "host_fits",
                     "num_offloaded_layers"):
            d[name] = getattr(self, name)
        return d

    def format_table(self) -> str:
        """A human-readable, aligned table in GiB."""
        s = self.settings
        rows = [
            ("quantized linear weights", self.quantized_weights_bytes,
             f"{s['bits']}-bit" + (f" {s['quant_type']}, blocksize {s['blocksize']}"
                                   + (", double quant" if s["double_quant"] else "")
                                   if s["bits"] == 4 else "")
             + (f"; FSDP: 1/{s['num_gpus']} of the layers + 2 gathered" if s.get("fsdp") and s.get("num_gpus", 1) > 1
                else "")),
            ("other weights", self.other_weights_bytes, f"embeddings, norms, head in {s['compute_dtype']}"),
            ("adapters", self.adapter_bytes, f"r={s['rank']} on {self.n_adapted_layers} layers, "
                                             f"{self.trainable_params:,} params, {s['adapter_dtype']}"),
            ("adapter gradients", self.adapter_grad_bytes,
             "" if self.adapter_grad_bytes == self.details.get("adapter_grad_bytes_in_all", self.adapter_grad_bytes)
             else f"alive at the peak, of {gib(self.details['adapter_grad_bytes_in_all'])} GiB in all"),
            ("optimizer states", self.optimizer_bytes, s["optim"]),
            ("activations", self.activation_bytes,
             f"seq {s['seq_len']} x batch {s['batch_size']}, "
             f"checkpointing {checkpointing_text(s['gradient_checkpointing'])}"
             + (" (on the GPU)" if self.checkpoint_host_bytes else "")),
            ("layer checkpoints (host)", self.checkpoint_host_bytes,
             f"{self.num_layers} x seq x hidden in pinned host memory" if self.checkpoint_host_bytes else ""),
            ("loss", self.loss_bytes, ("chunked" if s["chunked_loss"] else "full fp32 logits")
             + ("" if self.loss_bytes or self.peak_moment == "loss" else " (peak is inside the layers)")),
            ("CUDA context", self.cuda_context_bytes, ""),
            ("allocator margin", self.margin_bytes,
             f"max(256 MiB, {MARGIN_FRACTION:.0%})" if self.margin_bytes else ""),
        ]
        rows = [r for r in rows if r[0] != "layer checkpoints (host)" or r[1]]
        width = max(len(r[0]) for r in rows)
        gpus = s.get("num_gpus", 1)
        per_gpu = (f", per GPU of {gpus} ({'FSDP' if s.get('fsdp') else 'data parallel'}, batch per GPU)"
                   if gpus > 1 else "")
        lines = [f"{self.model} ({self.model_type}, {self.num_layers} layers) on {s['device']}{per_gpu}",
                 f"{'component':<{width}}  {'GiB':>8}  note", "-" * (width + 40)]
        lines += [f"{name:<{width}}  {gib(b):>8}  {note}".rstrip() for name, b, note in rows]
        lines.append("-" * (width + 40))
        if moe := self.details.get("moe"):
            lines.append(f"experts: {moe['num_experts']} per layer in {moe['moe_layers']} layers, "
                         f"{moe['experts_per_token']} per token, {moe['expert_bytes'] / 2**20:.1f} MiB each "
                         f"quantized; parameters {moe['active_params'] / 1e9:.2f}B active of "
                         f"{moe['total_params'] / 1e9:.2f}B")
        lines.append(f"{'total (predicted peak)':<{width}}  {gib(self.total_bytes):>8}  "
                     f"weights {gib(self.weights_bytes)}, peak at the {self.peak_moment}")
        on_host = self.offload is not None or self.checkpoint_host_bytes or self.embedding_host_bytes
        if on_host:
            parts = [text for text, on in (("layer checkpoints", self.checkpoint_host_bytes),
                                           ("offloaded layers", self.offload is not None),
                                           ("input embedding", self.embedding_host_bytes)) if on]
            lines.append(f"{'host memory':<{width}}  {gib(self.host_bytes):>8}  {' + '.join(parts)}"
                         + ("" if self.host_memory is None else
                            f"; host has {gib(self.host_memory)} GiB" + ("" if self.host_fits else ": NOT enough")))
        if self.offload is not None:  # its share of the host memory above
            lines.append(f"{'offloaded to host':<{width}}  {gib(self.offloaded_bytes):>8}  "
                         f"{self.num_offloaded_layers} of {self.num_layers} decoder layers in pinned host memory "
                         f"(offload={self.offload!r})")
        if self.embedding_host_bytes:  # its share of the host memory above
            lines.append(f"{'input embedding (host)':<{width}}  {gib(self.embedding_host_bytes):>8}  "
                         "frozen, in pinned host memory: rows gathered there, copied to the GPU (offload_embedding)")
        if on_host:
            lines.append(f"{'GPU part':<{width}}  {gib(self.gpu_bytes):>8}  total - host memory"
                         + (f" + {gib(self.in_flight_bytes)} GiB in flight (2 layers)" if self.offload else ""))
        if self.gpu_memory is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"{'GPU memory':<{width}}  {gib(self.gpu_memory):>8}  {verdict} "
                         f"({gib(self.gpu_memory - self.gpu_bytes)} GiB left)")
            lines.append(f"longest seq_len at batch {s['batch_size']}: {self.max_seq_len}; "
                         f"largest batch at seq_len {s['seq_len']}: {self.max_batch_size}")
            if self.fewest_checkpointed_layers is not None:
                k = self.fewest_checkpointed_layers
                lines.append(f"faster, still fits: --gradient-checkpointing {k} (checkpoint the first {k} of "
                             f"{self.num_layers} layers; the others skip the recompute)" if k else
                             "faster, still fits: --gradient-checkpointing off (no layer needs checkpointing)")
            for sug in self.suggestions:
                lines.append(f"  suggestion: {sug['change']}: {gib(sug.get('gpu_bytes', sug['total_bytes']))} GiB"
                             + (" (fits)" if sug["fits"] else " (still too big)"))
        return "\n".join(lines)



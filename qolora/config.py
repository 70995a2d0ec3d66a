"""The one typed, frozen configuration of a prepared model, and its validation.

:class:`AdapterConfig` holds everything that decides what ``qolora.prepare`` builds: the base's
quantization (bits, NF4/FP4, blocksize, double quantization, storage and compute dtypes), the
adapters (init, rank, alpha, rsLoRA, dropout, targets, dtype) and where it runs. ``validate``
collects *every* problem it can see without touching the checkpoint and raises one
:class:`ConfigError` that names each bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch

from .errors import ConfigError
from .inits import INITS, adapter_scale

__all__ = ["AdapterConfig", "BITS", "DTYPES", "QUANT_TYPES", "dtype_name", "parse_dtype", "parse_size"]

BITS = (4, 8, 16)
QUANT_TYPES = ("nf4", "fp4")
#: Largest adapter scale (alpha / r) accepted: far above any in use, far below where fp32 adapters overflow.
MAX_SCALE = 1000.0

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
_STORAGE = {"uint8": torch.uint8, **DTYPES}





def dtype_name(dtype: torch.dtype) -> str:
    """A dtype's name as options take it and saved adapters record it (``"float32"``, ``"bfloat16"``, ...)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(value: str | torch.dtype, what: str, allowed: dict[str, torch.dtype] = DTYPES) -> torch.dtype:
    """Map ``"bf16"`` & co. (or a torch dtype) to a torch dtype, or raise a ConfigError naming ``what``."""
    if isinstance(value, torch.dtype) and value in allowed.values():
        return value
    if isinstance(value, str) and value.lower() in allowed:
        return allowed[value.lower()]
    raise ConfigError(f"{what}={value!r} is not supported; allowed: {sorted(set(allowed))}")


@dataclass(frozen=True)
class AdapterConfig:
    """How to quantize the base and which adapters to attach.

    Attributes:
        bits: 4 (bitsandbytes NF4/FP4 ``Linear4bit``), 8 (``Linear8bitLt``) or 16 (unquantized, in
            ``dtype``).
        rank: adapter rank r.
        alpha: adapter alpha; the scale is ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
            ``None`` means ``alpha = r`` (scale 1: with OLoRA the residual is then exactly
            ``W - B @ A``).
        init: ``"olora"`` (default), ``"pissa"`` or ``"lora"``.
        target_modules: names of linear layers to adapt, matched against the last component of the
            module name (``"q_proj"``; a MoE expert's ``"gate_up_proj"`` / ``"down_proj"``) or the full
            dotted name; ``None`` = every linear layer of the model, every expert of a MoE block included,
            except the output head and MoE routers (``mlp.gate``, ``shared_expert_gate``: kept in 16 bits,
            adapted only when named here).
        use_rslora: rank-stabilised scale ``alpha / sqrt(r)``.
        dropout: dropout on the adapter input.
        quant_type: ``"nf4"`` or ``"fp4"`` (4-bit only).
        blocksize: 4-bit quantization block size (32, 64, 128, ..., 4096).
        double_quant: quantize the 4-bit absmax statistics too (QLoRA's double quantization).
        quant_storage: storage dtype of packed 4-bit weights (``"uint8"``, or ``"bf16"`` for FSDP).
        compute_dtype: dtype of the 4-bit matmul, ``None`` = ``dtype``.
        dtype: dtype of everything not quantized (embeddings, norms, head); ``None`` = bf16 on CUDA,
            fp32 on the CPU.
        adapter_dtype: dtype of the trainable A/B weights. fp32 by default: adapters are tiny and
            fp32 master weights keep Adam updates exact under bf16 autocast.
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        seed: seeds the random inits (LoRA's A, PiSSA's randomised SVD).
        refine: quantization-aware refinement rounds for ``olora`` / ``pissa`` (0 = off): each round
            quantizes the residual and refits the adapter to ``W - deq(q(W_res))``, keeping the init's
            form (:func:`qolora.inits.refine_factors`). The base is still quantized for good once.
    """

    bits: int = 4
    rank: int = 16
    alpha: float | None = None
    init: str = "olora"
    target_modules: tuple[str, ...] | None = None
    use_rslora: bool = False
    dropout: float = 0.0
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    quant_storage: str = "uint8"
    compute_dtype: str | None = None
    dtype: str | None = None
    adapter_dtype: str = "fp32"
    device: str = "auto"
    seed: int = 0
    refine: int = 0
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    # ----------------------------------------------------------------------------------- derived
    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        return adapter_scale(self.lora_alpha, self.rank, self.use_rslora)

    @property
    def torch_device(self) -> torch.device:
        from .devices import resolve_device

        return resolve_device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype is None:
            return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32
        return parse_dtype(self.dtype, "dtype")

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return self.torch_dtype if self.compute_dtype is None else parse_dtype(self.compute_dtype, "compute_dtype")

    @property
    def torch_adapter_dtype(self) -> torch.dtype:
        return parse_dtype(self.adapter_dtype, "adapter_dtype")

    @property
    def torch_quant_storage(self) -> torch.dtype:
        return parse_dtype(self.quant_storage, "quant_storage", _STORAGE)

    def replace(self, **changes) -> AdapterConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["target_modules"] = list(self.target_modules) if self.target_modules is not None else None
        return d

    # -------------------------------------------------------------------------------- validation
    def problems(self) -> list[str]:
        """Every problem with this config that can be seen without the model."""
        p: list[str] = []
        if self.bits not in BITS:
            p.append(f"bits={self.bits!r} is not supported; allowed: {', '.join(map(str, BITS))}")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            p.append(f"rank={self.rank!r} must be an integer >= 1")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
                                           and math.isfinite(self.alpha) and self.alpha > 0):
            p.append(f"alpha={self.alpha!r} must be a finite number > 0 (or None for alpha = rank)")
        elif self.alpha is not None and isinstance(self.rank, int) and self.rank >= 1 and self.scale > MAX_SCALE:
            p.append(f"alpha={self.alpha!r} gives an adapter scale of {self.scale:.3g} (alpha / "
                     f"{'sqrt(rank)' if self.use_rslora else 'rank'}); at most {MAX_SCALE:g} is allowed: beyond it "
                     "the adapter's output swamps the model (common choices: alpha = rank or 2 * rank)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            p.append(f"seed={self.seed!r} must be an integer >= 0")
        if self.init not in INITS:
            p.append(f"init={self.init!r} is unknown; allowed: {sorted(INITS)}")
        if not isinstance(self.refine, int) or isinstance(self.refine, bool) or self.refine < 0:
            p.append(f"refine={self.refine!r} must be an integer >= 0 (0 = off)")
        elif self.refine > 0 and self.init in INITS and not INITS[self.init].needs_residual:
            p.append(f"refine={self.refine} needs init='olora' or 'pissa': init={self.init!r} leaves the base weight "
                     "as it is (no residual to refine); use refine=0")
        if self.target_modules is not None and (
            isinstance(self.target_modules, str) or not self.target_modules
            or not all(isinstance(t, str) and t for t in self.target_modules)
        ):
            p.append(f"target_modules={self.target_modules!r} must be a non-empty list of module names, or None")
        if (not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool)
                or not 0.0 <= self.dropout < 1.0):
            p.append(f"dropout={self.dropout!r} must be in [0, 1)")
        if self.quant_type not in QUANT_TYPES:
            p.append(f"quant_type={self.quant_type!r} is not supported; allowed: {list(QUANT_TYPES)}")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            p.append(f"blocksize={self.blocksize!r} is not supported; allowed: 32, 64, 128, ..., 4096")
        for name, allowed in (("dtype", DTYPES), ("compute_dtype", DTYPES), ("adapter_dtype", DTYPES),
                              ("quant_storage", _STORAGE)):
            value = getattr(self, name)
            if value is not None:
                try:
                    parse_dtype(value, name, allowed)
                except ConfigError as e:
                    p.extend(e.problems)
        p.extend(self._device_problems())
        return p

    def _device_problems(self) -> list[str]:
        dev = self.device
        if dev == "auto" or dev == "cpu":
            return []
        if not isinstance(dev, str) or not (dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
            return [f"device={dev!r} is not supported; allowed: 'auto', 'cpu', 'cuda', 'cuda:N'"]
        from .devices import world

        w = world()
        if ":" in dev and w.distributed and int(dev[5:]) != w.local_rank:  # every rank would share that GPU
            return [f"device={dev!r} under a launch of {w.size} processes puts every rank on one GPU; use "
                    "device='cuda' (or 'auto'): each process then takes cuda:LOCAL_RANK"]
        if not torch.cuda.is_available():
            return [f"device={dev!r} needs CUDA, but no CUDA device is available on this machine; use 'cpu' or 'auto'"]
        index = int(dev[5:]) if ":" in dev else 0
        if index >= torch.cuda.device_count():
            return [f"device={dev!r}: only {torch.cuda.device_count()} CUDA device(s) present"]
        return []

    def validate(self) -> AdapterConfig:
        """Raise one :class:`ConfigError` listing every problem, or return self."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_size(value: int | str, what: str = "size") -> int:
    """Bytes from an int or a string: ``"2GB"`` (decimal), ``"1.5GiB"`` (binary), ``"80G"`` (binary, as
    nvidia-smi shows), ``"500MB"``, ``"64"``.

    Raises:
        ConfigError: not a positive size (naming ``what``).
    """
    size = -1
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)) and (m.group(2) or not m.group(3)):
        unit, binary, b = m.group(2).lower(), bool(m.group(3)), bool(m.group(4))
        base = 1000 if (b and not binary) else 1024  # "GB" decimal; "GiB" and a bare "G" binary
        size = int(float(m.group(1)) * base ** (" kmgt".index(unit) if unit else 0))
    if size <= 0:
        raise ConfigError(f"{what}={value!r} is not a size; use a positive number of bytes or a string like "
                          "'2GB', '500MB', '24GiB'")
    return size

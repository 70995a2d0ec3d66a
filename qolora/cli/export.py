"""``qolora export ADAPTER OUT --format {gguf,merged,peft,gguf-lora}``: one command for every way out of qolora.

* ``gguf``: the adapter merged into its base, one GGUF file for llama.cpp / Ollama / LM Studio, and an
  Ollama ``Modelfile`` beside it (:func:`qolora.export.gguf.export_gguf`);
* ``merged``: the same merged weights as a plain transformers checkpoint folder for vLLM / TGI /
  transformers (:func:`qolora.export.merge.merge`);
* ``peft``: a plain PEFT LoRA for the original full-precision base (:func:`qolora.export.peft.export_lora`);
* ``gguf-lora``: the same LoRA as a llama.cpp adapter GGUF (``--lora``) for a GGUF of the original base
  (:func:`qolora.export.gguf.export_gguf_lora`).

``--base`` defaults to the base recorded in the adapter (``peft`` and ``gguf-lora`` read no base
weight; they record the base, or read its config). ``--type`` is the tensor type: GGUF types for
``gguf``, f32/f16/bf16/q8_0 for ``gguf-lora``, bf16/fp16/fp32 for ``merged``; ``peft`` has none. The
choices and defaults come from the library's constants. Errors are raised as
:class:`~qolora.config.ConfigError` before any work; ``qolora``'s ``main`` prints them as one line and
exits with code 2.
"""

from __future__ import annotations

import argparse

__all__ = ["add_export_command", "FORMATS"]

FORMATS = ("gguf", "merged", "peft", "gguf-lora")
_MERGED_TYPES = {"bf16": "bf16", "fp16": "fp16", "f16": "fp16", "fp32": "fp32", "f32": "fp32"}


def add_export_command(subparsers, formatter_class: type = argparse.ArgumentDefaultsHelpFormatter
                       ) -> argparse.ArgumentParser:
    """Register ``qolora export`` on an argparse subparsers object.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers()`` returned.
        formatter_class: the help formatter of the other commands (the ``qolora`` command passes its own).

    Returns:
        The ``export`` parser (its handler is set as ``func``).
    """
    from ..export.gguf import GGUF_TYPES, INTO, UNAVAILABLE_TYPES

    why_not: dict[str, list[str]] = {}
    for name, why in UNAVAILABLE_TYPES.items():
        why_not.setdefault(why, []).append(name)
    p = subparsers.add_parser(
        "export", formatter_class=formatter_class,
        help="export an adapter: GGUF for llama.cpp/Ollama, a merged checkpoint, or a PEFT LoRA",
        description="Write ADAPTER in the format the place it will run wants: gguf (merged into its base, one "
                    "file for llama.cpp / Ollama / LM Studio, with an Ollama Modelfile beside it), merged (a plain "
                    "transformers checkpoint folder for vLLM / TGI), peft (a LoRA for the original base), gguf-lora "
                    "(that LoRA as a llama.cpp --lora file). Streamed "
                    "tensor by tensor, written atomically; nothing existing is replaced without --overwrite.",
        epilog="GGUF types not available: " + " ".join(f"{', '.join(names)}: {why}." for why, names in why_not.items()),
    )
    p.add_argument("adapter", help="adapter folder (e.g. OUTPUT_DIR/adapter of qolora finetune)")
    p.add_argument("out", help="gguf, gguf-lora: the .gguf file to write (gguf: the Modelfile goes beside it); merged, "
                               "peft: the folder")
    p.add_argument("--format", required=True, choices=list(FORMATS), help="what to write (no default)")
    p.add_argument("--base", default=None,
                   help="the checkpoint the adapter was trained on (default: the base recorded in the adapter)")
    p.add_argument("--type", default=None, metavar="TYPE",
                   help=f"gguf: {', '.join(GGUF_TYPES)} (default q8_0; norms stay f32); merged: bf16, fp16, fp32 "
                        "(default bf16); gguf-lora: f32, f16, bf16, q8_0 (default f16); peft: none. K-quants (q4_k_m "
                        "...) are not available: see below")
    p.add_argument("--into", default=INTO[0], choices=list(INTO),
                   help="gguf, merged: trained = exactly the function trained on the quantized base; original = the "
                        "update added to the full-precision weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT written by qolora")
    p.add_argument("--no-modelfile", dest="modelfile", action="store_false",
                   help="gguf: do not write an Ollama Modelfile beside the file")
    p.add_argument("--device", default=None, help="gguf, merged: where layers are merged (default: as in training)")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="gguf, merged: export even if BASE's weights differ from the base the adapter was trained on")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_export)
    return p


def _check_args(args) -> None:
    from ..errors import ConfigError
    from ..export.gguf import GGUF_TYPES, LORA_TYPES, gguf_type

    problems = []
    if args.format in ("gguf", "gguf-lora") and args.type is not None:
        try:
            gguf_type(args.type)
            if args.format == "gguf-lora" and args.type.lower() not in LORA_TYPES:
                problems.append(f"--type={args.type!r} is not a type of a LoRA GGUF; allowed: {list(LORA_TYPES)}")
        except ConfigError as exc:
            problems.append(f"--type {exc}")
    elif args.format == "merged" and args.type is not None and args.type.lower() not in _MERGED_TYPES:
        problems.append(f"--type={args.type!r} is not a type of a merged checkpoint; allowed: bf16, fp16, fp32 "
                        f"(GGUF types, {list(GGUF_TYPES)}, go with --format gguf)")
    if args.format in ("peft", "gguf-lora"):
        given = [flag for flag, value in (("--type", args.type if args.format == "peft" else None),
                                          ("--device", args.device)) if value is not None]
        given += ["--into original"] if args.into != "trained" else []
        given += ["--allow-base-mismatch"] if args.allow_base_mismatch else []
        if given:
            problems.append(f"{', '.join(given)} do(es) not apply to --format {args.format} (a LoRA; no base weight "
                            "is read)")
    if problems:
        raise ConfigError(problems)


def _export(args) -> int:
    _check_args(args)
    if args.format == "gguf":
        return _export_gguf(args)
    if args.format == "merged":
        return _export_merged(args)
    if args.format == "gguf-lora":
        return _export_gguf_lora(args)
    return _export_peft(args)


def _export_gguf(args) -> int:
    from ..export.gguf import export_gguf

    r = export_gguf(args.adapter, args.out, base=args.base, type=args.type or "q8_0", into=args.into,
                    overwrite=args.overwrite, modelfile=args.modelfile, device=args.device,
                    allow_base_mismatch=args.allow_base_mismatch, progress=args.progress)
    print(f"exported {args.adapter} merged ({r['into']}) into {r['out_file']}: {r['architecture']}, {r['type']}, "
          f"{r['tensors']} tensors, {r['bytes'] / 1e6:.1f} MB in {r['seconds']:.1f} s")
    if r["modelfile"]:
        note = "" if r["template_translated"] else " (chat template not translated: Ollama detects it from the file)"
        print(f"Ollama: ollama create NAME -f {r['modelfile']}{note}")
    print(f"llama.cpp: llama-cli -m {r['out_file']}")
    return 0


def _export_gguf_lora(args) -> int:
    from ..export.gguf import export_gguf_lora

    r = export_gguf_lora(args.adapter, args.out, base=args.base, type=args.type or "f16", overwrite=args.overwrite)
    print(f"exported a rank-{r['rank']} llama.cpp LoRA to {r['out_file']} ({r['bytes'] / 1e6:.1f} MB) for a GGUF of "
          f"the original base: llama-cli -m BASE.gguf --lora {r['out_file']}")
    return 0


def _export_merged(args) -> int:
    from ..export.merge import merge

    base = args.base if args.base is not None else _recorded_base(args.adapter)
    dtype = _MERGED_TYPES[(args.type or "bf16").lower()]
    r = merge(base, args.adapter, args.out, dtype=dtype, into=args.into, overwrite=args.overwrite,
              device=args.device, allow_base_mismatch=args.allow_base_mismatch, progress=args.progress)
    print(f"merged {r['merged_layers']} adapted layers ({r['into']}, {r['dtype']}) into {r['out_dir']}: "
          f"{r['shards']} shard(s), {r['total_bytes'] / 1e6:.1f} MB in {r['seconds']:.1f} s")
    return 0


def _export_peft(args) -> int:
    from ..export.peft import export_lora

    r = export_lora(args.adapter, args.out, base=args.base, overwrite=args.overwrite)
    rel = r["relative_error"]
    print(f"exported a rank-{r['rank']} PEFT LoRA to {r['out_dir']} for the original full-precision base"
          + ("" if rel is None else f" (drops {100 * rel:.3g}% quantization error, see the warning)"))
    return 0


def _recorded_base(adapter) -> str:
    """The base recorded in the adapter, refused clearly when it is gone."""
    from ..export.gguf import recorded_base
    from ..model.adapter_folder import read_adapter

    return recorded_base(read_adapter(adapter), adapter)

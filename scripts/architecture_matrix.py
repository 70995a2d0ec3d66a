"""The architecture matrix: which causal-LM architectures pass which step, qolora against transformers + PEFT.

For each architecture a tiny random model (2 layers, hidden 64; MoE: 4 experts, 2 per token) is written by
transformers' own ``save_pretrained`` (the layout a hub checkpoint has), then:

qolora      prepare (4-bit NF4, OLoRA rank 4, ``compare_plain``: step-0 weight error against plain NF4),
            train (8 AdamW steps on one batch: the loss falls), save + reload (logits bit-exact),
            merge (the merged folder loads in plain transformers and matches the reloaded model), PEFT export
            (``PeftModel.from_pretrained`` on the plain base loads it with no missing or unexpected keys).
reference   transformers ``load_in_4bit`` (bitsandbytes NF4) + PEFT ``init_lora_weights="olora"`` on
            ``target_modules="all-linear"``: loads and initialises, trains (the loss falls), whether the MoE
            experts were adapted at all and whether they were quantized.

Usage: ``python scripts/architecture_matrix.py [--only mixtral,llama] [--out matrix.md]`` (CPU, offline, a few
minutes). Prints the markdown table; each cell is ``ok``, ``FAIL`` (with the error in the notes below the table)
or a measured value.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "base"))  # test_moe's tiny MoE configs

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
DENSE = {
    "llama": {}, "mistral": {"sliding_window": None}, "qwen2": {}, "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16}, "gemma2": {"head_dim": 16}, "gemma3_text": {"head_dim": 16}, "phi3": {"pad_token_id": 0},
    "olmo2": {}, "granite": {}, "stablelm": {}, "cohere": {}, "starcoder2": {},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
    "falcon": {"new_decoder_architecture": False, "multi_query": True},
    "gpt_neox": {},
}
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "deepseek_v2", "gpt_oss", "phimoe", "granitemoe",
       "glm4_moe", "ernie4_5_moe")
COLUMNS = ("prepare", "step-0 error vs NF4", "train", "save/reload", "merge", "PEFT export",
           "ref: load + olora init", "ref: train", "ref: experts adapted", "ref: experts 4-bit")


# ------------------------------------------------------------------------------------------ models
def tiny_config(arch: str):
    from transformers import AutoConfig

    if arch in MOE and arch != "olmoe":
        from test_moe import tiny_config as moe_config

        return moe_config(arch)
    if arch == "olmoe":
        return AutoConfig.for_model("olmoe", **{**SMALL, "intermediate_size": 24}, num_experts=4,
                                    num_experts_per_tok=2)
    return AutoConfig.for_model(arch, **{**SMALL, **DENSE[arch]})


def write_tiny(arch: str, folder: Path) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    with torch.no_grad():  # larger than the default init, so quantization and adapters matter visibly
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder)
    return folder


def batch(vocab: int = 128) -> torch.Tensor:
    return torch.randint(1, vocab, (4, 16), generator=torch.Generator().manual_seed(1))


def train(model, params, steps: int = 8) -> tuple[float, float]:
    opt = torch.optim.AdamW(params, lr=1e-2)
    tokens = batch()
    model.train()
    first = last = None
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        first = loss.item() if first is None else first
        last = loss.item()
    model.eval()
    return first, last


# ------------------------------------------------------------------------------------------- steps
def qolora_steps(base: Path, work: Path, row: dict) -> None:
    """Fill ``row`` with qolora's steps, stopping at the first failure (later steps need the earlier ones)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import qolora

    with step(row, "prepare"):
        model = qolora.prepare(base, bits=4, rank=4, compare_plain=True, progress=False)
    report = model.qolora.report
    row["step-0 error vs NF4"] = f"{report.total_error / report.total_plain_error:.3f}x"
    with step(row, "train"):
        first, last = train(model, [p for p in model.parameters() if p.requires_grad])
        assert last < first, f"loss {first:.3f} -> {last:.3f}"
    tokens = batch()
    with step(row, "save/reload"):
        adapter = qolora.save_adapter(model, work / "adapter")
        reloaded = qolora.load(base, adapter, progress=False)
        with torch.no_grad():
            assert torch.equal(model(tokens).logits, reloaded(tokens).logits), "reloaded logits differ"
    with step(row, "merge"):
        check = qolora.merge(base, adapter, work / "merged", dtype="fp32", prompts=[tokens[0].tolist()],
                             progress=False)["logit_check"]
        assert check["max_abs_diff"] < 1e-3 * check["max_abs_logit"], f"merged logits off by {check['max_abs_diff']}"
    with step(row, "PEFT export"):
        qolora.export_lora(model, work / "peft")
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), work / "peft")
        with torch.no_grad():
            peft_model(tokens)


def reference_model(base: Path, init):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, dtype=torch.float32)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights=init))


def reference_steps(base: Path, row: dict) -> None:
    """transformers 4-bit + PEFT OLoRA on every linear layer (where OLoRA fails: plain LoRA, for the columns after)."""
    model = None
    with contextlib.suppress(_Stop), step(row, "ref: load + olora init"):
        model = reference_model(base, "olora")
    if model is None:
        model = reference_model(base, True)
        row["_notes"].append("ref: train / experts adapted: with PEFT's plain LoRA init (OLoRA failed)")
    with step(row, "ref: train"):
        first, last = train(model, [p for p in model.parameters() if p.requires_grad])
        assert last < first, f"loss {first:.3f} -> {last:.3f}"
    experts = [n for n, _ in model.named_parameters() if "lora_" in n and ".experts" in n]
    has_experts = any("experts" in n for n, _ in model.named_parameters())
    row["ref: experts adapted"] = ("yes" if experts else "no") if has_experts else "-"
    fused = [p for n, p in model.named_parameters() if "experts" in n and "gate_up_proj" in n and "lora_" not in n]
    row["ref: experts 4-bit"] = ("yes" if any(type(p).__name__ == "Params4bit" for p in fused) else
                                 "no (" + ", ".join(sorted({str(p.dtype).removeprefix("torch.") for p in fused}))
                                 + ")") if has_experts else "-"


@contextlib.contextmanager
def step(row: dict, name: str):
    try:
        yield
    except Exception as exc:
        row[name] = "FAIL"
        row.setdefault("_notes", []).append(f"{name}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
        logging.getLogger("matrix").debug("%s", traceback.format_exc())
        raise _Stop from exc
    row[name] = "ok"


class _Stop(Exception):
    """A step failed: the steps after it need its result."""


# ------------------------------------------------------------------------------------------- table
def run(archs: list[str]) -> list[dict]:
    rows = []
    for arch in archs:
        row = {"architecture": arch}
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            try:
                base = write_tiny(arch, work / "base")
            except Exception as exc:  # noqa: BLE001 - an architecture this transformers cannot build small
                row["_notes"] = [f"tiny model: {type(exc).__name__}: {exc}"]
                rows.append(row)
                continue
            for fn, args in ((qolora_steps, (base, work, row)), (reference_steps, (base, row))):
                with contextlib.suppress(_Stop):
                    fn(*args)
        print(f"{arch}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| architecture | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row['architecture']} | " + " | ".join(row.get(c, "-") for c in COLUMNS) + " |")
    notes = [f"- {row['architecture']}: {note}" for row in rows for note in row.get("_notes", [])]
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated model types (default: all)")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args(argv)
    archs = args.only.split(",") if args.only else [*DENSE, *MOE]
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    table = markdown(run(archs))
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

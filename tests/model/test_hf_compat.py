"""qolora models in transformers' Trainer, TRL's SFTTrainer and lm-eval's HFLM (qolora.model.hf_compat, forward_wrap).

Tiny random 4-bit Llamas on the CPU, trained a few real optimizer steps by the real trainers.
"""

import json
import logging
import os

import pytest
import torch

import qolora
from qolora.adapters.layer import adapter_layers
from qolora.errors import ConfigError
from qolora.model.adapter_folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, INIT_WEIGHTS, QOLORA_CONFIG, AdapterError
from qolora.model.forward_wrap import remove_autocast, trainer_autocast
from qolora.model.hf_compat import load_adapter_weights, trainer_class

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def prepared(base, **kw):
    return qolora.prepare(base, bits=4, rank=4, progress=False, **kw)


def tokens(batch=2, length=12, seed=99):
    return torch.randint(4, 384, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x=None):
    with torch.no_grad():
        return model(tokens() if x is None else x).logits.float()


def adapters(model):
    return {n: (layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone())
            for n, layer in adapter_layers(model)}


def examples(n=8, length=12):
    return [{"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x)}
            for x in tokens(batch=n, length=length, seed=5)]


def args(out, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2, save_steps=2,
                logging_steps=1, report_to="none", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
                save_only_model=False)
    return TrainingArguments(**{**base, **kw})


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


# --------------------------------------------------------------------------- Trainer checkpoints
def test_trainer_checkpoints_are_adapter_folders_and_resume_exactly(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, Trainer

    QTrainer = trainer_class(Trainer)
    model = prepared(tiny_llama_dir)
    start = adapters(model)
    QTrainer(model=model, args=args(tmp_path / "run"), train_dataset=examples()).train()
    full = adapters(model)
    assert all(not torch.equal(full[n][1], start[n][1]) for n in full)  # trained

    ckpt = tmp_path / "run" / "checkpoint-2"
    names = set(os.listdir(ckpt))
    assert {ADAPTER_WEIGHTS, ADAPTER_CONFIG, INIT_WEIGHTS, QOLORA_CONFIG, "config.json", "trainer_state.json",
            "optimizer.pt"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin"}
    # adapter-sized: the adapter files are A/B (+ A0/B0), far below the 4-bit model's packed weights
    adapter_bytes = (ckpt / ADAPTER_WEIGHTS).stat().st_size
    n_adapter = sum(a.numel() + b.numel() for a, b in full.values())
    assert adapter_bytes < 4 * n_adapter + 16_384

    # qolora.load reads a checkpoint folder: the final one is the trained model
    reloaded = qolora.load(tiny_llama_dir, tmp_path / "run" / "checkpoint-4", progress=False)
    assert torch.equal(logits(reloaded), logits(model.eval()))

    # resume from checkpoint-2 in a fresh process-equivalent: same adapters bit for bit, no warnings
    collect = Collect()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(collect)
    try:
        fresh = prepared(tiny_llama_dir)
        QTrainer(model=fresh, args=args(tmp_path / "resumed"), train_dataset=examples()).train(
            resume_from_checkpoint=str(ckpt))
    finally:
        hf_logger.removeHandler(collect)
    resumed = adapters(fresh)
    assert all(torch.equal(resumed[n][0], full[n][0]) and torch.equal(resumed[n][1], full[n][1]) for n in full)
    assert not [m for m in collect.messages if "keys" in m or len(m) > 2000], collect.messages

    # transformers' own loaders refuse the folder loudly instead of building another model
    with pytest.raises(ValueError, match="qolora_adapter"):
        AutoModelForCausalLM.from_pretrained(ckpt)


def test_plain_trainer_cannot_resume_a_qolora_checkpoint_and_says_so(tiny_llama_dir, tmp_path):
    """Why QoloraTrainerMixin exists: Trainer restores adapters only for peft.PeftModel instances."""
    from transformers import Trainer

    model = prepared(tiny_llama_dir)
    Trainer(model=model, args=args(tmp_path / "run", max_steps=2), train_dataset=examples()).train()
    assert (tmp_path / "run" / "checkpoint-2" / QOLORA_CONFIG).is_file()  # plain Trainer saves adapter folders too
    fresh = prepared(tiny_llama_dir)
    with pytest.raises(ValueError, match="checkpoint index"):
        Trainer(model=fresh, args=args(tmp_path / "again", max_steps=4), train_dataset=examples()).train(
            resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))


def test_resume_refuses_a_checkpoint_of_another_init(tiny_llama_dir, tmp_path):
    model = prepared(tiny_llama_dir)
    model.save_pretrained(tmp_path / "ckpt")
    other = prepared(tiny_llama_dir, seed=1, init="pissa")
    setup = r"another adapter setup: init=.olora. there, .pissa. here; seed=0 there, 1 here"
    with pytest.raises(AdapterError, match=setup):
        load_adapter_weights(other, tmp_path / "ckpt")
    with torch.no_grad():
        next(iter(adapter_layers(model)))[1].lora_B.weight.add_(1.0)
    restored = prepared(tiny_llama_dir)
    load_adapter_weights(restored, tmp_path / "ckpt")
    assert not torch.equal(logits(restored), logits(model))  # the saved state, not the later edit
    assert torch.equal(logits(restored), logits(prepared(tiny_llama_dir)))


def test_resume_from_a_trainer_checkpoint_of_another_adapter_setup_is_refused(tmp_path, tiny_llama_dir):
    """hf_compat.load_adapter_weights compares the adapter setup, not only the factors (OLoRA's
    factors do not depend on alpha, so the factors alone cannot tell)."""
    from qolora.model.adapter_folder import AdapterError
    from qolora.model.hf_compat import load_adapter_weights

    first = qolora.prepare(tiny_llama_dir, bits=4, rank=4, alpha=4, device="cpu", progress=False)
    first.save_pretrained(tmp_path / "ck")
    other = qolora.prepare(tiny_llama_dir, bits=4, rank=4, alpha=16, device="cpu", progress=False)
    with pytest.raises(AdapterError, match=r"alpha=4 there, 16 here"):
        load_adapter_weights(other, tmp_path / "ck")
    load_adapter_weights(qolora.prepare(tiny_llama_dir, bits=4, rank=4, alpha=4, device="cpu", progress=False),
                         tmp_path / "ck")


# --------------------------------------------------------------------------------- save_pretrained
def test_save_pretrained_writes_into_a_folder_and_refuses_what_it_would_clobber(tiny_llama_dir, tmp_path):
    from transformers import LlamaForCausalLM

    model = prepared(tiny_llama_dir)
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "trainer_state.json").write_text("{}")
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="1GB")
    assert (folder / "trainer_state.json").read_text() == "{}"
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # no temporary left
    with torch.no_grad():
        next(iter(adapter_layers(model)))[1].lora_A.weight.mul_(2)
    model.save_pretrained(folder)  # an adapter qolora wrote is replaced, as save_pretrained does
    assert torch.equal(logits(qolora.load(tiny_llama_dir, folder, progress=False)), logits(model))
    with pytest.raises(OSError, match="model.safetensors"):  # no model there: a loud failure, no random model
        LlamaForCausalLM.from_pretrained(folder)

    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    with pytest.raises(ConfigError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)

    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    (peft_dir / ADAPTER_CONFIG).write_text("{}")
    with pytest.raises(AdapterError, match="did not write"):
        model.save_pretrained(peft_dir)
    with pytest.raises(AdapterError, match="model.safetensors"):
        model.save_pretrained(tiny_llama_dir)  # a model folder is never written into
    assert (peft_dir / ADAPTER_CONFIG).read_text() == "{}"


def test_save_pretrained_takes_a_trainer_gathered_state_dict(tiny_llama_dir, tmp_path):
    model = prepared(tiny_llama_dir)
    name, layer = next(iter(adapter_layers(model)))
    state = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    state[f"{name}.lora_B.weight"] += 0.5
    model.save_pretrained(tmp_path / "a", state_dict=state)
    saved = qolora.read_adapter(tmp_path / "a")
    assert torch.equal(saved.weights[name][1], layer.lora_B.weight.detach() + 0.5)


def test_declared_quantization(tiny_llama_dir):
    from transformers.trainer_utils import validate_quantization_for_training

    model = prepared(tiny_llama_dir)
    assert model.quantization_method == "bitsandbytes"
    for absent in ("is_quantized", "hf_quantizer", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        assert not getattr(model, absent, False), absent
    validate_quantization_for_training(model)  # does not raise: Trainer trains it
    with pytest.raises(ValueError, match="cast a bitsandbytes model"):
        model.to(torch.bfloat16)
    assert not hasattr(qolora.prepare(tiny_llama_dir, bits=16, rank=4, progress=False), "quantization_method")


def test_from_pretrained_refuses_a_saved_adapter_folder(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = qolora.save_adapter(prepared(tiny_llama_dir), tmp_path / "adapter")
    assert json.loads((out / "config.json").read_text())["model_type"] == "qolora_adapter"
    with pytest.raises(ValueError, match="qolora_adapter"):
        AutoModelForCausalLM.from_pretrained(out)


# ----------------------------------------------------------------------------- mixed precision
def test_trainer_autocast_wrapper_is_recorded_and_put_back(tiny_llama_dir, tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model = prepared(tiny_llama_dir)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_B.weight.normal_(0, 0.1)
    plain = logits(model)
    AcceleratorState._reset_state(reset_partial_state=True)  # a singleton: earlier tests set it up without bf16
    try:
        Accelerator(cpu=True, mixed_precision="bf16").prepare_model(model)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert trainer_autocast(model) == {"device_type": "cpu", "dtype": "bfloat16"}
    wrapped = logits(model)
    assert not torch.equal(wrapped, plain)
    out = qolora.save_adapter(model, tmp_path / "a")
    assert json.loads((out / QOLORA_CONFIG).read_text())["forward_autocast"]["dtype"] == "bfloat16"
    assert torch.equal(logits(qolora.load(tiny_llama_dir, out, progress=False)), wrapped)
    assert torch.equal(logits(qolora.load(tiny_llama_dir, out, progress=False, autocast=False)), plain)
    assert remove_autocast(model) and trainer_autocast(model) is None
    assert torch.equal(logits(model), plain)


# ------------------------------------------------------------------------------------------- TRL
def test_sft_trainer_trains_a_prepared_model_and_the_adapter_reloads_to_it(tiny_llama_dir, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import PeftModel
    from trl import SFTConfig, SFTTrainer

    from tiny_tokenizer import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    model = prepared(tiny_llama_dir)
    texts = ["def add(a, b): return a + b", "print('hello world')", "x = [1, 2, 3]", "import torch"] * 4
    config = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=4,
                       learning_rate=1e-2, max_length=32, report_to="none", use_cpu=True, save_steps=3,
                       logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
    assert config.bf16  # TRL's default: the trained model is left under bf16 autocast
    trainer = trainer_class(SFTTrainer)(model=model, args=config, train_dataset=Dataset.from_dict({"text": texts}),
                                        processing_class=tok)
    assert trainer.model is model and not isinstance(trainer.model, PeftModel)  # not wrapped in PEFT again
    assert all(layer.lora_A.weight.dtype == torch.float32 for _, layer in adapter_layers(model))  # no bf16 recast
    start = adapters(model)
    trainer.train()
    assert all(not torch.equal(b, start[n][1]) for n, (_, b) in adapters(model).items())  # trained
    assert trainer_autocast(model) == {"device_type": "cpu", "dtype": "bfloat16"}
    trained = logits(model.eval())
    for folder in (qolora.save_adapter(model, tmp_path / "adapter"), tmp_path / "sft" / "checkpoint-3"):
        assert torch.equal(logits(qolora.load(tiny_llama_dir, folder, progress=False)), trained), folder


# --------------------------------------------------------------------------------------- lm-eval
def test_lm_eval_hflm_evaluates_a_prepared_model(tiny_llama_dir):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from tiny_tokenizer import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    model = prepared(tiny_llama_dir)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2)
    pairs = [("def add(a, b):", " return a + b"), ("print(", "'hello world')")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    got = lm.loglikelihood(requests)
    for (context, continuation), (logprob, _greedy) in zip(pairs, got):
        ctx = tok(context, add_special_tokens=False).input_ids
        whole = tok(context + continuation, add_special_tokens=False).input_ids
        ids = torch.tensor([whole])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits.float()[0, :-1], -1)
        want = sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))
        assert logprob == pytest.approx(want, abs=1e-3)


def test_save_pretrained_refuses_a_state_dict_under_other_names(tiny_llama_dir, tmp_path):
    """A trainer's state dict whose adapter keys carry another prefix (DDP's ``module.``) would leave
    the model's own values saved in silence: refused instead."""
    model = prepared(tiny_llama_dir)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match="none or only some under this model's names"):
        model.save_pretrained(tmp_path / "a", state_dict=state)
    model.save_pretrained(tmp_path / "b", state_dict=model.state_dict())  # the model's own names: fine

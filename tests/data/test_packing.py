"""Packed training keeps attention inside each example: through ``train()``, a packed block gives
the same step loss and the same gradients as the same examples unpacked.

The rule lives in one place (:func:`qolora.data.tokens.model_inputs`: packed batches run without an
attention mask) and the loop's loss goes through it for training and eval.
"""

import json

import pytest
import torch

from qolora import prepare
from qolora.adapters.layer import adapter_parameters
from qolora.data.tokens import PaddingCollator, load_records, model_inputs, tokenize_dataset
from qolora.training.loop import TrainConfig, loss_sum, train
from tiny_models import make_tiny_llama
from tiny_tokenizer import make_tiny_tokenizer

QA = [("What is the capital of France?", "Paris."), ("Hello, how are you?", "I am fine, thank you."),
      ("Who wrote Hamlet?", "Shakespeare."), ("How many legs does a spider have?", "Eight legs."),
      ("Which planet is largest?", "Jupiter."), ("Tell me a joke.", "No.")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packing")
    make_tiny_llama(folder / "model")
    make_tiny_tokenizer(folder / "model")
    data = folder / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]})
                            + "\n" for q, a in QA))
    tok = make_tiny_tokenizer()
    records = load_records(data)
    packed, _ = tokenize_dataset(records, tok, max_length=256, packing=True)
    unpacked, _ = tokenize_dataset(records, tok, max_length=256)
    assert len(packed) == 1 and len(unpacked) == len(QA)  # one block holding every example
    return folder, tok, packed, unpacked


def _model(folder):
    return prepare(folder / "model", 4, 4, device="cpu", progress=False)


def _gradients(model, batch):
    model.zero_grad(set_to_none=True)
    loss = loss_sum(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in adapter_parameters(model)}


def test_a_packed_block_trains_like_its_examples_unpacked(setup, tmp_path):
    folder, tok, packed, unpacked = setup
    results = {}
    for name, dataset in (("packed", packed), ("unpacked", unpacked)):
        config = TrainConfig(output_dir=str(tmp_path / name), max_steps=1, batch_size=len(dataset), lr=1e-3,
                             optim="adamw", eval_every=0, save_every=0, n_samples=0, progress=False,
                             gradient_checkpointing=False, group_by_length=False)
        model = _model(folder)
        result = train(model, tok, dataset, dataset, config)
        results[name] = (result, {n: p.detach().clone() for n, p in adapter_parameters(model)})
    (packed_run, packed_weights), (plain_run, plain_weights) = results["packed"], results["unpacked"]
    assert packed_run.history[0]["label_tokens"] == plain_run.history[0]["label_tokens"]
    assert packed_run.history[0]["loss"] == pytest.approx(plain_run.history[0]["loss"], abs=1e-4)
    assert packed_run.history[0]["grad_norm"] == pytest.approx(plain_run.history[0]["grad_norm"], rel=1e-4)
    assert packed_run.evals[0]["eval_loss"] == pytest.approx(plain_run.evals[0]["eval_loss"], abs=1e-4)
    for name, weight in packed_weights.items():
        torch.testing.assert_close(weight, plain_weights[name], rtol=1e-4, atol=1e-6)


def test_the_loop_loss_gives_packed_and_unpacked_the_same_gradients(setup):
    folder, tok, packed, unpacked = setup
    collate = PaddingCollator(tok.pad_token_id)
    model = _model(folder)
    loss_packed, grads_packed = _gradients(model, collate(list(packed)))
    loss_plain, grads_plain = _gradients(model, collate(list(unpacked)))
    torch.testing.assert_close(loss_packed, loss_plain, rtol=1e-5, atol=1e-4)
    for name, grad in grads_packed.items():
        torch.testing.assert_close(grad, grads_plain[name], rtol=1e-4, atol=1e-6)


def test_packed_batches_run_without_an_attention_mask(setup):
    _, tok, packed, unpacked = setup
    collate = PaddingCollator(tok.pad_token_id)
    assert set(model_inputs(collate(list(packed)))) == {"input_ids", "position_ids"}
    assert set(model_inputs(collate(list(unpacked)))) == {"input_ids", "attention_mask"}

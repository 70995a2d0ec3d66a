"""Fine-tune a causal LM with qolora's library API, step by step (``qolora finetune`` does the same).

    python scripts/finetune.py                                   # built-in model and data
    python scripts/finetune.py --model path/to/model --data chat.jsonl --steps 300

prepare (4-bit base + OLoRA adapters) -> data (tokenize with prompt masking, hold out a few) ->
train (eval loss, samples, checkpoints) -> save the adapter.
"""

import argparse
import logging

from transformers import AutoTokenizer

import qolora
from qolora import TrainConfig, train
from qolora.data.assets import default_dataset_path, default_model_dir
from qolora.data.tokens import load_records, split_train_eval, tokenize_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--data", default=None, help="data file (default: built-in chatterbot conversations)")
    parser.add_argument("--out", default="qolora-example", help="output folder")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    model_dir = args.model or default_model_dir()
    data = args.data or default_dataset_path()

    # 1. Data first: it is cheap, and a bad file should fail before the model loads.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, stats = tokenize_dataset(load_records(data), tokenizer, max_length=128, mask_prompt=True)
    train_set, eval_set = split_train_eval(examples, eval_fraction=0.05, seed=0)
    print(f"{stats.n_examples} examples: {len(train_set)} train, {len(eval_set)} eval")

    # 2. The model: the base quantized once to 4-bit NF4, OLoRA adapters of rank 16 on every linear layer.
    model = qolora.prepare(model_dir, bits=4, rank=16, init="olora", gradient_checkpointing=True)
    print(model.qolora.report.summary())

    # 3. Train the adapters (paged 8-bit AdamW, warmup + cosine, eval + samples + checkpoints).
    config = TrainConfig(output_dir=args.out, max_steps=args.steps, batch_size=8, eval_every=20, save_every=20,
                         overwrite=True)
    result = train(model, tokenizer, train_set, eval_set, config)
    print(result.summary())
    for sample in result.samples:
        print(f"\nreference: {sample['reference']}\nbefore:    {sample['before']}\nafter:     {sample['after']}")

    # 4. Save the adapter (reload it with qolora.load(base, adapter); merge it with `qolora merge`).
    print("\nadapter saved to", qolora.save_adapter(model, f"{args.out}/adapter", overwrite=True))


if __name__ == "__main__":
    main()

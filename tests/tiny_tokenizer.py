"""A tiny, fully offline chat tokenizer for fast tests.

:func:`make_tiny_tokenizer` trains a byte-level BPE (vocabulary 384, well under 512) in-process on
a few hundred words of embedded English text, wraps it as a
:class:`~transformers.PreTrainedTokenizerFast` and gives it ChatML special tokens and a ChatML
chat template (``<|im_start|>role\\ncontent<|im_end|>\\n``, with ``add_generation_prompt``).
Byte-level BPE means any text encodes without unknown tokens. Like SmolLM2, it adds no special
tokens on its own (the chat template carries them), its EOS is ``<|im_end|>`` and it has a
separate pad token.

The special tokens sit in the base vocabulary, so ``tokenizer.vocab_size == len(tokenizer)``:
use that as a tiny model's ``vocab_size``. Training takes a few milliseconds; the result is
cached per process (a fresh copy is returned each call, so tests may mutate it).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 384
PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "<|im_end|>"
IM_START = "<|im_start|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, IM_START, EOS_TOKEN]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """
The quick brown fox jumps over the lazy dog. A small model learns from a small amount of text,
and a tiny tokenizer keeps the tests fast. What is the capital of France? The capital of France
is Paris. What is the capital of Germany? The capital of Germany is Berlin. Hello, how are you
today? I am fine, thank you. What is your name? My name is Tiny, and I am a test assistant.
Please answer the question in one short sentence. The user asks a question and the assistant
gives an answer. Instruction: write a short poem about the sea. Response: The sea is wide and
blue, the waves are old and new. Input: a list of numbers. Output: the sum of the numbers.
One, two, three, four, five, six, seven, eight, nine, ten. 0 1 2 3 4 5 6 7 8 9 10 100 1000.
Python is a programming language. Functions return values; classes hold data and methods.
def add(a, b): return a + b. print("hello world"). import torch. x = [1, 2, 3].
Learning rate, batch size, gradient, loss, weight, adapter, rank, alpha, dropout, training,
evaluation, token, tokens, sequence, length, padding, label, labels, mask, prompt, completion.
Good morning! Good night. See you later. Thanks a lot. You are welcome. Yes. No. Maybe.
The weather is nice today. It is raining outside. I like to read books and drink coffee.
Computers process data very quickly. Memory and storage are not the same thing. A quantized
model stores its weights with fewer bits, which saves memory but loses a little precision.
Orthonormal matrices have columns of unit length that are orthogonal to each other. The QR
decomposition writes a matrix as an orthonormal matrix times an upper triangular matrix.
Tell me a joke. Why did the chicken cross the road? To get to the other side. That is funny.
Who wrote Hamlet? William Shakespeare wrote Hamlet. When did the war end? It ended long ago.
How many legs does a spider have? A spider has eight legs. Which planet is the largest?
Jupiter is the largest planet in the solar system. Water boils at one hundred degrees.
"""


@functools.lru_cache(maxsize=1)
def _trained_backend() -> Tokenizer:
    """Train (once per process) the byte-level BPE backend."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    tokenizer.train_from_iterator(lines * 4, trainer=trainer)
    return tokenizer


def make_tiny_tokenizer(tmp_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Build the tiny ChatML tokenizer.

    Args:
        tmp_dir: If given, the tokenizer is also saved there (``save_pretrained``) and reloaded
            from it, so the returned object behaves exactly like one loaded from a folder and the
            folder can be passed to code that expects a model/tokenizer path.

    Returns:
        A fast tokenizer with ``bos_token="<s>"``, ``eos_token="<|im_end|>"``,
        ``pad_token="<pad>"``, a ChatML ``chat_template`` and ``vocab_size == len(tokenizer)
        <= 512``.
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=copy.deepcopy(_trained_backend()),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        model_max_length=2048,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if tmp_dir is not None:
        tokenizer.save_pretrained(str(tmp_dir))
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tmp_dir))
    return tokenizer

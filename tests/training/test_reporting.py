"""qolora.training.reporting: the loss plot's running mean (a step's loss swings with its batch; the mean shows
the trend); the samples say when a system prompt comes from the chat template, not the record."""

from __future__ import annotations

import datasets

from qolora.data.tokens import tokenize_dataset
from qolora.training.reporting import plot_losses, running_mean
from tiny_tokenizer import make_tiny_tokenizer


def test_running_mean_averages_the_last_window_values():
    assert running_mean([1, 2, 3, 4], 2) == [1.0, 1.5, 2.5, 3.5]
    assert running_mean([5.0], 3) == [5.0]


def test_the_plot_draws_the_mean_beside_each_step(tmp_path, monkeypatch):
    import matplotlib.axes

    labels = []
    real = matplotlib.axes.Axes.plot

    def plot(self, *args, **kwargs):
        labels.append(kwargs.get("label"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    history = [{"step": i, "loss": 3.0 + (i % 3)} for i in range(1, 41)]
    assert plot_losses(history, [{"step": 40, "eval_loss": 2.9}], tmp_path / "loss.png").is_file()
    assert labels == ["train (each step one batch: swings with its examples)", "train (mean of the last 5 steps)",
                      "eval"]


SMOL_LIKE_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named Tiny<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_samples_say_where_a_template_system_prompt_comes_from(tmp_path):
    from qolora.training.reporting import sample_prompts, template_system_prompt, write_samples

    tok = make_tiny_tokenizer()
    assert template_system_prompt(tok) is None
    tok.chat_template = SMOL_LIKE_TEMPLATE
    assert template_system_prompt(tok) == "You are a helpful AI assistant named Tiny"
    ds = datasets.Dataset.from_list([
        {"messages": [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"},
                      {"role": "assistant", "content": "Because."}]}])
    tokenized, _ = tokenize_dataset(ds, tok, max_length=64)
    samples = sample_prompts(tokenized, tok, 2)
    assert samples[0]["system_from_template"] == "You are a helpful AI assistant named Tiny"
    assert samples[1]["system_from_template"] is None  # the record's own system message
    write_samples(tmp_path / "samples.json", tmp_path / "samples.md",
                  [{**s, "before": "a", "after": "b"} for s in samples])
    assert "is the chat template's default" in (tmp_path / "samples.md").read_text()

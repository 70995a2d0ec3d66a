"""Data in: records loaded and rendered as conversations, tokenized into prompt-masked examples; the
model folder's tokenizer; the built-in offline model and data set."""

"""Training a prepared qolora model: a small, exact, resumable loop.

:func:`train` runs AdamW (bitsandbytes' paged 8-bit by default) on the adapter weights only::

    for step in 1..max_steps:
        indices  = next batch_size * grad_accum positions of a seeded per-epoch order
                   (shuffled; batches of similar length formed inside windows of 8 batches)
        n_labels = label tokens in the whole accumulated batch
        for each micro-batch:  (sum of token cross-entropies / n_labels).backward()
        clip grad norm -> optimizer step -> LR step (linear warmup, cosine to min_lr_ratio)

Dividing every micro-batch by the label tokens of the *whole* accumulated batch makes the update the
token mean over that batch, so ``grad_accum=2, batch_size=4`` gives the update of ``batch_size=8``.

Around the loop: an eval loss at step 0, every ``eval_every`` steps and at the end; ``metrics.jsonl``,
``loss.png`` and greedy sample answers before and after training (:mod:`qolora.training.reporting`);
checkpoints every ``save_every`` steps (:mod:`qolora.checkpointing`). ``resume=True`` continues from
the newest complete checkpoint with the optimizer, scheduler, RNG and data position it saved, so the
resumed run computes exactly what the uninterrupted one would have. A non-finite loss stops the run
with :class:`TrainingError` before the optimizer touches the weights; the last checkpoint stays the
last good one.

The pieces live beside it: options and results in :mod:`qolora.training.options`, the example order
in :mod:`qolora.training.data_order`, precision / optimizer / schedule in :mod:`qolora.training.optim`, the loss in
:func:`loss_sum` (one place: training and eval), checkpoints in :mod:`qolora.training.checkpoints`,
metrics and samples in :mod:`qolora.training.reporting`. :func:`qolora.training.finetune.finetune` is the whole job.

Under ``torchrun --nproc_per_node N`` (or ``accelerate launch``) the same call trains data parallel
(:mod:`qolora.training.distributed`): every rank draws the same global order, takes its ``batch_size`` slice of
each global micro-batch of ``N * batch_size``, normalises by the label tokens of the whole global
batch and sums the adapter gradients over the ranks before clipping, so the run computes the update
of one process with ``batch_size = N * batch_size``. Rank 0 alone writes metrics, plot, samples and
checkpoints; a checkpoint records the world size and every rank's RNG states.

``TrainConfig(fsdp=True)`` shards the 4-bit base over the ranks with FSDP2 (:mod:`qolora.training.fsdp`) before
the optimizer is built: the same steps (FSDP sums the adapter gradients instead of the loop), and
checkpoints in the data-parallel format (whole adapter weights, the optimizer state keyed by parameter
name). Sample answers are skipped under it (generation would need every rank in step), and an eval
rank without examples in the last global batch still runs a forward so FSDP's collectives match.

The output folder (:class:`qolora.training.run_folder.RunFolder`) is qolora's while a run holds its
lock (:meth:`RunFolder.claimed`): a second run on the same folder is refused. Starting over
(``overwrite``) deletes only what qolora can prove it wrote: its run files, checkpoints that carry its
manifest, an adapter folder that carries its record; anything else in the folder is left alone.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..adapters.layer import adapter_parameters, adapter_state_dict
from ..data.tokens import IGNORE_INDEX, DataError, PaddingCollator, model_inputs
from ..errors import ConfigError
from ..memory.chunked_loss import causal_lm_loss_sum
from ..memory.gradient_checkpointing import enable_gradient_checkpointing, find_offloaded_checkpointing
from ..model.record import record_of
from . import checkpoints as ckpt
from . import distributed as dist
from . import fsdp as fsdp_mod
from . import reporting
from .auto_choices import (
    Choice,
    apply_checkpointing,
    current_checkpointing,
    is_out_of_memory,
    next_checkpointing,
    resolve_checkpointing,
    resolve_kernels,
)
from .data_order import DataOrder, scan_dataset
from .optim import lr_factor, make_optimizer, resolve_precision
from .options import DEFAULT_LR, MIXED_PRECISION, OPTIMIZERS, TrainConfig, TrainingError, TrainResult, default_lr
from .run_folder import RunFolder, refuse_resume, resume_problems, trajectory

__all__ = [
    "DEFAULT_LR", "MIXED_PRECISION", "OPTIMIZERS", "DataOrder", "TrainConfig", "TrainResult", "TrainingError",
    "loss_sum", "lr_factor", "make_optimizer", "resolve_precision", "train",
]

logger = logging.getLogger(__name__)

def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's label tokens, fp32 (training and eval).

    The forward inputs come from :func:`qolora.data.tokens.model_inputs`, which enforces the packing rule
    (packed blocks run without an attention mask, so attention stays inside each example); the loss
    is :func:`qolora.memory.chunked_loss.causal_lm_loss_sum`, which never holds the full fp32 logits.
    """
    inputs = model_inputs(batch)
    return causal_lm_loss_sum(model, inputs["input_ids"], batch["labels"], attention_mask=inputs.get("attention_mask"),
                              position_ids=inputs.get("position_ids"), ignore_index=IGNORE_INDEX)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all CUDA devices too


def _check_dataset(dataset, what: str, *, required: bool) -> None:
    if dataset is None:
        if required:
            raise DataError(f"{what} is None")
        return
    if len(dataset) == 0:
        raise DataError(f"{what} is empty")
    row = dataset[0]
    missing = [c for c in ("input_ids", "labels") if c not in row]
    if missing:
        raise DataError(f"{what} has no {missing} column(s): pass a dataset from qolora.data.tokens.tokenize_dataset "
                        f"(columns found: {sorted(row)})")


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, falling back to EOS (logged)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has neither a pad token nor an EOS token to pad with")
    logger.info("tokenizer has no pad token: padding with EOS (%r)", tokenizer.eos_token)
    return int(tokenizer.eos_token_id)


# ------------------------------------------------------------------------------------ the run
class _Run:
    """State and steps of one :func:`train` call (the public function only wires it up)."""

    def __init__(self, model, tokenizer, train_dataset, eval_dataset, config: TrainConfig, folder: RunFolder):
        self.model, self.tokenizer, self.config, self.folder = model, tokenizer, config, folder
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.device = next(model.parameters()).device
        self.world = dist.world()  # data parallel: each rank trains on its slice of every global micro-batch
        self.fsdp = config.fsdp
        self.model_fp = ckpt.model_fingerprint(model)
        if self.fsdp:  # before the optimizer: it must hold the sharded parameters
            fsdp_mod.shard_model(model)
            if config.n_samples or config.sample_prompts:
                logger.info("FSDP: sample answers are skipped (generation would need every rank in step)")
        self.precision, self.autocast, self.scaler = resolve_precision(config.mixed_precision, self.device)
        self.params = [p for _, p in adapter_parameters(model)]
        self.record = record_of(model)
        init = self.record.config.init if self.record is not None else None
        self.lr, why = (config.lr, "set in TrainConfig") if config.lr is not None else default_lr(init)
        logger.info("learning rate %.3g (%s)", self.lr, why)
        self.lr_reason = why
        self.optimizer = make_optimizer(config.optim, self.params, self.lr, config.weight_decay)
        factor = functools.partial(lr_factor, warmup=config.warmup, max_steps=config.max_steps,
                                   min_ratio=config.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.collate = PaddingCollator(pad_token_id(tokenizer))
        self.data_fp, lengths = scan_dataset(train_dataset)
        self.lengths = lengths
        self.checkpointing = config.gradient_checkpointing  # concrete once choose_automatic() ran
        self.choices: list[Choice] = []  # the automatic choices of this launch (logged, in metrics.jsonl)
        # One global order on every rank; grouped by the *global* effective batch, so N processes of
        # batch b see exactly the batches of one process of batch N * b.
        self._order_args = ({"lengths": lengths, "batch": self.world.size * config.batch_size * config.grad_accum}
                            if config.group_by_length else {})
        self.order = DataOrder(len(train_dataset), config.seed, **self._order_args)
        self.metrics = (reporting.MetricsLog(folder.metrics) if self.world.is_main
                        else dist.NullMetrics(folder.metrics))
        self.step = 0
        self.history: list[dict] = []
        self.evals: list[dict] = []
        self.samples: list[dict] = []
        self.last_checkpoint: Path | None = None
        self.resumed_from: Path | None = None
        self._eval_filler: list[int] = []
        self.eval_batches = self._eval_batches()
        self.loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] = loss_sum
        self._window = {"tokens": 0, "seconds": 0.0}

    # ------------------------------------------------------------------------------ batches
    def _eval_batches(self) -> list[list[int]]:
        """Eval indices in length order (less padding), cut into micro-batches (this rank's slices of the
        global ones in a distributed run)."""
        if self.eval_dataset is None:
            return []
        n = len(self.eval_dataset)
        if self.config.max_eval_examples is not None:
            n = min(n, self.config.max_eval_examples)
        idx = sorted(range(n), key=lambda i: len(self.eval_dataset[i]["input_ids"]))
        size = self.config.eval_batch_size or self.config.batch_size
        w = self.world
        batches = [idx[i: i + w.size * size] for i in range(0, n, w.size * size)]
        self._eval_filler = idx[:1]  # the forward an FSDP rank without examples still runs
        return [b[w.rank * size: (w.rank + 1) * size] for b in batches]

    def _batch(self, dataset, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = self.collate([dataset[i] for i in indices])
        return {k: v.to(self.device) for k, v in batch.items()}

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.autocast():
            return self.loss_fn(self.model, batch)

    # --------------------------------------------------------------------------------- steps
    def train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its history entry."""
        cfg, w, b = self.config, self.world, self.config.batch_size
        indices = self.order.take(w.size * b * cfg.grad_accum)  # the global accumulated batch
        mine = slice(w.rank * b, (w.rank + 1) * b)  # this rank's part of each global micro-batch
        micro = [self._batch(self.train_dataset, indices[i: i + w.size * b][mine])
                 for i in range(0, len(indices), w.size * b)]
        n_labels, tokens = (int(x) for x in dist.all_reduce_sum(
            [sum(int((m["labels"][:, 1:] != IGNORE_INDEX).sum()) for m in micro),
             sum(int(m["attention_mask"].sum()) for m in micro)]))
        lr = self.scheduler.get_last_lr()[0]
        rng = ckpt.rng_state() if self._can_fall_back() else None  # a retried step draws the same numbers
        while True:
            failure = None
            try:
                total = self._accumulate(micro, n_labels)
            except Exception as exc:  # noqa: BLE001 - only an out-of-memory error under "auto" is retried
                if rng is None or not is_out_of_memory(exc):
                    raise
                failure = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
                notch = next_checkpointing(self.checkpointing, self._num_layers(), self.device.type)
                if notch is None:
                    raise
            if failure is None:
                break
            # Outside the except clause: the failed attempt's frames (and their tensors) are gone now.
            self._fall_back(self.step + 1, notch, failure, rng)
        if not self.fsdp:  # FSDP reduce-scatters (sums) the gradients itself in the backward
            dist.all_reduce_grads(self.params)  # sum over ranks: the gradient of the global batch's mean
        step = self.step + 1
        loss = dist.all_reduce_sum([float(total)])[0] / max(1, n_labels)
        if not math.isfinite(loss):
            self._fail(step, f"the training loss is {loss} at step {step}")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped (and the scale lowered) on inf/NaN gradients
            self.scaler.update()
        elif not math.isfinite(grad_norm):
            self._fail(step, f"the gradient norm is {grad_norm} at step {step} (loss {loss:.4f})")
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = step
        entry = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                 "label_tokens": n_labels}
        self.history.append(entry)
        return entry

    def _accumulate(self, micro: list[dict[str, torch.Tensor]], n_labels: int) -> torch.Tensor:
        """Forward and backward over the micro-batches (gradients accumulate); the summed loss."""
        total = torch.zeros((), device=self.device)
        for batch in micro:
            loss_sum = self._loss_sum(batch)
            loss = loss_sum / max(1, n_labels)  # token mean over the *accumulated* (global) batch
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += loss_sum.detach()
        return total

    # ------------------------------------------------------------------------ automatic choices
    def _num_layers(self) -> int:
        from .auto_choices import _layer_count

        return _layer_count(self.model) or 1

    def _can_fall_back(self) -> bool:
        """A step that runs out of memory is retried one notch lower under ``gradient_checkpointing="auto"``
        (one process only: in a distributed run the other ranks' collectives would not wait for a retry)."""
        return self.config.gradient_checkpointing == "auto" and self.world.size == 1

    def _fall_back(self, step: int, notch, failure: str, rng: dict) -> None:
        """Undo what the failed attempt left (gradients, freed memory, RNG), then checkpoint one notch more.
        The optimizer, scheduler and data order were not touched by it."""
        import gc

        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        ckpt.set_rng_state(rng)
        before, self.checkpointing = self.checkpointing, notch
        apply_checkpointing(self.model, notch)
        logger.warning("step %d ran out of memory with gradient_checkpointing=%r (%s): falling back to %r and "
                       "running the step again", step, before, failure, notch)
        self.metrics.write("fallback", step=step, option="gradient_checkpointing", before=before, after=notch,
                           error=failure)

    def choose_automatic(self) -> None:
        """Resolve ``gradient_checkpointing="auto"`` and ``kernels="auto"`` for this job (see
        :mod:`qolora.training.auto_choices`), apply them, and log them. Decided once, on rank 0, for every rank."""
        from ..adapters.compiled_layers import compile_decoder_layers, compiled_layer_count
        from ..adapters.layer import adapter_layers

        cfg = self.config
        longest = max(self.lengths) if len(self.lengths) else 1
        mean = float(np.mean(self.lengths)) if len(self.lengths) else 1.0
        choices: list[Choice] = []
        if cfg.gradient_checkpointing == "auto":
            current = current_checkpointing(self.model)
            if current is not False:  # set explicitly at prepare (or by the caller): kept
                choices.append(Choice("gradient_checkpointing", "auto", current, "the model's own setting (given to "
                                      "qolora.prepare or enable_gradient_checkpointing): kept"))
            elif self.fsdp:
                choices.append(Choice("gradient_checkpointing", "auto", True, "FSDP: every layer checkpointed (the "
                                      "plan is per process, the shards' gathers must match)"))
            else:
                choices.append(dist.on_main(lambda: resolve_checkpointing(
                    self.model, seq_len=int(longest), batch_size=cfg.batch_size, optim=cfg.optim, device=self.device,
                    grad_accum=cfg.grad_accum, processes=self.world.size)))
        kernels = {layer.kernels for _, layer in adapter_layers(self.model)}
        if kernels == {"auto"} and not compiled_layer_count(self.model):
            choices.append(resolve_kernels(self.model, max_steps=cfg.max_steps,
                                           tokens_per_step=mean * cfg.batch_size * cfg.grad_accum,
                                           varying_lengths=int(min(self.lengths, default=1)) != int(longest),
                                           device=self.device, fsdp=self.fsdp))
        for choice in choices:
            logger.info("%s", choice.log_line())
            if choice.option == "gradient_checkpointing":
                self.checkpointing = choice.value
            elif choice.value == "compile":
                compile_decoder_layers(self.model)
        self.choices = choices

    def automatic_record(self) -> list[dict]:
        return [c.to_dict() for c in self.choices]

    def timed_step(self) -> tuple[dict, float]:
        """:meth:`train_step`, timed into the throughput window of the next ``train`` event."""
        tick = time.perf_counter()
        entry = self.train_step()
        seconds = time.perf_counter() - tick
        self._window["seconds"] += seconds
        self._window["tokens"] += entry["tokens"]
        return entry, seconds

    def _fail(self, step: int, what: str) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                 else "no checkpoint was saved yet")
        message = (f"{what}: stopping before the optimizer step, nothing was saved for this step; {where}. "
                   "Try a lower learning rate, max_grad_norm, or mixed_precision='no'/'bf16'")
        self.metrics.write("error", step=step, message=message)
        raise TrainingError(message)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-mean loss over the eval examples (None without eval data)."""
        if not self.eval_batches:
            return None
        was_training = self.model.training
        self.model.eval()
        from tqdm.auto import tqdm

        total, count = 0.0, 0
        n_examples = sum(len(b) for b in self.eval_batches)
        if not self.config.progress:  # the bar says it otherwise
            logger.info("step %d: eval on %d examples (%d batches)...", self.step, n_examples, len(self.eval_batches))
        bar = tqdm(total=n_examples, desc=f"eval (step {self.step})", unit="example", leave=False,
                   disable=not (self.config.progress and self.world.is_main), dynamic_ncols=True)
        try:
            with bar:
                for indices in self.eval_batches:
                    if not indices:  # a rank with no share of the last global batch
                        if self.fsdp:  # it must still join the layers' all-gathers: a forward, not counted
                            self._loss_sum(self._batch(self.eval_dataset, self._eval_filler))
                        continue
                    batch = self._batch(self.eval_dataset, indices)
                    total += float(self._loss_sum(batch))
                    count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                    bar.update(len(indices))
        finally:
            self.model.train(was_training)
        total, count = dist.all_reduce_sum([total, count])
        loss = total / max(1, count)
        self.evals.append({"step": self.step, "eval_loss": loss})
        self.metrics.write("eval", step=self.step, eval_loss=loss)
        logger.info("step %d: eval loss %.4f", self.step, loss)
        return loss

    # ---------------------------------------------------------------------------- checkpoints
    def _trajectory(self) -> dict:
        return trajectory(self.config, self.lr, self.precision)

    def save(self) -> Path:
        rngs = dist.gather(ckpt.rng_state())  # every rank's RNG states (dropout differs per rank)
        optimizer = (fsdp_mod.full_optimizer_state(self.model, self.optimizer) if self.fsdp
                     else self.optimizer.state_dict())  # FSDP: whole tensors, keyed by parameter name
        trainer = {"optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                   "rng": ckpt.rng_state()}
        if self.world.distributed:
            trainer["rng_ranks"] = rngs
        if self.scaler is not None:
            trainer["scaler"] = self.scaler.state_dict()
        state = {"data_position": self.order.position, "history": self.history, "evals": self.evals,
                 "trajectory": self._trajectory(), "train_config": self.config.to_dict(),
                 "model_fingerprint": self.model_fp, "data_fingerprint": self.data_fp, "world_size": self.world.size,
                 "adapter_config": self.record.config.to_dict() if self.record is not None else {}}
        # equal on every rank (FSDP: gathered from the shards): rank 0 writes it
        adapter = fsdp_mod.full_adapter_state(self.model) if self.fsdp else adapter_state_dict(self.model)

        def write() -> Path:
            path = ckpt.save_checkpoint(self.folder.checkpoints, self.step, adapter=adapter, trainer=trainer,
                                        state=state)
            ckpt.prune_checkpoints(self.folder.checkpoints, self.config.keep_last)
            return path

        path = dist.on_main(write)
        self.last_checkpoint = path
        self.metrics.write("checkpoint", step=self.step, path=str(path))
        logger.info("saved checkpoint %s", path)
        return path

    def restore(self, found: ckpt.Checkpoint) -> None:
        """Continue from ``found`` after checking it belongs to this model, data and options."""
        s = found.state
        problems = resume_problems(s, data_fp=self.data_fp, trajectory=self._trajectory(), model_fp=self.model_fp,
                                   world_size=self.world.size)
        names = {n for n, _ in adapter_parameters(self.model)}
        if not problems and set(found.adapter) != names:
            problems.append("its adapter weights have other names than this model's adapters")
        refuse_resume(found.path, problems)
        if self.fsdp:  # scattered back into the shards
            fsdp_mod.load_full_adapter_state(self.model, found.adapter)
            fsdp_mod.load_full_optimizer_state(self.model, self.optimizer, found.trainer["optimizer"])
        else:
            with torch.no_grad():
                for name, p in adapter_parameters(self.model):
                    p.copy_(found.adapter[name])
            self.optimizer.load_state_dict(found.trainer["optimizer"])
        self.scheduler.load_state_dict(found.trainer["scheduler"])
        if self.scaler is not None and "scaler" in found.trainer:
            self.scaler.load_state_dict(found.trainer["scaler"])
        ckpt.set_rng_state(found.trainer["rng_ranks"][self.world.rank] if "rng_ranks" in found.trainer
                           else found.trainer["rng"])
        pos = s["data_position"]
        self.order = DataOrder(len(self.train_dataset), self.config.seed, pos["epoch"], pos["index"],
                               **self._order_args)
        self.step, self.history, self.evals = found.step, list(s["history"]), list(s["evals"])
        self.last_checkpoint = self.resumed_from = found.path
        self.metrics.truncate_after(found.step)
        self.metrics.write("resume", step=found.step, checkpoint=str(found.path), automatic=self.automatic_record())
        self.samples = ([dict(x) for x in reporting.read_samples(self.folder.samples_json)] if self.world.is_main
                        else [])
        logger.info("resuming from %s (step %d of %d)", found.path, found.step, self.config.max_steps)

    # ----------------------------------------------------------------------------- reporting
    def is_log_step(self, step: int) -> bool:
        return step == 1 or step % self.config.log_every == 0 or step == self.config.max_steps

    def log_train(self) -> None:
        """A ``train`` event with the mean loss since the last one (taken from the history, so a resumed
        run logs the same losses as an uninterrupted one)."""
        every = self.config.log_every
        last = max(1 if self.step > 1 else 0, (self.step - 1) // every * every)  # the previous log step
        window = [h for h in self.history if h["step"] > last]
        seconds = self._window["seconds"]
        tokens_per_s = self._window["tokens"] / seconds if seconds > 0 else None
        memory = reporting.memory_in_use(self.device)
        loss = sum(h["loss"] for h in window) / len(window)
        self.metrics.write("train", step=self.step, loss=loss, lr=window[-1]["lr"], grad_norm=window[-1]["grad_norm"],
                           tokens=sum(h["tokens"] for h in window), tokens_per_s=tokens_per_s, memory_bytes=memory,
                           epoch=round(self.order.epoch + self.order.index / self.order.n, 4))
        self._window = {"tokens": 0, "seconds": 0.0}
        steps = f"step {window[0]['step']}" if len(window) == 1 else f"steps {window[0]['step']}-{self.step}"
        logger.info("step %d/%d: train loss %.4f (mean of %s), lr %.3g, %s tok/s, %s", self.step,
                    self.config.max_steps, loss, steps, window[-1]["lr"],
                    f"{tokens_per_s:.0f}" if tokens_per_s else "?", reporting.format_bytes(memory))

    def plot(self) -> Path | None:
        return dist.on_main(lambda: reporting.plot_losses(self.history, self.evals, self.folder.loss_plot),
                            share_result=False)

    def generate_samples(self, stage: str) -> None:
        """Answer the sample prompts (rank 0 only; the others wait for it; skipped under FSDP)."""
        if self.fsdp:
            return
        dist.on_main(lambda: self._generate_samples(stage), share_result=False)

    def _generate_samples(self, stage: str) -> None:
        cfg = self.config
        if not self.samples:
            prompts = reporting.sample_prompts(self.eval_dataset, self.tokenizer, cfg.n_samples, cfg.sample_prompts)
            self.samples = [{"prompt": p["prompt"], "prompt_ids": p["prompt_ids"], "reference": p["reference"],
                             "system_from_template": p.get("system_from_template"), "before": None, "after": None}
                            for p in prompts]
        if not self.samples:
            return
        n = len(self.samples)
        logger.info("answering %d sample prompt(s) %s training (greedy, up to %d new tokens each)...", n, stage,
                    cfg.max_new_tokens)

        def answered(i: int, answer: str) -> None:  # progress: one log line per answer as it comes
            prompt, injected = self.samples[i]["prompt"], self.samples[i].get("system_from_template")
            shown = prompt.replace(injected, "") if injected else prompt  # the template's, not the data's
            logger.info("sample %d/%d (%s training) %r -> %r", i + 1, n, stage, reporting.prompt_preview(shown, 60),
                        answer)

        answers = reporting.generate(self.model, self.tokenizer, self.samples, cfg.max_new_tokens, self.autocast,
                                     on_answer=answered)
        for s, a in zip(self.samples, answers):
            s[stage] = a
        self.metrics.write("samples", step=self.step, stage=stage,
                           answers=[{"prompt": s["prompt"], stage: s[stage]} for s in self.samples])
        reporting.write_samples(self.folder.samples_json, self.folder.samples_md, self.samples,
                                steps=self.step if stage == "after" else None)


def _set_gradient_checkpointing(model: nn.Module, on: bool | str | int) -> None:
    """True: checkpointing on (offloaded if the model was prepared so); ``"offload"``: on and offloaded; an integer
    ``n``: only the first ``n`` decoder layers; False: off."""
    if not isinstance(on, (bool, str)):  # a layer count: set exactly as asked
        enable_gradient_checkpointing(model, layers=on)
        return
    active = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x name
    active = bool(getattr(model, "is_gradient_checkpointing", False) if active is None else active)
    offloaded = active and find_offloaded_checkpointing(model) is not None
    if (on and not active) or (on == "offload" and not offloaded):
        if not hasattr(model, "gradient_checkpointing_enable"):
            logger.warning("%s does not support gradient checkpointing; training without it", type(model).__name__)
            return
        enable_gradient_checkpointing(model, offload=on == "offload")
    elif not on and active:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


# ------------------------------------------------------------------------------------- public
def train(
    model: nn.Module,
    tokenizer,
    train_dataset,
    eval_dataset=None,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
) -> TrainResult:
    """Train the adapters of a prepared model (see the module docstring for the loop).

    Args:
        model: a model from :func:`qolora.prepare` (only its adapter weights are trained).
        tokenizer: its tokenizer (padding, sample prompts and answers).
        train_dataset: tokenized examples with ``input_ids`` and ``labels`` (and optionally
            ``position_ids``), e.g. from :func:`qolora.data.tokens.tokenize_dataset`.
        eval_dataset: held-out examples of the same form, or None (no eval loss, no held-out samples).
        config: the options; None = ``TrainConfig()``.
        resume: continue from the newest complete checkpoint in ``output_dir/checkpoints`` (a
            corrupted newest one is skipped with a warning); without any checkpoint, start afresh.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError: bad options, an unwritable ``output_dir`` or one holding an earlier run (without
            ``resume`` / ``overwrite``), a model without adapters; all before training starts.
        DataError: an empty dataset or one without ``input_ids`` / ``labels``.
        CheckpointError: on resume, no checkpoint verifies, or the newest one belongs to another
            model, adapter setup, data set or set of training options.
        TrainingError: a non-finite loss or gradient (the message names the step).
    """
    started = time.perf_counter()
    config = (config if config is not None else TrainConfig()).validate()
    _check_dataset(train_dataset, "train_dataset", required=True)
    _check_dataset(eval_dataset, "eval_dataset", required=False)
    if next(adapter_parameters(model), None) is None:
        raise ConfigError(f"{type(model).__name__} has no qolora adapter layers to train; build it with qolora.prepare")
    with dist.session(next(model.parameters()).device):  # under torchrun / accelerate launch: data parallel
        if config.fsdp:
            _check_fsdp(model, config)
        folder = RunFolder.of(config.output_dir)
        # Rank 0 checks and writes the folder; its errors reach every rank (dist.on_main).
        dist.on_main(lambda: folder.check(resume, config.overwrite))
        run = _Run(model, tokenizer, train_dataset, eval_dataset, config, folder)  # may still refuse the precision
        with folder.claimed(resume, config.overwrite):
            return _train(run, resume, started)


def train_in(folder: RunFolder, model, tokenizer, train_dataset, eval_dataset, config: TrainConfig, *,
             resume: bool) -> TrainResult:
    """:func:`train` for a caller that has checked the options and data and holds ``folder``
    (:meth:`RunFolder.claimed`), as :func:`qolora.finetune` does: nothing is checked twice."""
    started = time.perf_counter()
    if config.fsdp:
        _check_fsdp(model, config)
    return _train(_Run(model, tokenizer, train_dataset, eval_dataset, config, folder), resume, started)


def _check_fsdp(model: nn.Module, config: TrainConfig) -> None:
    """One ConfigError listing why ``model`` cannot train sharded (before any folder work)."""
    problems = fsdp_mod.fsdp_problems(model)
    record = record_of(model)
    if record is not None and record.offload is not None:
        problems.append("the base is offloaded to host memory (offload): FSDP shards it instead; use offload=None")
    if config.optim != "adamw":
        problems.append(f"optim={config.optim!r} is a bitsandbytes optimizer, which cannot step FSDP's sharded "
                        "(DTensor) parameters; use optim='adamw'")
    if problems:
        raise ConfigError(["fsdp=True: " + p for p in problems])


def _train(run: _Run, resume: bool, started: float) -> TrainResult:
    """The run in its claimed folder: start or resume, the loop, the last eval, checkpoint and samples."""
    model, config, folder = run.model, run.config, run.folder
    run.choose_automatic()  # gradient_checkpointing / kernels "auto": for this job, logged in the start event
    resumed = _start_or_resume(run, resume)
    if config.gradient_checkpointing == "auto":
        apply_checkpointing(model, run.checkpointing)
    else:
        _set_gradient_checkpointing(model, config.gradient_checkpointing)
    try:
        if not resumed:
            run.generate_samples("before")
            run.evaluate()
        model.train()
        _loop(run)
        if run.eval_batches and (not run.evals or run.evals[-1]["step"] != run.step):
            run.evaluate()
        if run.last_checkpoint is None or run.last_checkpoint.name != ckpt.checkpoint_name(run.step):
            run.save()
        run.generate_samples("after")
    finally:
        model.eval()
    plot_path = run.plot()
    result = TrainResult(
        output_dir=folder.root, history=run.history, evals=run.evals, lr=run.lr, metrics_path=run.metrics.path,
        plot_path=plot_path, samples=[{k: s.get(k) for k in ("prompt", "reference", "before", "after",
                                                             "system_from_template")}
                                      for s in run.samples],
        samples_path=folder.samples_md if run.samples else None, last_checkpoint=run.last_checkpoint,
        resumed_from=run.resumed_from, seconds=time.perf_counter() - started, log_every=config.log_every,
    )
    run.metrics.write("end", step=run.step, final_eval_loss=result.final_eval_loss,
                      initial_eval_loss=result.initial_eval_loss, seconds=result.seconds)
    logger.info("training done: %s", result.summary())
    return result


def _start_or_resume(run: _Run, resume: bool) -> bool:
    """Restore the newest checkpoint (``resume``), or start a fresh run; True when resumed."""
    # read once on rank 0, sent to all
    found = dist.on_main(lambda: ckpt.find_resumable(run.folder.checkpoints)) if resume else None
    if found is not None:
        run.restore(found)
        return True
    if resume:
        logger.info("resume=True: %s holds no earlier run, starting one", run.folder.root)
    dist.on_main(run.folder.clear)
    _seed_everything(run.config.seed)
    run.metrics.reset()
    run.metrics.write(
        "start", step=0, lr=run.lr, lr_reason=run.lr_reason, mixed_precision=run.precision,
        device=str(run.device), world_size=run.world.size, n_train=len(run.train_dataset),
        n_eval=len(run.eval_dataset or ()),
        trainable_params=sum(p.numel() for p in run.params), train_config=run.config.to_dict(),
        adapter_config=run.record.config.to_dict() if run.record is not None else {},
        automatic=run.automatic_record(),
    )
    return False


def _loop(run: _Run) -> None:
    """Optimizer steps up to ``max_steps``, with logs, evals and checkpoints on their intervals."""
    from tqdm.auto import tqdm

    config = run.config
    bar = tqdm(total=config.max_steps, initial=run.step, desc="train", unit="step",
               disable=not (config.progress and run.world.is_main), dynamic_ncols=True)
    with bar:  # closed before the final eval and samples print below it
        while run.step < config.max_steps:
            entry, seconds = run.timed_step()
            bar.update(1)
            bar.set_postfix(step_loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}",
                            tok_s=f"{entry['tokens'] / max(1e-9, seconds):.0f}",
                            mem=reporting.format_bytes(reporting.memory_in_use(run.device)), refresh=False)
            if run.is_log_step(run.step):
                run.log_train()
            if run.step == config.max_steps:
                break
            if config.eval_every and run.step % config.eval_every == 0:
                run.evaluate()
                run.plot()
            if config.save_every and run.step % config.save_every == 0:
                run.save()

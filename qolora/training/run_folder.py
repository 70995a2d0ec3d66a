"""A run's output folder: what may be written there, what counts as an earlier run, resuming.

* :class:`RunFolder` names every part of the folder. :meth:`RunFolder.check` (before any heavy work): the
  folder can be created and written, does not hold an earlier run unless ``resume`` / ``overwrite``, and
  a ``resume`` has a checkpoint to resume; :meth:`RunFolder.claimed` checks, locks, checks again and
  removes a killed run's temporaries, once per run.
* :meth:`RunFolder.clear` (``overwrite``): deletes only what qolora can prove it wrote: its run files,
  checkpoints carrying its manifest, an adapter folder carrying its record. Anything else stays.
* :func:`check_resume` / :func:`resume_problems`: a checkpoint is continued only by the same data,
  options and adapter setup (:func:`trajectory` is what must match), checked before the model loads
  and again, with the model's fingerprint, when the loop restores it.

The run holds the folder's lock (:func:`qolora.files.folder_lock`) while it writes there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..files import folder_lock, remove_stale_temporaries
from ..model.adapter_folder import foreign_entries, remove_adapter_folder
from . import checkpoints as ckpt
from . import distributed as dist
from .data_order import scan_dataset
from .optim import resolve_precision
from .options import TrainConfig, default_lr

__all__ = ["METRICS_FILE", "RUN_FILES", "RunFolder", "check_resume", "refuse_resume", "resume_problems",
           "trajectory"]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
#: Files of a run that qolora writes at the top of ``output_dir``.
RUN_FILES = (METRICS_FILE, "loss.png", "samples.json", "samples.md")


@dataclass(frozen=True)
class RunFolder:
    """A run's output folder: the one place that names its parts and decides what may be written there.

    ``root/metrics.jsonl``, ``loss.png``, ``samples.json`` / ``samples.md`` (:data:`RUN_FILES`),
    ``checkpoints/step-NNNNNN`` and, at the end, ``adapter/``.
    """

    root: Path

    @classmethod
    def of(cls, output_dir: str | os.PathLike) -> RunFolder:
        return cls(Path(output_dir).expanduser())

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def samples_json(self) -> Path:
        return self.root / "samples.json"

    @property
    def samples_md(self) -> Path:
        return self.root / "samples.md"

    def is_run(self) -> bool:
        """Does it look like a qolora run folder (metrics written or checkpoints folder present)?"""
        return self.metrics.is_file() or self.checkpoints.is_dir()

    def check(self, resume: bool, overwrite: bool) -> None:
        """Check the folder before any heavy work: a folder (or creatable as one), writable, not an
        earlier run's folder unless ``resume`` or ``overwrite``, and, with ``resume``, holding a
        checkpoint when it holds an earlier run. Creates and deletes nothing.

        Raises:
            ConfigError: naming the folder and what to do.
        """
        out = self.root
        existing = out
        while not existing.exists() and existing != existing.parent:  # the folder that would hold it
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(f"output_dir {str(out)!r} cannot be created: {str(existing)!r} is not a folder")
        try:  # os.access is not enough (root, read-only mounts): really write a file
            fd, probe = tempfile.mkstemp(prefix=".qolora-write-probe-", dir=existing)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ConfigError(f"output_dir {str(out)!r} is not writable ({str(existing)!r}: "
                              f"{exc.strerror or exc})") from exc
        if existing != out:
            if resume:
                logger.warning("resume=True (--resume), but output_dir %s does not exist: starting a new run there",
                               out)
            return
        foreign = foreign_entries(self.adapter)
        if foreign or self.adapter.exists() and not self.adapter.is_dir():
            raise ConfigError(
                f"{str(self.adapter)!r} holds what qolora did not write ({', '.join(foreign[:5]) or 'a file'}); "
                "the run saves its adapter there at the end, so nothing was started. Move it away or choose "
                "another output_dir"
            )
        checkpoints = ckpt.list_checkpoints(self.checkpoints)
        earlier = [n for n in (*RUN_FILES, "adapter") if (out / n).exists()] + (["checkpoints"] if checkpoints else [])
        if earlier and not resume and not overwrite:
            raise ConfigError(
                f"output_dir {str(out)!r} already holds a training run ({', '.join(earlier)}); pass resume=True "
                "(--resume) to continue it, overwrite=True (--overwrite) to start over, or choose another output_dir"
            )
        if resume and not checkpoints and earlier and not overwrite:
            raise ConfigError(
                f"resume=True (--resume), but output_dir {str(out)!r} holds an earlier run ({', '.join(earlier)}) "
                "and no checkpoint to continue from; nothing was changed. Pass overwrite=True (--overwrite) to "
                "start over there, or choose another output_dir"
            )

    @contextlib.contextmanager
    def claimed(self, resume: bool, overwrite: bool) -> Iterator[RunFolder]:
        """Hold the folder's lock (:func:`qolora.files.folder_lock`) for the ``with`` block, check it now that
        no other run can change it, and delete what a killed run left half-written. Callers also
        :meth:`check` it before their heavy work (loading data, the model), so a bad folder fails fast.
        Under torchrun / accelerate every rank enters; rank 0 alone checks, locks and deletes, and its
        errors stop every rank (:mod:`qolora.training.distributed`).

        Raises:
            ConfigError: see :meth:`check`; FolderBusyError: another run holds the folder.
        """
        with dist.main_context(lambda: folder_lock(self.root)):
            dist.on_main(lambda: self.check(resume, overwrite))
            dist.on_main(self.remove_leftover_temporaries)  # no live writer there now: all are leftovers
            yield self

    def remove_leftover_temporaries(self) -> list[Path]:
        """Delete the temporaries a killed run left (checkpoints, the adapter, run files), whatever their age.

        Call it holding the folder's lock: no live process then writes there, so every temporary is a
        leftover (without the lock only old ones are, :func:`qolora.files.remove_stale_temporaries`).
        """
        removed = remove_stale_temporaries(self.checkpoints, "step-*", older_than_s=0, pattern=True)
        for name in ("adapter", *RUN_FILES):
            removed += remove_stale_temporaries(self.root, name, older_than_s=0)
        for path in removed:
            logger.info("removed %s, left by an interrupted run", path)
        return removed

    def clear(self) -> None:
        """Delete an earlier run's files (``overwrite``): only what qolora can prove it wrote."""
        for name in RUN_FILES:
            (self.root / name).unlink(missing_ok=True)
        for _, path in ckpt.list_checkpoints(self.checkpoints):
            ckpt.remove_checkpoint(path)
        with contextlib.suppress(OSError):  # left in place when it holds anything else
            self.checkpoints.rmdir()
        remove_adapter_folder(self.adapter)


# --------------------------------------------------------------------------------------- resume
def trajectory(config: TrainConfig, lr: float, precision: str) -> dict:
    """The options a resumed run must share with the checkpoint to continue it exactly."""
    c = config
    return {"lr": lr, "max_steps": c.max_steps, "batch_size": c.batch_size, "grad_accum": c.grad_accum,
            "warmup": c.warmup, "min_lr_ratio": c.min_lr_ratio, "weight_decay": c.weight_decay,
            "max_grad_norm": c.max_grad_norm, "optim": c.optim, "mixed_precision": precision,
            "seed": c.seed, "group_by_length": c.group_by_length, "fsdp": c.fsdp}


def resume_problems(state: dict, *, data_fp: str, trajectory: dict, model_fp: str | None = None,
                    adapter_config: dict | None = None, world_size: int = 1) -> list[str]:
    """Why a checkpoint's run state cannot be continued by this run (empty: it can).

    ``model_fp`` (the prepared model's fingerprint) or, before the model is loaded, ``adapter_config``
    (without ``device``) identify the model side. ``world_size`` is the number of data-parallel
    processes of this run: a checkpoint continues only under as many as saved it (checkpoints from
    before multi-process training have none recorded and count as one).
    """
    problems = []
    missing = [k for k in ("data_position", "history", "evals", "trajectory") if k not in state]
    if missing:
        return [f"its state.json lacks {missing} (edited by hand?)"]
    if model_fp is not None and state.get("model_fingerprint") != model_fp:
        problems.append("it was saved for a different model or adapter setup "
                        f"(adapter config then: {state.get('adapter_config')})")
    if adapter_config is not None:
        # A run saved before ``refine`` existed ran with refine=0.
        then = {"refine": 0, **{k: v for k, v in (state.get("adapter_config") or {}).items() if k != "device"}}
        now = {"refine": 0, **{k: v for k, v in adapter_config.items() if k != "device"}}
        if then != now:
            changed = [f"{k}: {then.get(k)!r} then, {now.get(k)!r} now"
                       for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
            problems.append(f"it was saved for another adapter setup ({'; '.join(changed)})")
    saved_world = int(state.get("world_size", 1))
    if saved_world != world_size:
        how = f"torchrun --nproc_per_node {saved_world}" if saved_world > 1 else "a single process"
        problems.append(f"it was saved by a run of {saved_world} process(es) and this run has {world_size} (each "
                        f"process's batch and data shard depend on it); resume it under {how}")
    if state.get("data_fingerprint") != data_fp:
        problems.append("it was trained on different training data (or another tokenization / split)")
    then = {"fsdp": False, **state["trajectory"]}  # checkpoints from before FSDP: data parallel
    changed = [f"{k}: {then.get(k)!r} then, {v!r} now" for k, v in trajectory.items() if then.get(k) != v]
    if changed:
        problems.append("training options differ (" + "; ".join(changed) + ")")
    return problems


def refuse_resume(path: Path, problems: list[str]) -> None:
    if problems:
        raise ckpt.CheckpointError(f"cannot resume from {path}: " + "; ".join(problems)
                                   + ". Resume with the same model, data and options, or start over "
                                   "(overwrite=True / --overwrite, or another output_dir)")


def check_resume(config: TrainConfig, train_dataset, adapter_config, world_size: int = 1) -> None:
    """Before the model loads: the newest checkpoint in ``output_dir`` verifies and belongs to this
    data, these options and this adapter setup (:func:`train` also checks the model's fingerprint).

    Raises:
        CheckpointError: no checkpoint verifies, or the newest one belongs to another run.
    """
    found = ckpt.find_resumable(RunFolder.of(config.output_dir).checkpoints)
    if found is None:
        return
    lr = config.lr if config.lr is not None else default_lr(adapter_config.init)[0]
    precision = resolve_precision(config.mixed_precision, adapter_config.torch_device)[0]
    refuse_resume(found.path, resume_problems(found.state, data_fp=scan_dataset(train_dataset)[0],
                                               trajectory=trajectory(config, lr, precision),
                                               adapter_config=adapter_config.to_dict(), world_size=world_size))

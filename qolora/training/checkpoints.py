"""Training checkpoints: written atomically, verified on read, restored so a run continues exactly.

One checkpoint is a folder ``output_dir/checkpoints/step-000050/``::

    adapter.safetensors   the trainable adapter weights (in-model names, their own dtype)
    trainer.pt            optimizer, LR scheduler and grad-scaler state dicts, and the RNG states
                          (python, numpy, torch CPU, every CUDA device)
    state.json            step, data position (epoch, index into that epoch's permutation), the
                          per-step history and eval losses so far, the TrainConfig, and fingerprints
                          of the model's adapter setup and of the training data (computed by the trainer)
    manifest.json         size and sha256 of the three files above; written last

It is built in a temporary sibling folder and renamed into place (:func:`qolora.files.atomic_dir`),
so a run killed while saving leaves no folder under a ``step-*`` name. A folder that is there but
fails verification (no manifest, a missing file, a size or hash that differs: a disk fault or a
hand edit) is *corrupted*: :func:`find_resumable` skips the newest such folders with a warning and
resumes from the newest checkpoint that verifies, and raises :class:`CheckpointError` only when none
does. A checkpoint of another model, adapter setup or data set is never skipped silently: the trainer
compares the fingerprints and raises (see :func:`model_fingerprint`).

Restoring the optimizer, scheduler, RNG states and data position makes the resumed run compute the
same numbers as one that never stopped (bitwise, on the CPU).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..adapters.layer import adapter_layers, adapter_parameters
from ..base.reader import weight_fingerprint
from ..files import FolderKind, atomic_dir, remove_stale_temporaries, sha256_file
from ..model.record import record_of

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "checkpoint_name",
    "find_resumable",
    "list_checkpoints",
    "load_checkpoint",
    "model_fingerprint",
    "prune_checkpoints",
    "remove_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "verify_checkpoint",
]

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
TRAINER_FILE = "trainer.pt"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
FORMAT = "qolora-train-checkpoint"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d{6,})$")
#: A training checkpoint folder (a rerun of a step replaces only such a folder).
CHECKPOINT_FOLDER = FolderKind("training checkpoint", MANIFEST_FILE, (ADAPTER_FILE, TRAINER_FILE, STATE_FILE,
                                                                      MANIFEST_FILE))


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: corrupted, incomplete, or from another model / adapter / data set."""


@dataclass
class Checkpoint:
    """A verified checkpoint read back from disk (tensors on the CPU)."""

    path: Path
    step: int
    adapter: dict[str, torch.Tensor]
    trainer: dict[str, Any]
    state: dict[str, Any]


def checkpoint_name(step: int) -> str:
    """``50`` -> ``'step-000050'`` (zero-padded so names sort like steps)."""
    return f"step-{step:06d}"


# ----------------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA RNG states, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning("checkpoint has RNG states of %d CUDA devices, %d present: CUDA RNG not restored",
                           len(cuda), torch.cuda.device_count())


def _tuples(x):
    """random.setstate needs tuples where a round trip may have produced lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------------------------- fingerprints
def model_fingerprint(model: nn.Module) -> str:
    """A fingerprint of everything about the model that a checkpoint's adapter weights depend on.

    Hashes the adapter config (without ``device``), every adapter parameter's name, shape and dtype,
    each adapted layer's base-weight fingerprint and the fingerprint of its initial factors (which
    define the frozen residual for OLoRA/PiSSA).
    """
    record = record_of(model)
    cfg = record.config.to_dict() if record is not None else {}
    cfg.pop("device", None)
    if not cfg.get("refine"):  # refine=0 hashes as before the field existed: older checkpoints still resume
        cfg.pop("refine", None)
    layers = []
    for name, layer in adapter_layers(model):
        init = layer.init_factors
        layers.append([name, layer.base_fingerprint,
                       [weight_fingerprint(t) for t in init] if init is not None else None])
    params = [[n, list(p.shape), str(p.dtype)] for n, p in adapter_parameters(model)]
    blob = json.dumps({"config": cfg, "layers": layers, "params": params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------ save / list
def save_checkpoint(
    root: Path,
    step: int,
    *,
    adapter: dict[str, torch.Tensor],
    trainer: dict[str, Any],
    state: dict[str, Any],
) -> Path:
    """Write checkpoint ``root/step-NNNNNN`` atomically (an existing one of that step is replaced).

    Args:
        root: the checkpoints folder.
        step: optimizer steps completed.
        adapter: adapter weights by name.
        trainer: optimizer / scheduler / scaler state dicts and RNG states (``torch.save``-able).
        state: JSON-able run state (step, data position, history, config, fingerprints).

    Returns:
        The checkpoint folder.
    """
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(root, "step-*", pattern=True)
    final = root / checkpoint_name(step)
    if final.exists() and not (final / MANIFEST_FILE).is_file():  # replace only what qolora wrote
        raise CheckpointError(f"cannot save checkpoint {final}: a folder of that name is there and qolora did not "
                              f"write it (no {MANIFEST_FILE}); move it away and resume")
    with atomic_dir(final, overwrite=True, kind=CHECKPOINT_FOLDER) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in adapter.items()}, str(tmp / ADAPTER_FILE),
                  metadata={"format": "pt", "step": str(step)})
        torch.save(trainer, tmp / TRAINER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                                                  "step": step, **state}, indent=1) + "\n")
        files = {n: {"bytes": (tmp / n).stat().st_size, "sha256": sha256_file(tmp / n)}
                 for n in (ADAPTER_FILE, TRAINER_FILE, STATE_FILE)}
        (tmp / MANIFEST_FILE).write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")
    return final


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``[(step, folder)]`` of every ``step-*`` folder under ``root``, oldest first (unverified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def remove_checkpoint(path: Path) -> bool:
    """Delete a checkpoint folder qolora wrote: its own files, then the folder if nothing else is in it.

    A folder without qolora's manifest is not a qolora checkpoint and is left alone, as is anything
    else inside a checkpoint (with a warning). Returns whether the folder is gone.
    """
    path = Path(path)
    if not (path / MANIFEST_FILE).is_file():
        logger.warning("left %s in place: it has no %s, so qolora did not write it", path, MANIFEST_FILE)
        return False
    for name in (ADAPTER_FILE, TRAINER_FILE, STATE_FILE, MANIFEST_FILE):
        (path / name).unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:
        logger.warning("left %s in place: it holds files qolora did not write (%s)", path,
                       sorted(p.name for p in path.iterdir())[:5])
        return False
    return True


def prune_checkpoints(root: Path, keep_last: int | None) -> list[Path]:
    """Delete all but the ``keep_last`` newest checkpoints (``None``: keep all); returns those deleted."""
    if keep_last is None:
        return []
    doomed = [path for _, path in list_checkpoints(root)[:-keep_last]]
    deleted = [path for path in doomed if remove_checkpoint(path)]
    for path in deleted:
        logger.debug("deleted old checkpoint %s", path)
    return deleted


# ------------------------------------------------------------------------------------ read / verify
def verify_checkpoint(path: Path) -> dict:
    """Check a checkpoint folder against its manifest; return the manifest.

    Raises:
        CheckpointError: no manifest (an incomplete or foreign folder), a missing file, or a file
            whose size or sha256 differs from the manifest (corrupted).
    """
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {MANIFEST_FILE}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupted: unreadable {MANIFEST_FILE} ({exc})") from exc
    for name in (ADAPTER_FILE, TRAINER_FILE, STATE_FILE):
        file = path / name
        if name not in files or not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if file.stat().st_size != files[name]["bytes"] or sha256_file(file) != files[name]["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} differs from the size/sha256 "
                                  "in its manifest")
    return manifest


def load_checkpoint(path: Path) -> Checkpoint:
    """Verify and read a checkpoint folder.

    Raises:
        CheckpointError: see :func:`verify_checkpoint`; also an unknown format version or files that
            verify but cannot be parsed.
    """
    from safetensors.torch import load_file

    path = Path(path)
    verify_checkpoint(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
        adapter = load_file(str(path / ADAPTER_FILE))
        trainer = torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors / pickle / json raise many types
        raise CheckpointError(f"checkpoint {path} cannot be read: {type(exc).__name__}: {exc}") from exc
    if state.get("format") != FORMAT or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format {state.get('format')!r} version {state.get('format_version')!r}; "
            f"this qolora reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    problems = _state_problems(state)
    if problems:
        raise CheckpointError(f"checkpoint {path} is unusable: its {STATE_FILE} " + "; ".join(problems)
                              + " (edited by hand?)")
    return Checkpoint(path=path, step=int(state["step"]), adapter=adapter, trainer=trainer, state=state)


def _state_problems(state: Any) -> list[str]:
    """What a run state lacks for a resume (the fields the loop reads), as readable problems."""
    if not isinstance(state, dict):
        return [f"is a JSON {type(state).__name__}, not an object"]
    problems = []
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        problems.append(f"has step={step!r}, not an integer >= 0")
    position = state.get("data_position")
    if not isinstance(position, dict) or not all(isinstance(position.get(k), int) for k in ("epoch", "index")):
        problems.append(f"has data_position={position!r}, not {{'epoch': int, 'index': int}}")
    for key in ("history", "evals"):
        if not isinstance(state.get(key), list):
            problems.append(f"lacks the list {key!r}")
    for key in ("trajectory", "train_config"):
        if not isinstance(state.get(key), dict):
            problems.append(f"lacks the object {key!r}")
    return problems


def find_resumable(root: Path) -> Checkpoint | None:
    """The newest checkpoint under ``root`` that verifies, or None when there is no checkpoint at all.

    Newer qolora checkpoints that fail verification are skipped with a warning (and renamed
    ``*.corrupt``, ``*.corrupt-2``, ... so a resumed run can write that step again); a newer folder
    qolora did not write (no manifest) stops the resume instead of being moved.

    Raises:
        CheckpointError: checkpoints exist but none verifies (each one's problem is listed).
    """
    found = list_checkpoints(root)
    problems = []
    for step, path in reversed(found):
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            logger.warning("skipping checkpoint %s: %s", path.name, exc)
            continue
        newer = [p for s, p in found if s > step]  # they failed verification
        foreign = [p for p in newer if not (p / MANIFEST_FILE).is_file()]
        if foreign:  # not qolora's to move; the resumed run would have to write that step
            raise CheckpointError(f"{foreign[0]} has no {MANIFEST_FILE}: qolora did not write it, and a resumed run "
                                  "would need that name; move it away and resume")
        for bad in newer:
            aside, n = bad.with_name(bad.name + ".corrupt"), 1
            while aside.exists():  # never delete an earlier one
                n += 1
                aside = bad.with_name(f"{bad.name}.corrupt-{n}")
            bad.rename(aside)
            logger.warning("moved the unusable checkpoint %s aside to %s", bad.name, aside.name)
        return ckpt
    if problems:
        raise CheckpointError(f"no usable checkpoint in {root}: " + "; ".join(problems))
    return None


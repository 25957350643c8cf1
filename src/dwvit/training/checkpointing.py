"""Checkpoints that survive a kill at any moment.

A `Trainer` writes `checkpoint-N` file by file, so a job killed during a save leaves a folder that looks like a
checkpoint but holds a truncated or missing file, and resuming from it fails (or, worse, silently loses the RNG
or optimizer state). Here:

* `AtomicCheckpointMixin` (used by `dwvit.training.trainer.DWTrainer`) writes each checkpoint aside, under
  `_tmp-checkpoint-N/checkpoint-N` in the same output folder, adds a manifest of every file's size, fsyncs the files
  and folders, and only then renames it to `checkpoint-N`. A `checkpoint-N` folder therefore appears complete or
  not at all. The staging name does not match `checkpoint-<digits>` (nor the glob `checkpoint-*`), so
  `get_last_checkpoint`, checkpoint rotation and the Trainer's Hub pushes (which skip `_*`) never see it;
  leftovers of a kill are removed when the next run starts training (`remove_incomplete_saves`).
* `latest_complete_checkpoint(output_dir)` is the newest `checkpoint-N` that passes `checkpoint_problems`; each
  newer one that does not is skipped with a warning naming the folder and what is wrong with it.
* Rotation (`save_total_limit`) never deletes the checkpoint just written, counts checkpoints from a later step
  than the current one (left by an abandoned run) as the oldest, and renames a checkpoint aside before deleting
  it, so a kill during the deletion leaves no half-deleted `checkpoint-N` either.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import zipfile
from pathlib import Path

from .distributed import rank_zero_value

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
STAGING_PREFIX = "_tmp-"  # _tmp-checkpoint-N (being written), _tmp-old-checkpoint-N (being replaced)
_LEFTOVER_NAME = re.compile(r"^_tmp-(?:old-)?checkpoint-\d+$")
MANIFEST_NAME = "checkpoint_manifest.json"
MANIFEST_FORMAT = 1

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# Files the Trainer loads with torch.load(weights_only=True) on resume; checked the same way.
_WEIGHTS_ONLY_FILES = re.compile(r"^(?:optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(?:_\d+)?\.pth)$")
_SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "I16": 2, "F16": 2,
    "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """N for a folder named `checkpoint-N`, else None."""
    match = CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir`, oldest step first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [path for path in folder.iterdir() if checkpoint_step(path) is not None and path.is_dir()]
    return sorted(found, key=checkpoint_step)


# ---- Validation ----


def safetensors_problems(path: Path) -> list[str]:
    """What is wrong with a safetensors file: a header that does not parse, or tensors that do not fit the file."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return [f"{path.name}: {size} bytes, too short for a safetensors header"]
        header_length = int.from_bytes(prefix, "little")
        if 8 + header_length > size:
            return [f"{path.name}: header of {header_length} bytes does not fit in the {size}-byte file (truncated)"]
        try:
            header = json.loads(handle.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            return [f"{path.name}: safetensors header does not parse ({error})"]
    if not isinstance(header, dict):
        return [f"{path.name}: safetensors header is not a JSON object"]
    data_length = size - 8 - header_length
    end_of_data = 0
    problems = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            dtype, shape = info["dtype"], info["shape"]
        except (TypeError, KeyError, ValueError):
            return [f"{path.name}: malformed header entry for {name!r}"]
        if dtype in _SAFETENSORS_DTYPE_BYTES and end - begin != math.prod(shape) * _SAFETENSORS_DTYPE_BYTES[dtype]:
            problems.append(f"{path.name}: tensor {name!r} {dtype}{shape} has {end - begin} bytes")
        end_of_data = max(end_of_data, end)
    if end_of_data != data_length:
        problems.append(f"{path.name}: tensors need {end_of_data} bytes of data, the file holds {data_length} (truncated)")
    return problems


def torch_file_problems(path: Path) -> list[str]:
    """What is wrong with a `torch.save` file: a damaged zip (CRC of every member), or a weights-only load failing.

    Pickled objects that are not tensors and plain containers (`training_args.bin`) are only checked as a zip:
    loading them would run arbitrary code.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return [f"{path.name}: not a complete torch file ({error})"]
    except Exception as error:  # zlib/CRC errors surface as various exceptions
        return [f"{path.name}: damaged ({type(error).__name__}: {error})"]
    if bad is not None:
        return [f"{path.name}: member {bad} fails its CRC check"]
    if _WEIGHTS_ONLY_FILES.match(path.name):
        import torch
        from transformers.trainer_pt_utils import safe_globals

        try:
            with safe_globals():
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:
            return [f"{path.name}: does not load with weights_only=True ({type(error).__name__}: {error})"]
    return []


def _json_problems(path: Path) -> list[str]:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return [f"{path.name}: does not parse as JSON ({error})"]
    return []


def _python_problems(path: Path) -> list[str]:
    try:
        compile(path.read_bytes(), str(path), "exec")
    except (SyntaxError, ValueError) as error:
        return [f"{path.name}: does not compile ({error.__class__.__name__}: {error})"]
    return []


def _manifest_problems(folder: Path) -> list[str]:
    manifest_path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        sizes = {str(name): int(entry["size"]) for name, entry in files.items()}
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
        return [f"{MANIFEST_NAME}: does not parse ({type(error).__name__}: {error})"]
    problems = []
    for name, size in sorted(sizes.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing (listed in {MANIFEST_NAME})")
        elif path.stat().st_size != size:
            problems.append(f"{name}: {path.stat().st_size} bytes, {MANIFEST_NAME} says {size}")
    return problems


def checkpoint_problems(folder: str | os.PathLike, full_state: bool = True) -> list[str]:
    """Everything wrong with a checkpoint folder; empty when it is complete and readable.

    * Every file the manifest lists (`checkpoint_manifest.json`, written by `AtomicCheckpointMixin`) is there
      with its recorded size. Checkpoints written without the manifest (plain `Trainer`) get the checks below only.
    * `trainer_state.json` parses and its `global_step` is the folder's N; model weights are present;
      with `full_state` (not `save_only_model`) `optimizer.pt`, `scheduler.pt` and an `rng_state*.pth` are too.
    * Every file is readable as what it is: safetensors headers parse and the tensors fill the file exactly;
      JSON parses; torch files are intact zips and the optimizer/scheduler/scaler/RNG files load with
      `weights_only=True`; Python files compile.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    problems: list[str] = []
    if (folder / MANIFEST_NAME).exists():
        problems += _manifest_problems(folder)
    names = {path.name for path in folder.iterdir() if path.is_file()}

    if "trainer_state.json" not in names:
        problems.append("trainer_state.json: missing")
    if not names.intersection(WEIGHT_FILES):
        problems.append(f"model weights: none of {', '.join(WEIGHT_FILES)}")
    if full_state:
        for name in ("optimizer.pt", "scheduler.pt"):
            if name not in names:
                problems.append(f"{name}: missing")
        if not any(re.match(r"^rng_state(?:_\d+)?\.pth$", name) for name in names):
            problems.append("rng_state.pth: missing (no rng_state*.pth)")

    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index_name in names:
            try:
                shards = set(json.loads((folder / index_name).read_text())["weight_map"].values())
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
                continue  # reported below as JSON that does not parse (or malformed)
            for shard in sorted(shards - names):
                problems.append(f"{shard}: missing (listed in {index_name})")

    for name in sorted(names):
        path = folder / name
        if name.endswith(".safetensors"):
            problems += safetensors_problems(path)
        elif name.endswith(".json") and name != MANIFEST_NAME:
            problems += _json_problems(path)
        elif name.endswith(TORCH_SUFFIXES):
            problems += torch_file_problems(path)
        elif name.endswith(".py"):
            problems += _python_problems(path)

    if "trainer_state.json" in names and not any(p.startswith("trainer_state.json") for p in problems):
        step = json.loads((folder / "trainer_state.json").read_text()).get("global_step")
        expected = checkpoint_step(folder)
        if expected is not None and step != expected:
            problems.append(f"trainer_state.json: global_step {step}, folder name says {expected}")
    return list(dict.fromkeys(problems))


def latest_complete_checkpoint(output_dir: str | os.PathLike, full_state: bool = True) -> str | None:
    """The newest `checkpoint-N` of `output_dir` that `checkpoint_problems` passes, or None.

    Each newer checkpoint that is incomplete or unreadable is skipped with a warning that names it and says what
    is wrong. Pass `full_state=False` for runs with `save_only_model` (no optimizer, scheduler or RNG state).
    """
    for folder in reversed(list_checkpoints(output_dir)):
        problems = checkpoint_problems(folder, full_state=full_state)
        if not problems:
            return str(folder)
        logger.warning(
            "Skipping incomplete or unreadable checkpoint %s: %s", folder, "; ".join(problems)
        )
    return None


def remove_incomplete_saves(output_dir: str | os.PathLike) -> list[str]:
    """Delete the `_tmp-checkpoint-N` / `_tmp-old-checkpoint-N` folders a killed save left; return their paths."""
    folder = Path(output_dir)
    removed = []
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if _LEFTOVER_NAME.match(path.name) and path.is_dir() and not path.is_symlink():
                logger.warning("Removing %s, left by a save that did not finish.", path)
                shutil.rmtree(path, ignore_errors=True)
                removed.append(str(path))
    return removed


# ---- Writing ----


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        descriptor = os.open(path, flags)
    except OSError:
        return  # e.g. folders cannot be opened on Windows; nothing to flush there
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_manifest(folder: Path) -> dict:
    """Record the size of every file under `folder` in `checkpoint_manifest.json` (written and fsynced last)."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME:
            files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size}
    manifest = {"format": MANIFEST_FORMAT, "step": checkpoint_step(folder), "files": files}
    target = folder / MANIFEST_NAME
    with open(target, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    return manifest


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, then `folder` itself."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync_path(Path(root) / name)
        _fsync_path(Path(root), directory=True)


def publish_checkpoint(staged: Path, final: Path) -> None:
    """Make the fully written `staged` folder visible as `final` by one rename.

    An existing `final` (an incomplete checkpoint of an earlier run at the same step) is first renamed aside to
    `_tmp-old-checkpoint-N` and deleted afterwards, so a kill at any point leaves either the old or the new folder
    under the name, never a mix.
    """
    fsync_tree(staged)
    write_manifest(staged)
    _fsync_path(staged, directory=True)
    displaced = _move_aside(final) if final.exists() else None
    os.replace(staged, final)
    _fsync_path(final.parent, directory=True)
    if displaced is not None:
        shutil.rmtree(displaced, ignore_errors=True)


def _move_aside(folder: Path) -> Path:
    """Rename `checkpoint-N` to `_tmp-old-checkpoint-N` (one atomic step; the name no longer looks complete)."""
    displaced = folder.parent / f"{STAGING_PREFIX}old-{folder.name}"
    if displaced.exists():
        shutil.rmtree(displaced)
    os.replace(folder, displaced)
    return displaced


def delete_checkpoint(folder: str | os.PathLike) -> None:
    """Delete a checkpoint so that a kill half-way leaves no half-deleted `checkpoint-N`: rename, then delete."""
    shutil.rmtree(_move_aside(Path(folder)), ignore_errors=True)


def rotate_checkpoints(output_dir: str | os.PathLike, save_total_limit: int | None, current_step: int,
                       protected: list[str | None]) -> list[str]:
    """Delete the oldest checkpoints beyond `save_total_limit`; never one in `protected`; return the deleted.

    Oldest means lowest step, except that checkpoints from a step after `current_step` (left by an abandoned run,
    e.g. one skipped as incomplete when resuming) count as older than all others.
    """
    if not save_total_limit or save_total_limit <= 0:
        return []
    keep = {os.path.realpath(path) for path in protected if path}
    checkpoints = sorted(
        list_checkpoints(output_dir), key=lambda path: (checkpoint_step(path) <= current_step, checkpoint_step(path))
    )
    excess = len(checkpoints) - max(save_total_limit, len(keep))
    deleted = []
    for path in checkpoints:
        if excess <= 0:
            break
        if os.path.realpath(path) in keep:
            continue
        logger.info("Deleting older checkpoint %s (save_total_limit=%d).", path, save_total_limit)
        delete_checkpoint(path)
        deleted.append(str(path))
        excess -= 1
    return deleted


def _barrier() -> None:
    """Wait for every process of a `torch.distributed` job (no-op in a single process).

    torch.distributed itself rather than `accelerator.wait_for_everyone()`: under torchrun on CPUs, accelerate can
    report no distributed setup (DistributedType.NO, a no-op barrier) while several processes write checkpoints.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class AtomicCheckpointMixin:
    """`Trainer` mixin: each checkpoint is written aside and renamed into place only when complete.

    `Trainer._save_checkpoint` writes everything under `self._get_output_dir(trial)/checkpoint-N`; while it runs,
    that output folder is redirected to the staging folder `_tmp-checkpoint-N`. Its Hub push is deferred until the
    folder has its final name, and its rotation (which then only sees the staging folder) is replaced by
    `rotate_checkpoints` on the real folder. `train(resume_from_checkpoint=True)` resumes from
    `latest_complete_checkpoint` rather than the newest folder.
    """

    _staging_run_dir: str | None = None
    _deferred_push: bool = False

    def _get_output_dir(self, trial) -> str:
        if self._staging_run_dir is not None:
            return self._staging_run_dir
        return super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if self._staging_run_dir is not None:
            self._deferred_push = True
            return
        super()._push_from_checkpoint(checkpoint_folder)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(self._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staging_run_dir = run_dir / f"{STAGING_PREFIX}{name}"
        final = run_dir / name
        if self.args.should_save and staging_run_dir.exists():
            shutil.rmtree(staging_run_dir)
        _barrier()

        self._staging_run_dir, self._deferred_push = str(staging_run_dir), False
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_run_dir = None
        staged = staging_run_dir / name

        # The Trainer looked for the best checkpoint in the staging folder; point it at the real one.
        best_step = self.state.best_global_step
        if best_step:
            best = run_dir / f"checkpoint-{best_step}"
            if best_step == self.state.global_step or best.is_dir():
                self.state.best_model_checkpoint = str(best)
        if self.args.should_save and (staged / "trainer_state.json").is_file():
            self.state.save_to_json(str(staged / "trainer_state.json"))

        _barrier()  # every process has written its files (e.g. rng_state_<rank>.pth)
        if self.args.should_save:
            publish_checkpoint(staged, final)
            shutil.rmtree(staging_run_dir, ignore_errors=True)
        _barrier()

        if self._deferred_push:
            self._deferred_push = False
            super()._push_from_checkpoint(str(final))
        if self.args.should_save:
            rotate_checkpoints(
                run_dir, self.args.save_total_limit, self.state.global_step,
                protected=[str(final), self.state.best_model_checkpoint],
            )

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if self.args.should_save:
            remove_incomplete_saves(self.args.output_dir)
        if resume_from_checkpoint is True:
            resume_from_checkpoint = latest_complete_checkpoint(
                self.args.output_dir, full_state=not self.args.save_only_model
            )
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint found in output directory ({self.args.output_dir})")
        # Each rank checked the folder itself; they must all resume from the same step (rank 0's choice).
        resume_from_checkpoint = rank_zero_value(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

"""What a run in an output folder is, and who is writing it (issue #19, "Runs you can trust with your data").

* **Saved arguments.** `run_arguments.json` holds the arguments that change what is computed (model, data,
  augmentation, optimizer, schedule, seed), written when training starts. A later run into the same folder compares
  its own with them and refuses, naming every option that differs with its old and new value, unless it is told
  to start over (`--overwrite_output_dir`: the old checkpoints are deleted) or to resume anyway
  (`--resume_changed_arguments`: the differences are logged and kept in the record's `changes`). Options that
  only change output (logging, reporting, saving, evaluation batch size, data loader workers, the time budget
  `--max_train_minutes`) are not compared. A longer schedule (`--num_train_epochs`, `--max_steps`) is a schedule
  change and needs `--resume_changed_arguments`; a larger `--max_train_minutes` continues a run stopped at its
  budget without any flag.
* **Older folders** (written before the record existed) are compared against the command in their
  `run_info.json` when it can be parsed again, else resumed with a warning; a field missing from an older record
  compares equal when the new value is that field's default.
* **Finished runs.** A run whose folder says it finished (the record's `finished`, or for older folders the final
  `trainer_state.json` and `all_results.json` with no newer checkpoint) is not trained again: re-running it
  returns its saved metrics, writes nothing and says so. A run stopped by its time budget counts as finished
  until the budget is raised (or removed).
* **Lock.** `run.lock` names the process writing the folder (pid, host, start time) for the run's whole life.
  A second run is refused with an error naming the holder; a lock left by a process that no longer exists on this
  host is taken over with a warning.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import functools
import json
import logging
import os
import shlex
import socket
import sys
from pathlib import Path

from .checkpointing import checkpoint_step, delete_checkpoint, list_checkpoints, remove_incomplete_saves

logger = logging.getLogger(__name__)

RECORD_NAME = "run_arguments.json"
LOCK_NAME = "run.lock"
RECORD_FORMAT = 1

# Model and data arguments that do not change what is computed; every other field of those dataclasses counts.
_UNCOMPARED_MODEL_DATA = {"cache_dir", "token", "trust_remote_code", "decoded_image_cache"}
# Training arguments that change what is computed. The TrainingArguments dataclass holds ~150 fields, most of them
# about output (logging, saving, reporting, the Hub) or the machine, so these are listed rather than excluded.
COMPARED_TRAINING_ARGUMENTS = (
    "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "optim", "optim_args",
    "max_grad_norm", "num_train_epochs", "max_steps", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps",
    "warmup_ratio", "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "data_seed",
    "mixed_precision", "label_smoothing_factor", "full_determinism", "ignore_data_skip", "save_only_model",
)


def _plain(value):
    """A JSON-comparable form: enums by value, tuples as lists, anything else unknown as its text."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _field_default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def compared_arguments(model_args, data_args, training_args) -> tuple[dict, dict]:
    """`(values, defaults)` of the arguments that change what is computed, keyed by option name."""
    values, defaults = {}, {}
    for arguments in (model_args, data_args):
        for field in dataclasses.fields(arguments):
            if field.name not in _UNCOMPARED_MODEL_DATA:
                values[field.name] = _plain(getattr(arguments, field.name))
                defaults[field.name] = _plain(_field_default(field))
    training_fields = {field.name: field for field in dataclasses.fields(training_args)}
    for name in COMPARED_TRAINING_ARGUMENTS:
        if name not in training_fields:
            continue  # not in this transformers version
        # The flag as given ("auto"), not what it resolved to on this machine.
        value = getattr(training_args, "requested_mixed_precision", None) if name == "mixed_precision" else None
        values[name] = _plain(value if value is not None else getattr(training_args, name))
        defaults[name] = _plain(_field_default(training_fields[name]))
    return values, defaults


def differences(saved: dict, current: dict, defaults: dict) -> dict[str, tuple]:
    """`{option: (old, new)}` for every compared option whose values differ.

    An option missing from `saved` (a record from an older version) is taken to have had its default; an option
    missing from `current` (no longer an argument) is not compared.
    """
    changed = {}
    for name, new in current.items():
        old = saved.get(name, defaults.get(name)) if name in saved or name in defaults else None
        if _plain(old) != _plain(new):
            changed[name] = (old, new)
    return changed


def describe(changed: dict[str, tuple]) -> str:
    return "; ".join(f"--{name}: {old!r} -> {new!r}" for name, (old, new) in sorted(changed.items()))


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json_atomically(path: Path, payload: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def legacy_arguments(output_dir: Path) -> dict | None:
    """The compared arguments of an older run folder's `run_info.json` command, or None when it cannot be read."""
    from .arguments import parse_args

    command = (read_json(output_dir / "run_info.json") or {}).get("command")
    if not command:
        return None
    words = shlex.split(command)
    script = next((i for i, word in enumerate(words) if word.endswith("run_image_classification.py")), None)
    if script is None:
        return None
    try:
        return compared_arguments(*parse_args(words[script + 1:]))[0]
    except (Exception, SystemExit) as error:  # e.g. a recipe file that has moved since
        logger.warning("Could not re-read the arguments of %s/run_info.json (%s).", output_dir, error)
        return None


def _training_minutes(state: dict) -> float:
    clock = (state.get("stateful_callbacks") or {}).get("TrainingClock")
    if isinstance(clock, list):
        clock = clock[0] if clock else None
    try:
        return float(clock["attributes"]["previous_seconds"]) / 60.0
    except (TypeError, KeyError, ValueError):
        return 0.0


def finished_reason(output_dir: Path, record: dict | None, max_train_minutes: float | None) -> str | None:
    """Why the run in `output_dir` needs no more training (finished, or its time budget used up), or None."""
    if record is not None and not record.get("finished"):
        return None  # started (or resumed with changed arguments) and not finished since
    state = read_json(output_dir / "trainer_state.json")
    if not isinstance(state, dict) or not (output_dir / "all_results.json").is_file():
        return None
    step, max_steps = int(state.get("global_step") or 0), int(state.get("max_steps") or 0)
    if any((checkpoint_step(path) or 0) > step for path in list_checkpoints(output_dir)):
        return None  # a later run got further than the final state says
    if max_steps > 0 and step >= max_steps:
        return f"it finished its schedule (step {step} of {max_steps})"
    minutes = _training_minutes(state)
    if max_train_minutes is not None and minutes >= max_train_minutes:
        return (f"it stopped at step {step} of {max_steps} after {minutes:.2f} minutes, at its time budget "
                f"(--max_train_minutes {max_train_minutes:g}; a larger one continues it)")
    return None


# ---- The lock ----

_HELD_LOCKS: dict[str, str] = {}  # lock path -> this process's token, for release on the way out of main()


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), so that a reused pid is not taken for the lock's holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_is_alive(holder: dict) -> bool | None:
    """True or False for a holder on this host; None when it cannot be told (another host, unreadable lock)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return None
    pid = holder["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    started = holder.get("process_start")
    return not (started is not None and _process_start(pid) not in (None, started))


def acquire_lock(output_dir: str | os.PathLike, command: str = "") -> Path:
    """Create `output_dir/run.lock` naming this process; refuse if a live process holds it, take over a dead one's."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    token = f"{socket.gethostname()}:{os.getpid()}:{_now()}"
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
              "process_start": _process_start(os.getpid()), "command": command, "token": token}
    staged = folder / f".{LOCK_NAME}.{os.getpid()}"
    staged.write_text(json.dumps(holder, indent=2))
    try:
        for _ in range(3):
            try:
                os.link(staged, path)  # atomic: fails if the lock exists, and never leaves an empty lock file
                _HELD_LOCKS[str(path)] = token
                return path
            except FileExistsError:
                pass
            current = read_json(path)
            alive = _holder_is_alive(current) if isinstance(current, dict) else None
            if alive is False:
                logger.warning(
                    "Taking over the lock %s of process %s on %s (started %s), which no longer exists.",
                    path, current.get("pid"), current.get("host"), current.get("started"),
                )
                path.unlink(missing_ok=True)
                continue
            if current is None and not path.exists():
                continue  # released meanwhile
            who = (f"process {current.get('pid')} on host {current.get('host')} (started {current.get('started')}: "
                   f"{current.get('command') or 'no command recorded'})") if isinstance(current, dict) else "an unreadable lock"
            raise RuntimeError(
                f"{folder} is in use by another run: {path} names {who}. Two runs into one output folder would "
                f"overwrite each other; wait for it, use another --output_dir, or delete {path} if that process "
                "is gone" + (" (it runs on another host, so this one cannot check)." if alive is None else ".")
            )
        raise RuntimeError(f"Could not take the lock {path}: it keeps changing hands.")
    finally:
        staged.unlink(missing_ok=True)


def release_lock(path: str | os.PathLike) -> None:
    """Remove the lock if this process still holds it (never one a later run has taken over)."""
    path = Path(path)
    token = _HELD_LOCKS.pop(str(path), None)
    current = read_json(path)
    if token is not None and isinstance(current, dict) and current.get("token") == token:
        path.unlink(missing_ok=True)


def releases_run_locks(function):
    """Decorator for `main`: every lock taken during the call is released when it returns or raises."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        before = set(_HELD_LOCKS)
        try:
            return function(*args, **kwargs)
        finally:
            for path in [path for path in _HELD_LOCKS if path not in before]:
                release_lock(path)

    return wrapper


# ---- The run ----


@dataclasses.dataclass
class RunControl:
    output_dir: Path
    record: dict | None = None
    finished_metrics: dict | None = None  # set when the run is finished: main() returns these and does nothing
    writes: bool = True
    keeps_model: bool = False  # an evaluation-only run of the model its folder holds: saves no model, no run_info

    def commit_record(self) -> None:
        """Write this run's record of its arguments; call when training starts."""
        if self.writes and self.record is not None:
            write_json_atomically(self.output_dir / RECORD_NAME, self.record)

    def finish(self, trainer) -> None:
        """Mark the run finished in its record (at the end of main(), after its results are written)."""
        if not self.writes or self.record is None or not trainer.args.do_train:
            return
        state = trainer.state
        self.record["finished"] = {"at": _now(), "global_step": state.global_step, "max_steps": state.max_steps}
        write_json_atomically(self.output_dir / RECORD_NAME, self.record)


def _evaluation_only(control: RunControl, model_args, training_args) -> RunControl:
    """An evaluation-only run evaluates a model in place (the folder it was loaded from) or into a folder without
    one; a folder holding another model is refused, since saving the evaluated model would replace it."""
    output_dir = control.output_dir
    if not (output_dir / "config.json").is_file():
        return control
    source = model_args.model_name_or_path
    in_place = source is not None and os.path.isdir(source) and Path(source).resolve() == output_dir.resolve()
    if not in_place and not getattr(training_args, "overwrite_output_dir", False):
        raise ValueError(
            f"{output_dir} holds another model (its config.json); an evaluation-only run of "
            f"{source or model_args.model_name} would save its own model and run_info.json over it. Evaluate into "
            f"another --output_dir, evaluate that model in place (--model_name_or_path {output_dir}), or pass "
            "--overwrite_output_dir to replace it."
        )
    control.keeps_model = in_place
    return control


def begin(model_args, data_args, training_args, command: str) -> RunControl:
    """Lock the output folder and decide what this run does with what is in it (see the module's docstring)."""
    output_dir = Path(training_args.output_dir)
    writes = training_args.process_index == 0
    if writes:
        acquire_lock(output_dir, command)
    control = RunControl(output_dir, writes=writes)
    if not training_args.do_train:
        return _evaluation_only(control, model_args, training_args)
    current, defaults = compared_arguments(model_args, data_args, training_args)
    saved_record = read_json(output_dir / RECORD_NAME)
    saved_record = saved_record if isinstance(saved_record, dict) and "arguments" in saved_record else None
    checkpoints = list_checkpoints(output_dir)
    changes = list((saved_record or {}).get("changes", []))
    resuming = training_args.auto_resume and not getattr(training_args, "overwrite_output_dir", False)

    if getattr(training_args, "overwrite_output_dir", False):
        if checkpoints or saved_record:
            logger.warning("--overwrite_output_dir: starting over in %s; deleting its checkpoints %s.",
                           output_dir, [path.name for path in checkpoints])
        if writes:
            for path in checkpoints:
                delete_checkpoint(path)
            remove_incomplete_saves(output_dir)
        changes = []
    elif not training_args.auto_resume:
        if checkpoints:
            # Training from scratch beside them would mix two runs' checkpoints in one folder, and a later
            # automatic resume could pick up one of the older run's.
            raise ValueError(
                f"--auto_resume false: {output_dir} holds checkpoints of an earlier run "
                f"({', '.join(path.name for path in checkpoints)}). Pass --overwrite_output_dir to delete them and "
                "start over, or train into another --output_dir."
            )
        if saved_record:
            logger.warning("--auto_resume false: training %s from scratch; its record is replaced.", output_dir)
        changes = []
    else:
        trained = bool(checkpoints) or (output_dir / "trainer_state.json").is_file()
        # An older folder's run_info.json may come from an evaluation-only run: only a trained folder is compared.
        saved = saved_record["arguments"] if saved_record else (legacy_arguments(output_dir) if trained else None)
        if saved is None and trained:
            logger.warning("%s holds a run without a record of its arguments (%s, from an earlier version): "
                           "resuming it without checking that they match.", output_dir, RECORD_NAME)
        changed = differences(saved, current, defaults) if saved is not None else {}
        if changed and not getattr(training_args, "resume_changed_arguments", False):
            raise ValueError(
                f"{output_dir} holds a run with other arguments ({len(changed)} differ: {describe(changed)}). "
                "Resuming it would mix two runs. Use another --output_dir, pass --overwrite_output_dir to start "
                "over (deleting its checkpoints), or --resume_changed_arguments to continue it with the new ones."
            )
        if changed:
            logger.warning("--resume_changed_arguments: continuing %s with changed arguments: %s",
                           output_dir, describe(changed))
            changes.append({"at": _now(), "changed": {name: {"old": old, "new": new}
                                                      for name, (old, new) in changed.items()}})
        else:
            reason = finished_reason(output_dir, saved_record, training_args.max_train_minutes)
            if reason is not None:
                print(f"Nothing to do: the run in {output_dir} is already finished ({reason}); nothing was "
                      "changed. Pass --overwrite_output_dir to train it again from scratch.", file=sys.stderr)
                logger.info("Run in %s already finished: %s.", output_dir, reason)
                control.finished_metrics = read_json(output_dir / "all_results.json") or {}
                return control

    control.record = {
        "format": RECORD_FORMAT,
        "arguments": current,
        "command": command,
        "started": (saved_record or {}).get("started") if resuming and saved_record else _now(),
        "finished": None,
        "changes": changes,
    }
    # Written by `commit_record` when training starts: a run that fails before that leaves the old record, which
    # still describes the folder's checkpoints.
    return control


__all__ = [
    "COMPARED_TRAINING_ARGUMENTS", "LOCK_NAME", "RECORD_NAME", "RunControl", "acquire_lock", "begin",
    "compared_arguments", "differences", "finished_reason", "release_lock", "releases_run_locks",
]

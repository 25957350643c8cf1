"""Data parallelism and mixed precision that really happen (issue 18).

Two gloo processes launched by torchrun, with the command used on GPUs (no `--ddp_backend`, no `--use_cpu`),
train one model: after every step both ranks hold the same weights, having read different batches, and the
result equals one process with the doubled batch. A time budget stops both ranks at the same step even when only
rank 0's clock runs out; their evaluation counts every image once and equals a one-process evaluation of the
saved model; a run resumed under two processes from the checkpoint a kill leaves ends bit-identical to the
uninterrupted one. `--mixed_precision bf16` runs the forward in bf16 autocast, `no` in float32.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageClassification

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import run_image_classification as ric  # noqa: E402

# No shortcut (its BatchNorm statistics are per process, so 2 x 8 could not equal 1 x 16), no stochastic depth,
# no augmentation: what remains of a step is the same arithmetic in both layouts.
PLAIN = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,use_dw_shortcut=false,drop_path_rate=0.0"
SHORTCUT = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,drop_path_rate=0.0"
IDENTITY_AUGMENTATION = [
    "--crop_scale_min", "1", "--horizontal_flip_prob", "0", "--rand_augment", "false", "--color_jitter", "0",
    "--random_erasing_prob", "0", "--mixup_alpha", "0", "--cutmix_alpha", "0",
]
TRAIN_SAMPLES, STEPS, EVAL_SAMPLES = 64, 4, 37  # 37 images: not a multiple of 2 processes x batch 8

# Runs the job in each torchrun process, recording what each rank saw: its parallel mode, the wrapped model's
# class, a fingerprint of every training batch, and its final weights.
PROBE = textwrap.dedent(
    """
    import json, os, sys, types
    sys.path.insert(0, {repo!r})
    import torch
    from transformers import TrainerCallback
    import run_image_classification as ric
    import dwvit.training.callbacks as clock_module
    from dwvit.training.trainer import DWTrainer

    rank = int(os.environ["RANK"])
    out = os.environ["PROBE_DIR"]
    with open(f"{{out}}/pid-{{rank}}", "w") as handle:
        handle.write(str(os.getpid()))
    record = {{"batches": [], "wrapped": None}}
    if os.environ.get("PROBE_FROZEN_CLOCK_RANK") == str(rank):
        clock_module.time = types.SimpleNamespace(perf_counter=lambda: 0.0)  # this rank never sees time pass
    original_step = DWTrainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        record["wrapped"] = type(model).__name__
        if os.environ.get("PROBE_NAN_RANK") == str(rank) and self.state.global_step >= 1:
            inputs = {{**inputs, "pixel_values": inputs["pixel_values"] * float("nan")}}  # only this rank's loss
        record["batches"].append([inputs["labels"].tolist(), float(inputs["pixel_values"].double().sum())])
        return original_step(self, model, inputs, *args, **kwargs)

    DWTrainer.training_step = training_step

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            record["parallel_mode"], record["world_size"] = str(args.parallel_mode), args.world_size

        def on_train_end(self, args, state, control, model=None, **kwargs):
            record["global_step"] = state.global_step
            torch.save({{k: v.detach().clone() for k, v in model.state_dict().items()}}, f"{{out}}/weights-{{rank}}.pt")
            with open(f"{{out}}/record-{{rank}}.json", "w") as handle:
                json.dump(record, handle)

    ric.main(sys.argv[1:], callbacks=[Probe()])
    """
)


def job_args(output_dir, cifar10_dir, *extra):
    return [
        "--model_name", "vit-tiny-cifar", "--config_overrides", PLAIN, "--output_dir", str(output_dir),
        "--dataset_name", str(cifar10_dir), "--max_train_samples", str(TRAIN_SAMPLES),
        "--max_eval_samples", str(EVAL_SAMPLES), "--per_device_eval_batch_size", "8", "--max_steps", str(STEPS),
        "--learning_rate", "2e-3", "--warmup_steps", "0", "--save_strategy", "steps", "--save_steps", "2",
        "--eval_strategy", "no", "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true",
        "--dataloader_pin_memory", "false", "--mixed_precision", "no", "--seed", "3", *IDENTITY_AUGMENTATION, *extra,
    ]


def torchrun(tmp_path, probe_dir, args, timeout=240, **env_extra):
    """Launch PROBE under torchrun with 2 processes on a free port; return the CompletedProcess."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE.format(repo=str(REPO_ROOT)))
    probe_dir.mkdir(parents=True, exist_ok=True)
    with socket.socket() as probe:  # a free port, so no other rendezvous on this machine can be joined
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PROBE_DIR": str(probe_dir), **env_extra}
    logs = probe_dir / "stdout.txt", probe_dir / "stderr.txt"
    # Output to files, not pipes: a hung rank holding a pipe open would block reading it after the timeout.
    with open(logs[0], "w") as stdout, open(logs[1], "w") as stderr:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=stdout, stderr=stderr)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # torchrun starts each rank in a session of its own, so the ranks are killed by the pids they wrote.
            process.kill()
            for pid_file in probe_dir.glob("pid-*"):
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.wait()
            pytest.fail(f"torchrun did not finish within {timeout} s (a rank hung):\n"
                        f"{logs[0].read_text()[-2000:]}\n{logs[1].read_text()[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, logs[0].read_text(), logs[1].read_text())


def read_ranks(probe_dir):
    records = [json.loads((probe_dir / f"record-{rank}.json").read_text()) for rank in (0, 1)]
    weights = [torch.load(probe_dir / f"weights-{rank}.pt") for rank in (0, 1)]
    return records, weights


@pytest.fixture(scope="module")
def two_process_run(cifar10_dir, tmp_path_factory):
    """The reference: 2 processes x batch 8, 4 steps, checkpoints at steps 2 and 4."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    out = tmp_path / "out"
    result = torchrun(tmp_path, tmp_path / "probe", job_args(
        out, cifar10_dir, "--per_device_train_batch_size", "8", "--do_train"
    ))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out, tmp_path / "probe"


def test_ranks_train_one_model_on_different_batches(two_process_run):
    _, probe_dir = two_process_run
    records, weights = read_ranks(probe_dir)
    for record in records:
        assert record["parallel_mode"] == "ParallelMode.DISTRIBUTED" and record["world_size"] == 2, record
        assert record["wrapped"] == "DistributedDataParallel" and record["global_step"] == STEPS
    batches = [[tuple(labels) for labels, _ in record["batches"]] for record in records]
    sums = [[pixel_sum for _, pixel_sum in record["batches"]] for record in records]
    assert len(batches[0]) == len(batches[1]) == STEPS
    assert all(a != b or x != y for a, b, x, y in zip(*batches, *sums)), "both ranks read the same batch"
    assert set(weights[0]) == set(weights[1])
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=0, atol=0, msg=name)


def test_two_processes_of_8_equal_one_process_of_16(two_process_run, cifar10_dir, tmp_path):
    out, probe_dir = two_process_run
    records, weights = read_ranks(probe_dir)
    single = tmp_path / "single"
    ric.main(job_args(single, cifar10_dir, "--per_device_train_batch_size", "16", "--do_train"))
    expected = load_file(single / "model.safetensors")
    # The one process's batch is the union of the two ranks' batches of the same step.
    state = json.loads((single / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    actual = load_file(out / "model.safetensors")
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(weights[0][name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_kill_and_resume_under_two_processes_is_bit_identical(two_process_run, cifar10_dir, tmp_path):
    """A run killed after step 2 or 3 holds checkpoint-2 only (as the reference wrote it); resumed, it must end
    with the reference's weights, to the bit."""
    reference, _ = two_process_run
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(reference / "checkpoint-2", out / "checkpoint-2")
    resumed = torchrun(tmp_path, tmp_path / "resumed", job_args(
        out, cifar10_dir, "--per_device_train_batch_size", "8", "--do_train"
    ))  # resumes from checkpoint-2 by itself
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    records, weights = read_ranks(tmp_path / "resumed")
    assert [len(record["batches"]) for record in records] == [STEPS - 2] * 2  # steps 3 and 4 only
    reference_records, _ = read_ranks(reference.parent / "probe")
    for record, uninterrupted in zip(records, reference_records):
        assert record["batches"] == uninterrupted["batches"][2:]  # each rank reads the batches it would have
    expected, actual = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(weights[1][name], expected[name], rtol=0, atol=0, msg=name)


def test_a_non_finite_loss_on_one_rank_stops_every_rank(cifar10_dir, tmp_path):
    """Rank 1's loss turns NaN at step 2 while rank 0's stays finite: both must stop with the error, not rank 0
    waiting for rank 1 in the next gradient all-reduce until the timeout."""
    result = torchrun(tmp_path, tmp_path / "probe", job_args(
        tmp_path / "out", cifar10_dir, "--per_device_train_batch_size", "8", "--do_train"
    ), timeout=150, PROBE_NAN_RANK="1")
    assert result.returncode != 0
    log = result.stdout + result.stderr
    # Raised on both ranks: rank 1 at its loss, rank 0 at the NaN gradients the all-reduce brought (or the flag).
    assert log.count("Training stopped: non-finite") >= 2, log[-4000:]
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def budget_run(cifar10_dir, tmp_path_factory):
    """2 processes with the shortcut, a budget of 6 ms and rank 1's clock frozen, then evaluate and predict.

    Only rank 0 sees the budget run out; rank 1, on its own clock, would train all 30 steps.
    """
    tmp_path = tmp_path_factory.mktemp("budget")
    out = tmp_path / "out"
    result = torchrun(tmp_path, tmp_path / "probe", job_args(
        out, cifar10_dir, "--config_overrides", SHORTCUT, "--per_device_train_batch_size", "8", "--max_steps", "30",
        "--save_strategy", "no", "--max_train_minutes", "0.0001", "--do_train", "--do_eval", "--do_predict",
    ), timeout=150, PROBE_FROZEN_CLOCK_RANK="1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out, tmp_path / "probe"


def test_a_time_budget_stops_both_ranks_at_the_same_step(budget_run):
    _, probe_dir = budget_run
    records, weights = read_ranks(probe_dir)
    assert [record["global_step"] for record in records] == [1, 1]
    statistics = [name for name in weights[0] if "running_" in name or "num_batches_tracked" in name]
    assert statistics, "the shortcut's BatchNorm is missing"
    for name in set(weights[0]) - set(statistics):
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=0, atol=0, msg=name)
    # DDP hands rank 0's BatchNorm statistics to the others at the start of each training forward only: after the
    # last step each rank holds its own update (which is why evaluation first takes rank 0's, the saved ones).
    assert any(not torch.equal(weights[0][name], weights[1][name]) for name in statistics if "running_mean" in name)


def test_two_process_evaluation_counts_every_image_once(budget_run, cifar10_dir, tmp_path):
    out, probe_dir = budget_run
    records, _ = read_ranks(probe_dir)
    assert all(record["world_size"] == 2 for record in records), "the evaluation did not run in two processes"
    distributed = json.loads((out / "eval_results.json").read_text())
    single = tmp_path / "single-eval"
    ric.main(job_args(single, cifar10_dir, "--model_name_or_path", str(out), "--config_overrides", SHORTCUT,
                      "--do_eval", "--do_predict"))
    alone = json.loads((single / "eval_results.json").read_text())
    assert distributed["eval_samples"] == alone["eval_samples"] == EVAL_SAMPLES
    rows = [list(csv.DictReader(open(folder / "predictions.csv"))) for folder in (out, single)]
    assert len(rows[0]) == EVAL_SAMPLES, "padding duplicates (or missing images) in the 2-process predictions"
    assert [(r["index"], r["label"], r["predicted_label"]) for r in rows[0]] == [
        (r["index"], r["label"], r["predicted_label"]) for r in rows[1]
    ]
    for r, q in zip(*rows):
        assert float(r["score"]) == pytest.approx(float(q["score"]), abs=1e-5), r["index"]
    assert distributed["eval_accuracy"] == alone["eval_accuracy"]
    assert distributed["eval_top5_accuracy"] == alone["eval_top5_accuracy"]
    assert distributed["eval_loss"] == pytest.approx(alone["eval_loss"], rel=1e-5)
    # The loss of every image once, from the saved model's logits (independent of both runs' batching).
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    evaluation = datasets.load_dataset(str(cifar10_dir), split="test").shuffle(seed=3).select(range(EVAL_SAMPLES))
    inputs = AutoImageProcessor.from_pretrained(out)([im.convert("RGB") for im in evaluation["img"]], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(evaluation["label"])).item()
    assert distributed["eval_loss"] == pytest.approx(expected, rel=1e-5)


class ForwardDtypes:
    """A TrainerCallback that records the dtype of the classifier's output in every training forward."""

    def __init__(self):
        from transformers import TrainerCallback

        self.dtypes, self.model = [], None
        recorder = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                recorder.model = model

                def hook(module, inputs, output):
                    if module.training:
                        recorder.dtypes.append(output.dtype)

                model.classifier.register_forward_hook(hook)

        self.callback = Callback()


@pytest.mark.parametrize("choice, expected", [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_mixed_precision_sets_the_forward_dtype(cifar10_dir, tmp_path, choice, expected):
    recorder = ForwardDtypes()
    tiny = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"
    args = job_args(tmp_path / "out", cifar10_dir, "--per_device_train_batch_size", "16", "--max_steps", "2",
                    "--save_strategy", "no", "--do_train", "--config_overrides", tiny)
    args[args.index("--mixed_precision") + 1] = choice
    ric.main(args, callbacks=[recorder.callback])
    assert recorder.dtypes == [expected, expected]
    # Autocast computes in bf16 but keeps what it stores in float32: the shortcut's BatchNorm statistics (updated
    # by the two steps) and every bias, in the model and in the saved file.
    norms = [m for m in recorder.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.running_mean.dtype == m.running_var.dtype == torch.float32 for m in norms)
    assert all(int(m.num_batches_tracked) == 2 and bool(m.running_mean.abs().sum() > 0) for m in norms)
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert {tensor.dtype for name, tensor in saved.items() if "num_batches_tracked" not in name} == {torch.float32}


def test_the_flag_reaches_the_training_arguments(tmp_path):
    from dwvit.training.arguments import parse_args

    def built(*flags):
        return parse_args(["--output_dir", str(tmp_path), "--report_to", "none", *flags])[2]

    on_this_cpu = built("--mixed_precision", "bf16")
    assert on_this_cpu.use_cpu  # no accelerator here: the job says so, and gets gloo and DDP under torchrun
    assert (on_this_cpu.mixed_precision, on_this_cpu.bf16, on_this_cpu.fp16) == ("bf16", True, False)
    assert (built("--mixed_precision", "no").mixed_precision, built("--mixed_precision", "no").bf16) == ("no", False)
    assert built("--bf16", "true").mixed_precision == "bf16"
    with pytest.raises(ValueError, match="--bf16 contradicts --mixed_precision no"):
        built("--bf16", "true", "--mixed_precision", "no")
    with pytest.raises(ValueError, match=r"fp16 mixed precision \(--mixed_precision fp16 or --fp16\) needs a GPU"):
        built("--mixed_precision", "fp16")
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        built("--mixed_precision", "half")


def test_auto_precision_follows_the_hardware(monkeypatch):
    import dwvit.training.distributed as distributed

    decide = distributed.decide_mixed_precision
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: False)
    assert decide("auto", on_cpu=True) == "no"  # emulated bf16 is slower than float32 (docs/distributed.md)
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: True)
    # Native bf16 too: with SDPA attention the bf16 step measured 1.37x slower than float32 (docs/distributed.md).
    assert decide("auto", on_cpu=True) == "no"
    assert decide("bf16", on_cpu=True) == "bf16"  # asked for, it is honoured
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert decide("auto", on_cpu=False) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert decide("auto", on_cpu=False) == "fp16"
    assert decide("auto", on_cpu=False, env_choice="bf16") == "bf16"  # an accelerate config's choice
    assert decide("no", on_cpu=False, env_choice="bf16") == "no"  # the flag, when given, wins


def test_this_machine_has_no_native_bf16_exactly_when_its_cpu_flags_say_so():
    from dwvit.training.distributed import cpu_has_native_bf16

    if not Path("/proc/cpuinfo").is_file() or os.uname().machine != "x86_64":
        pytest.skip("reads x86 CPU flags from /proc/cpuinfo")
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


AGREEMENT = textwrap.dedent(
    """
    import importlib.util, json, sys
    import torch.distributed as dist

    rank, store, out, source = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    # The module by its path: it needs torch only, and importing the dwvit package (transformers) takes longer.
    spec = importlib.util.spec_from_file_location("distributed", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rank_zero_decides, rank_zero_value, same_on_every_rank = (
        module.rank_zero_decides, module.rank_zero_value, module.same_on_every_rank
    )
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    outcome = {"stop": rank_zero_decides(rank == 0), "checkpoint": rank_zero_value(f"checkpoint-{rank}")}
    outcome["agreed"] = same_on_every_rank([3, 5], "which images are unreadable")
    try:
        same_on_every_rank([3, 5] if rank == 0 else [3], "which images are unreadable")
    except ValueError as error:
        outcome["error"] = str(error)
    dist.destroy_process_group()
    with open(f"{out}-{rank}.json", "w") as handle:
        json.dump(outcome, handle)
    """
)


def test_decisions_are_taken_once_for_every_rank(tmp_path):
    """Two gloo processes (no Trainer): rank 0's decision reaches both; a disagreement fails both."""
    script = tmp_path / "agree.py"
    script.write_text(AGREEMENT)
    processes = [
        subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path / "store"), str(tmp_path / "out"),
                          str(REPO_ROOT / "src" / "dwvit" / "training" / "distributed.py")])
        for rank in (0, 1)
    ]
    try:
        assert [process.wait(timeout=120) for process in processes] == [0, 0]
    finally:
        for process in processes:
            process.kill()
    for rank in (0, 1):
        outcome = json.loads((tmp_path / f"out-{rank}.json").read_text())
        assert outcome["stop"] is True and outcome["checkpoint"] == "checkpoint-0"
        assert outcome["agreed"] == [3, 5]
        # A disagreement is an error on every rank (none left waiting), naming what differs and where.
        assert "disagree about which images are unreadable: rank(s) [1]" in outcome["error"]


def test_a_bf16_cpu_run_is_told_what_bf16_costs_on_its_cpu(monkeypatch):
    import types

    import dwvit.training.distributed as distributed
    from dwvit.training.validation import cpu_bf16_advice

    bf16_cpu = types.SimpleNamespace(bf16=True, use_cpu=True)
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: False)
    assert "emulated" in cpu_bf16_advice(bf16_cpu, None)
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: True)
    assert "_attn_implementation=eager" in cpu_bf16_advice(bf16_cpu, "hidden_size=96")
    assert cpu_bf16_advice(bf16_cpu, "hidden_size=96, _attn_implementation=eager") is None
    assert cpu_bf16_advice(types.SimpleNamespace(bf16=False, use_cpu=True), None) is None
    assert cpu_bf16_advice(types.SimpleNamespace(bf16=True, use_cpu=False), None) is None

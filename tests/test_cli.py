"""The README's commands, end to end, in a subprocess, on tiny settings, in a copy of the repository."""
import importlib.util
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tqdm import tqdm

import train
from conftest import (
    ARCH_YAML,
    CHECKPOINTS,
    EVAL_CFG,
    FLOW_PY,
    MULTIGPU_CFG,
    SRC,
    TIMEOUT,
    TRAIN_CFG,
    TRAIN_EVAL_CFG,
    checkpoints,
    newest_run,
    run,
    run_all,
    run_folder_of,
    script_env,
)
from engine import config, loop, model_base
from engine.placement import Placement, seed_everything
from engine.runs import read_metrics

NAME = re.compile(r"^(?P<prefix>.+)_epoch(?P<epoch>\d+)(?P<et>_et)?_(?P<stamp>\d{8}-\d{6})\.pth$")
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS_PER_EPOCH = 512 // 32
CHECKPOINT_KEYS = {"model_state_dict", "optimizer_state_dict", "epoch", "loss_history", "config", "architecture"}
EXAMPLE_MODEL = {"architecture_cfg_path": ARCH_YAML, "model_flow_path": FLOW_PY}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def by_epoch(folder, early_stop=False):
    """{epoch: checkpoint path} of the run in `folder` (the newest file for each epoch)."""
    out = {}
    for path in checkpoints(folder):
        m = NAME.match(path.name)
        if m and bool(m["et"]) == early_stop:
            out[int(m["epoch"])] = path
    return out


def sets(*items):
    return [x for item in items for x in ("--set", item)]


def train_args(folder, *overrides):
    """train.py on the example config, saving into its own run folder."""
    return ["train.py", "-t", TRAIN_CFG, *sets(f"saving.save_folder_name={folder}", *overrides)]


def bad_train_args(folder, *overrides):
    """train.py with a mistake: a single epoch, should the mistake go unnoticed."""
    return train_args(folder, "training.n_epochs=1", *overrides)


def same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    return all(torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)


def n_model_params():
    torch.manual_seed(0)
    return sum(p.numel() for p in model_base.build_model(EXAMPLE_MODEL).parameters())


# ---- 1. python train.py -t configs/example_model/example_training_cfg.yaml -----------------------
@pytest.mark.slow
def test_train_writes_initial_and_epoch_checkpoints(trained, trained_run):
    repo, folder = trained
    assert folder.parent == repo / "models/example_model/model_checkpoints/example_run"
    assert folder.name == "run_1"  # the first run of its save_folder_name
    names = [p.name for p in checkpoints(folder)]
    assert names and all(NAME.match(n) for n in names), names
    for name in names:
        m = NAME.match(name)
        assert m["prefix"] == "example_gan" and not m["et"]
        datetime.strptime(m["stamp"], "%Y%m%d-%H%M%S")
    assert sorted(by_epoch(folder)) == [0, 1, 2] and len(names) == 3
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert f"total: {n_model_params():,} parameters" in trained_run.stdout  # the model table is shown


@pytest.mark.slow
def test_checkpoints_hold_what_resuming_needs(trained):
    repo, folder = trained
    arch_text = (repo / ARCH_YAML).read_text()
    for epoch, path in by_epoch(folder).items():
        state = load(path)
        assert CHECKPOINT_KEYS <= set(state), set(state)
        assert state["epoch"] == epoch
        assert not [k for k in state["model_state_dict"] if k.startswith(("module.", "_orig_mod."))]
        assert state["architecture"] == arch_text
        cfg = yaml.safe_load(state["config"])
        assert cfg["training"]["n_epochs"] == 2 and cfg["saving"]["save_epoch_increment"] == 1
        torch.manual_seed(0)
        model_base.build_model(EXAMPLE_MODEL).load_state_dict(state["model_state_dict"])  # strict: every key fits


@pytest.mark.slow
def test_loss_history_has_every_step(trained):
    _, folder = trained
    ckpts = by_epoch(folder)
    history = load(ckpts[2])["loss_history"]
    assert {"generator", "discriminator"} <= set(history)
    for net in ("generator", "discriminator"):
        assert history[net], net
        for term, values in history[net].items():
            assert len(values) == 2 * STEPS_PER_EPOCH, (net, term)
            assert all(isinstance(v, float) and math.isfinite(v) for v in values)
    assert {"g_adv"} <= set(history["generator"]) and {"d_real", "d_fake"} <= set(history["discriminator"])
    first = load(ckpts[1])["loss_history"]
    for net, terms in first.items():  # epoch 1's history is the start of epoch 2's
        for term, values in terms.items():
            assert len(values) == STEPS_PER_EPOCH and values == history[net][term][:STEPS_PER_EPOCH]
    assert not any(load(ckpts[0])["loss_history"].get(net) for net in ("generator", "discriminator"))


@pytest.mark.slow
def test_training_changes_the_weights(trained):
    _, folder = trained
    ckpts = by_epoch(folder)
    start, end = load(ckpts[0])["model_state_dict"], load(ckpts[2])["model_state_dict"]
    for key in start:  # every parameter of both networks was trained
        assert not torch.equal(start[key], end[key]), key


@pytest.mark.slow
def test_config_snapshot_beside_checkpoints(trained):
    _, folder = trained
    snapshots = sorted(folder.glob("*.yaml"))
    assert len(snapshots) == 1
    snap = yaml.safe_load(snapshots[0].read_text())
    assert snap["training"]["n_epochs"] == 2 and snap["saving"]["save_epoch_increment"] == 1  # overrides included
    assert snap["model"]["architecture_cfg_path"] == ARCH_YAML
    assert snap == yaml.safe_load(load(by_epoch(folder)[2])["config"])


# ---- 2. python evaluate_training.py -te ... ---------------------------------------------------
@pytest.mark.slow
def test_evaluate_training(trained):
    """One run: its figure and its final/best table, from every step of its metrics.jsonl."""
    repo, folder = trained
    proc = run(repo, "evaluate_training.py", "-te", TRAIN_EVAL_CFG)
    out = repo / "results/example_model/example_run" / folder.name
    png = out / "training_losses.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000
    table = (out / "training_summary.md").read_text()
    assert table.splitlines()[0] == f"| | {folder.name} |" and table in proc.stdout
    rows = {line.split(",")[0]: line.split(",")[1:] for line in (out / "training_summary.csv").read_text().splitlines()}
    assert rows["steps"] == [str(2 * STEPS_PER_EPOCH)]
    assert {"final generator/g_adv", "final discriminator/d_real", "final discriminator/d_fake"} <= set(rows)
    assert not [name for name in rows if name.startswith("best ")]  # a GAN's losses have no "best"


# ---- 3. python evaluate.py -t ... -e ... --------------------------------------------------------
@pytest.mark.slow
def test_evaluate(trained):
    repo, folder = trained
    proc = run(repo, "evaluate.py", "-t", TRAIN_CFG, "-e", EVAL_CFG)
    out = repo / "results/example_model/example_run" / folder.name  # the run's own results
    stem = by_epoch(folder)[2].stem  # `latest`
    metrics_path = saved_metrics(proc)
    assert re.fullmatch(rf"{stem}_all_[0-9a-f]{{8}}_metrics.json", metrics_path.name)  # no split: all
    assert metrics_path.parent == out
    assert metrics_path.with_name(metrics_path.name.replace("_metrics.json", "_samples.png")).read_bytes()[:8] \
        == PNG_MAGIC
    metrics = json.loads(metrics_path.read_text())
    assert metrics["n_samples"] == 64 and metrics["evaluation"]["n_samples"] == 64
    assert Path(metrics["checkpoint"]).name == f"{stem}.pth"
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    assert len(numbers) >= 5 and all(math.isfinite(v) for v in numbers.values())
    assert -1 <= metrics["output_min"] <= metrics["output_mean"] <= metrics["output_max"] <= 1  # Tanh output
    assert "discriminator_score_real" in metrics and "target_to_nearest_output" in metrics


@pytest.mark.slow
def test_evaluating_with_other_settings_adds_files(trained):
    """--set evaluation.n_samples=16 writes files of its own beside the 64-sample ones; the same
    evaluation again replaces only its own, identical, metrics."""
    repo, _ = trained
    default = saved_metrics(run(repo, "evaluate.py", "-t", TRAIN_CFG, "-e", EVAL_CFG))
    before = default.read_bytes()
    fewer = saved_metrics(run(repo, "evaluate.py", "-t", TRAIN_CFG, "-e", EVAL_CFG, *sets("evaluation.n_samples=16")))
    assert fewer != default and fewer.parent == default.parent
    assert json.loads(fewer.read_text())["n_samples"] == 16 and default.read_bytes() == before
    assert saved_metrics(run(repo, "evaluate.py", "-t", TRAIN_CFG, "-e", EVAL_CFG)) == default
    assert default.read_bytes() == before


def saved_metrics(proc):
    """The metrics file an evaluate.py run says it saved."""
    [path] = [line.removeprefix("saved ") for line in proc.stdout.splitlines()
              if line.startswith("saved ") and line.endswith("_metrics.json")]
    return Path(path)


def evaluation_hash(out, stem, split):
    """The settings hash of the one evaluation of `stem` on `split` in the results folder `out`
    (<checkpoint>_<split>_<hash>_metrics.json)."""
    [path] = out.glob(f"{stem}_{split}_*_metrics.json")
    digest = path.name[len(f"{stem}_{split}_"):-len("_metrics.json")]
    assert re.fullmatch(r"[0-9a-f]{8}", digest) and json.loads(path.read_text())["settings_hash"] == digest
    return digest


def test_paired_metrics_of_known_errors():
    """PSNR uses the width of the targets' range as the peak: outputs off by 0.1 everywhere from
    targets in [-1, 1] are at 10 log10(4 / 0.01) dB."""
    import evaluate
    from dataset_base import ValueRange
    targets, symmetric = torch.linspace(-0.9, 0.9, 64).view(4, 1, 4, 4), ValueRange(-1.0, 1.0, "test", True)
    metrics = evaluate.pairwise_metrics(targets + 0.1, targets, symmetric)
    assert metrics["l1"] == pytest.approx(0.1) and metrics["mse"] == pytest.approx(0.01)
    assert metrics["psnr_db"] == pytest.approx(10 * math.log10(4 / 0.01))
    identity = evaluate.pairwise_metrics(targets, targets, symmetric)  # the identity model: infinite, so null
    assert identity["psnr_db"] is None and "infinite" in identity["psnr_db_reason"]


@pytest.mark.slow
def test_evaluate_a_model_trained_without_discriminator(trained):
    """A plain (non-adversarial) run evaluates with pairwise metrics and no discriminator scores."""
    repo, _ = trained
    plain = ["loss.loss_fn=weighted_reconstruction_loss", "loss.loss_args={}",
             "adversarial.enable_adversarial_training=false"]
    run(repo, *train_args("plain_run", "training.n_epochs=1", *plain))
    proc = run(repo, "evaluate.py", "-t", TRAIN_CFG, "-e", EVAL_CFG,
               *sets("saving.save_folder_name=plain_run", *plain, "evaluation.n_samples=16"))
    metrics = json.loads(proc.stdout[proc.stdout.index("{"):proc.stdout.rindex("}") + 1])
    assert metrics["n_samples"] == 16 and metrics["l1"] > 0 and math.isfinite(metrics["psnr_db"])
    assert "discriminator_score_real" not in metrics


@pytest.mark.slow
def test_evaluate_rebuilds_the_architecture_stored_in_the_checkpoint(trained, tmp_path):
    """A checkpoint is evaluated with the architecture it was trained with, even after the YAML on
    disk changed; the script says so."""
    repo, folder = trained
    changed = tmp_path / "changed_arch.yaml"
    changed.write_text((SRC / ARCH_YAML).read_text().replace("out_features: 64}", "out_features: 32}", 1))
    proc = run(repo, "evaluate.py", "-t", TRAIN_CFG, "-e", EVAL_CFG,
               *sets(f"model.architecture_cfg_path={changed}", "evaluation.n_samples=4"))
    assert f"{changed} has changed since {by_epoch(folder)[2].name} was trained" in proc.stderr, proc.stderr
    assert json.loads(proc.stdout[proc.stdout.index("{"):proc.stdout.rindex("}") + 1])["n_samples"] == 4


# ---- 4. python jit_trace_model.py -t ... -c <checkpoint> -i 1 1 4 4 -----------------------------
def eager_model(checkpoint, model_cfg=EXAMPLE_MODEL):
    torch.manual_seed(0)
    model = model_base.build_model(model_cfg)
    model.load_state_dict(load(checkpoint)["model_state_dict"])
    return model.eval()


def check_traced(checkpoint, shape, model_cfg=EXAMPLE_MODEL, fmt="torchscript"):
    """The artifact and the raw input (with its JSON sidecar) that jit_trace_model.py wrote for
    `checkpoint`; the artifact run on the raw input gives the eager model's output."""
    jit = checkpoint.parent / "jit"
    tag = "x".join(map(str, shape))
    suffix = {"torchscript": "_traced.pt", "export": "_exported.pt2", "onnx": ".onnx"}[fmt]
    artifact, raw_path = jit / f"{checkpoint.stem}_{tag}{suffix}", jit / f"{checkpoint.stem}_input_{tag}.raw"
    assert raw_path.stat().st_size == 4 * math.prod(shape)  # float32
    sidecar = json.loads((jit / f"{artifact.name}.json").read_text())
    assert sidecar["shape"] == list(shape) and sidecar["dtype"] == "float32"
    assert sidecar["checkpoint"] == checkpoint.name
    assert sidecar["model"] == artifact.name and sidecar["format"] == fmt and "C order" in sidecar["layout"]
    x = torch.from_numpy(np.fromfile(raw_path, dtype=np.float32).reshape(shape))
    if fmt == "torchscript":
        run_artifact = torch.jit.load(str(artifact))
    elif fmt == "export":
        run_artifact = torch.export.load(str(artifact)).module()
    else:
        import onnxruntime
        session = onnxruntime.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])
        def run_artifact(x):
            return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        expected = eager_model(checkpoint, model_cfg)(x)
        torch.testing.assert_close(run_artifact(x), expected, rtol=0, atol=1e-5 if fmt == "onnx" else 1e-6)
        assert expected.shape == (shape[0], 1, *shape[2:])


@pytest.mark.slow
def test_jit_trace_latest_for_two_shapes(trained):
    """Exports for two input shapes are two sets of files: the second leaves the first as it was."""
    repo, folder = trained
    latest = by_epoch(folder)[2]
    run(repo, "jit_trace_model.py", "-t", TRAIN_CFG, "-c", "latest", "-i", "1", "1", "4", "4")
    first = (latest.parent / "jit" / f"{latest.stem}_1x1x4x4_traced.pt").read_bytes()
    run(repo, "jit_trace_model.py", "-t", TRAIN_CFG, "-c", "latest", "-i", "5", "1", "4", "4")
    assert (latest.parent / "jit" / f"{latest.stem}_1x1x4x4_traced.pt").read_bytes() == first
    check_traced(latest, (1, 1, 4, 4))
    check_traced(latest, (5, 1, 4, 4))


@pytest.mark.slow
def test_jit_trace_named_checkpoint_long_options(trained):
    repo, folder = trained
    ckpt = by_epoch(folder)[1]
    run(repo, "jit_trace_model.py", "--training_cfg", TRAIN_CFG, "--checkpoint", ckpt.name,
        "--input_size", "2", "1", "4", "4")
    check_traced(ckpt, (2, 1, 4, 4))


@pytest.mark.slow
def test_jit_export_format_with_benchmark(trained):
    """--format export writes a torch.export program (.pt2) that gives the eager outputs; --benchmark
    prints the latency of both."""
    repo, folder = trained
    proc = run(repo, "jit_trace_model.py", "-t", TRAIN_CFG, "-c", "latest", "-i", "3", "1", "4", "4",
               "--format", "export", "--benchmark", "20")
    check_traced(by_epoch(folder)[2], (3, 1, 4, 4), fmt="export")
    for name in ("eager", "export"):
        assert re.search(rf"^  {name} +median +[0-9.]+ ms +p90 +[0-9.]+ ms$", proc.stdout, re.M), proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without GPUs")
@pytest.mark.slow
def test_jit_benchmark_on_a_gpu_this_machine_lacks(trained):
    """--device cuda without a GPU is a user error, reported before anything is exported."""
    repo, _ = trained
    proc = run(repo, "jit_trace_model.py", "-t", TRAIN_CFG, "-c", "latest", "-i", "7", "1", "4", "4",
               "--benchmark", "5", "--device", "cuda", check=False)
    assert proc.returncode == 2 and "--device cuda: this machine has 0 GPU(s); use cpu" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "saved" not in proc.stdout


@pytest.mark.slow
def test_jit_onnx_format_or_a_clear_message(trained):
    """--format onnx writes an ONNX model that onnxruntime runs to the eager outputs; without the
    packages it says which to install (exit 2)."""
    repo, folder = trained
    args = ["jit_trace_model.py", "-t", TRAIN_CFG, "-c", "latest", "-i", "2", "1", "4", "4", "--format", "onnx"]
    if not all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime")):
        proc = run(repo, *args, check=False)
        assert proc.returncode == 2 and "pip install onnx onnxscript onnxruntime" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        return
    run(repo, *args)
    check_traced(by_epoch(folder)[2], (2, 1, 4, 4), fmt="onnx")


DATA_DEPENDENT_FLOW = """
from example_model import ExampleModel


class ScaledByInput(ExampleModel):
    def forward(self, inputs):
        return super().forward(inputs) * float(inputs.abs().max())  # a Python number read off the data
"""


@pytest.mark.parametrize("fmt", ["torchscript", "export"])
@pytest.mark.slow
def test_jit_refuses_a_flow_with_data_dependent_control_flow(trained, tmp_path, fmt):
    """A forward that depends on the data in Python cannot be traced or exported faithfully: exit 2,
    a message saying so, and nothing written."""
    repo, folder = trained
    flow = repo / "models/example_model/scaled_by_input.py"
    flow.write_text(DATA_DEPENDENT_FLOW)
    started = time.time()
    try:
        proc = run(repo, "jit_trace_model.py", "-t", TRAIN_CFG, "-c", "latest", "-i", "5", "1", "4", "4", "--format",
                   fmt, *sets(f"model.model_flow_path={flow}"), check=False)
    finally:
        flow.unlink()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "data-dependent control flow" in proc.stderr, proc.stderr
    assert str(flow) in proc.stderr
    jit = folder / "jit"
    assert not jit.exists() or all(p.stat().st_mtime < started for p in jit.iterdir())


# ---- the U-Net example: its README commands on 32 images for one epoch ---------------------------
UNET_CFG = "configs/unet_gan/unet_gan_training_cfg.yaml"
UNET_EVAL_CFG = "configs/unet_gan/unet_gan_evaluation_cfg.yaml"
UNET_TRAIN_EVAL_CFG = "configs/unet_gan/unet_gan_training_evaluation_cfg.yaml"
UNET_MODEL = {"architecture_cfg_path": "models/unet_gan/unet_gan_architecture.yaml",
              "model_flow_path": "models/unet_gan/unet_gan.py"}
UNET_STEPS = -(-29 // 8)  # 32 images, 3 held out for validation, in batches of 8


UNET_DATA = ["dataset.noisy_images.n_inputs=32", "dataset.clean_images.n_inputs=32"]  # 3 of them held out


@pytest.fixture(scope="module")
def unet_trained(repo):
    run(repo, "train.py", "-t", UNET_CFG, *sets("training.n_epochs=1", "training.batch_size=8", *UNET_DATA))
    return repo, newest_run(repo / "models/unet_gan/model_checkpoints/denoise_run")


@pytest.mark.slow
def test_unet_example_trains_both_networks(unet_trained):
    _, folder = unet_trained
    ckpts = by_epoch(folder)
    assert sorted(ckpts) == [0, 1]
    history = load(ckpts[1])["loss_history"]
    assert {"g_adv", "l1"} <= set(history["generator"]) and {"d_real", "d_fake"} <= set(history["discriminator"])
    assert all(len(values) == UNET_STEPS for terms in history.values() for values in terms.values())
    start, end = load(ckpts[0])["model_state_dict"], load(ckpts[1])["model_state_dict"]
    trained_keys = [k for k in start if start[k].is_floating_point() and not torch.equal(start[k], end[k])]
    assert any(k.startswith("model_components.generator.") for k in trained_keys)
    assert any(k.startswith("model_components.discriminator.") for k in trained_keys)


@pytest.mark.slow
def test_unet_example_evaluates_and_traces(unet_trained):
    repo, folder = unet_trained
    stem = by_epoch(folder)[1].stem
    run(repo, "evaluate.py", "-t", UNET_CFG, "-e", UNET_EVAL_CFG, *sets("evaluation.n_samples=8", *UNET_DATA))
    out = repo / "results/unet_gan/denoise_run" / folder.name
    digest = evaluation_hash(out, stem, "validation")
    metrics = json.loads((out / f"{stem}_validation_{digest}_metrics.json").read_text())  # its held-out images
    assert metrics["n_samples"] == 3  # all 3 held out
    # its PatchGAN scores a map of patches per sample: no score of a sample to report, and a note says so
    assert "discriminator_score_generated" not in metrics and any("PatchGAN" in n for n in metrics["notes"])
    # paired data: output vs target and, for reference, the noisy input vs target
    assert metrics["l1"] >= 0 and metrics["mse"] >= 0 and math.isfinite(metrics["psnr_db"])
    assert 10 < metrics["input_psnr_db"] < 14  # noise of std 0.5 on data in [-1, 1]: about 12 dB
    assert "output_to_nearest_target" not in metrics
    assert (out / f"{stem}_validation_{digest}_samples.png").read_bytes()[:8] == PNG_MAGIC
    run(repo, "evaluate_training.py", "-te", UNET_TRAIN_EVAL_CFG)
    assert (out / "training_losses.png").read_bytes()[:8] == PNG_MAGIC
    run(repo, "jit_trace_model.py", "-t", UNET_CFG, "-c", "latest", "-i", "2", "1", "32", "32")
    check_traced(by_epoch(folder)[1], (2, 1, 32, 32), UNET_MODEL)


# ---- --help -------------------------------------------------------------------------------------
HELP = {
    "train.py": ["-t", "--training_cfg", "--set", "--debug"],
    "evaluate.py": ["-t", "--training_cfg", "-e", "--evaluation_cfg", "--set"],
    "evaluate_training.py": ["-te", "--training_evaluation_cfg"],
    "jit_trace_model.py": ["-t", "--training_cfg", "-c", "--checkpoint", "-i", "--input_size"],
}


@pytest.fixture(scope="module")
def help_runs(repo):
    return run_all(repo, {script: [script, "--help"] for script in HELP})


@pytest.mark.parametrize("script", list(HELP))
@pytest.mark.slow
def test_help(help_runs, script):
    proc = help_runs[script]
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
    for option in HELP[script]:
        assert re.search(rf"(^|[\s,]){re.escape(option)}\b", proc.stdout), option


@pytest.mark.parametrize("script", list(HELP))
def test_help_and_argument_errors_answer_before_torch_is_imported(repo, script):
    """--help and a wrong argument answer from argparse alone (a tenth of a second, where
    importing torch takes seconds): no module of torch, numpy or matplotlib is imported."""
    for args, status in ((["--help"], 0), (["--no-such-option"], 2)):
        proc = run(repo, "-X", "importtime", script, *args, check=False)
        assert proc.returncode == status, proc.stderr
        imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                    if line.startswith("import time:")]
        assert "argparse" in imported
        heavy = [m for m in imported if m.split(".")[0] in ("torch", "numpy", "matplotlib")]
        assert not heavy, heavy[:5]


# ---- DDP on the CPU -----------------------------------------------------------------------------
DDP_BATCH = 32
DDP_SETS = ["training.gpus=[]", "training.n_epochs=1", f"training.batch_size={DDP_BATCH}",
            "dataset.real_images.data_batch_transform=null", "dataset.gen_inputs.data_batch_transform=null"]


# Sample metrics in the DDP run only: the one-process runs it is compared with go without them, which
# also shows that measuring leaves training alone.
DDP_SAMPLE_SETS = ["sample_metrics.every_epochs=1", "sample_metrics.feature_extractor=pixels",
                   "sample_metrics.metrics=[fid,kid,precision_recall]", "sample_metrics.n_samples=300"]


@pytest.fixture(scope="module")
def ddp_run(repo):
    proc = run(repo, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
               "train.py", "-t", MULTIGPU_CFG, *sets(*DDP_SETS, *DDP_SAMPLE_SETS))
    return proc, newest_run(repo / CHECKPOINTS / "example_multigpu_run")


@pytest.mark.slow
def test_ddp_trains_and_saves(ddp_run):
    _, folder = ddp_run
    ckpts = by_epoch(folder)
    assert sorted(ckpts) == [0, 1]
    state = load(ckpts[1])
    assert state["epoch"] == 1
    assert not [k for k in state["model_state_dict"] if k.startswith(("module.", "_orig_mod."))]
    steps = 512 // (2 * DDP_BATCH)  # each process reads half of the data
    for net in ("generator", "discriminator"):
        assert all(len(v) == steps for v in state["loss_history"][net].values())
    assert len(list(folder.glob("*.yaml"))) == 1  # one snapshot: only rank 0 writes


@pytest.mark.slow
def test_two_nodes_over_loopback_rendezvous_train_as_one_run(repo):
    """torchrun on two "nodes" of one process each, meeting through a c10d rendezvous on this
    machine, trains one run: each process reads half the data, rank 0 alone saves."""
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two_nodes", "train.py", "-t", MULTIGPU_CFG,
           *sets(*DDP_SETS, "saving.save_folder_name=two_nodes")]
    nodes = [subprocess.Popen(cmd, cwd=repo, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=TIMEOUT) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, f"{out[-2000:]}\n{err[-3000:]}"
    assert sum("trained to epoch 1" in out for out, _ in outputs) == 1  # rank 0's node alone reports
    ckpts = by_epoch(newest_run(repo / CHECKPOINTS / "two_nodes"))
    assert sorted(ckpts) == [0, 1]
    history = load(ckpts[1])["loss_history"]
    assert all(len(v) == 512 // (2 * DDP_BATCH) for terms in history.values() for v in terms.values())


def one_process_weights(*overrides):
    """The weights after one epoch of one process, trained in this process (nothing is saved),
    on the multi-GPU config on the CPU with `overrides`."""
    cfg = config.load_training_config(SRC / MULTIGPU_CFG, overrides=list(overrides))
    seed_everything(cfg["training"]["seed"])
    model = model_base.build_model(cfg["model"])
    # One process reads the union of the two shards (a one-replica DistributedSampler order).
    placement = Placement(torch.device("cpu"))
    loader, _ = train.make_loaders(cfg, model, placement, MULTIGPU_CFG)
    trainer = loop.Trainer(cfg, model, loader, placement)
    assert trainer.run_epoch(1, tqdm(disable=True))
    return model.state_dict()


@pytest.mark.slow
def test_ddp_sample_metrics_are_those_of_one_process(repo, ddp_run):
    """Rank 0 measures alone, once per epoch: the numbers it logged are evaluate.py's, in one
    process, on the same checkpoints and samples."""
    _, folder = ddp_run
    logged = {row["epoch"]: row for row in read_metrics(folder / "metrics.jsonl") if "sample/fid" in row}
    assert sorted(logged) == [0, 1]  # once per epoch (and before the first), not once per process
    for epoch, path in by_epoch(folder).items():
        proc = run(repo, "evaluate.py", "-t", MULTIGPU_CFG, "-e", EVAL_CFG, *sets(
            *DDP_SETS, f"evaluation.model_checkpoint_filename={path}", "evaluation.n_samples=300",
            "evaluation.feature_extractor=pixels", "evaluation.sample_metrics=[fid,kid,precision_recall]"))
        saved = next(line.removeprefix("saved ") for line in proc.stdout.splitlines() if line.endswith("_metrics.json"))
        found = json.loads(Path(saved).read_text())
        for key in ("fid", "kid_mean", "kid_std", "precision", "recall"):
            assert found[key] == pytest.approx(logged[epoch][f"sample/{key}"], rel=1e-6, abs=1e-9), (epoch, key)


@pytest.mark.slow
def test_ddp_matches_one_process_with_the_whole_batch(ddp_run):
    """Two processes with batch b must train exactly like one with batch 2b on the same samples
    (gradients averaged over the same 2b samples). DistributedSampler's order is a seeded
    permutation split between the ranks, so one process reading the same permutation in steps of
    2b sees, at each step, the union of the two ranks' batches."""
    _, folder = ddp_run
    whole_batch = [s for s in DDP_SETS if not s.startswith("training.batch_size")] + [
        f"training.batch_size={2 * DDP_BATCH}"]
    assert_trained_alike(folder, one_process_weights(*whole_batch))


@pytest.mark.slow
def test_ddp_with_accumulation_and_a_gradient_penalty_matches_one_process(repo):
    """The same with what strains DDP most: each process sums two half batches per step, and the
    discriminator's loss holds R1, a penalty on its input gradient (a double backward inside the
    DDP-wrapped loss). (That the sum is reduced once per step, not per batch, which gives the same
    weights, is counted in test_training_options.py.)"""
    strained = [*DDP_SETS, "loss.loss_fn=bce_gan_loss", "loss.loss_args={r1_weight: 1.0}",
                "saving.save_folder_name=ddp_r1_accumulated"]
    run(repo, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2", "train.py", "-t",
        MULTIGPU_CFG, *sets(*strained, f"training.batch_size={DDP_BATCH // 2}", "training.grad_accumulation_steps=2"))
    whole_batch = [*strained, f"training.batch_size={2 * DDP_BATCH}"]
    assert_trained_alike(newest_run(repo / CHECKPOINTS / "ddp_r1_accumulated"), one_process_weights(*whole_batch))


def assert_trained_alike(folder, weights, leave_out=()):
    ddp = load(by_epoch(folder)[1])["model_state_dict"]
    start = load(by_epoch(folder)[0])["model_state_dict"]
    assert not same_weights(start, ddp, atol=1e-4)  # the DDP run did train
    kept = [k for k in ddp if k not in leave_out]
    assert same_weights({k: ddp[k] for k in kept}, {k: weights[k] for k in kept}, atol=1e-5)
    return start, ddp


@pytest.mark.slow
def test_ddp_trains_a_flow_that_leaves_parameters_unused(repo, tmp_path):
    """Each network's gradients are averaged in one all-reduce, whatever its loss reached: a flow
    that never calls one of the generator's submodels trains under DDP as in one process, and the
    submodel's weights stay as they started."""
    flow = tmp_path / "skips_gen_dec.py"
    flow.write_text(textwrap.dedent("""\
        import torch
        from engine.model_base import PyNet


        class SkipsDecoder(PyNet):
            target_key = "real_images"

            def forward(self, inputs):  # gen_cnn's code made an image without gen_dec
                code = self.model_components["generator"]["gen_cnn"](inputs, {})
                return torch.tanh(code[:, :16].reshape(-1, 1, 4, 4))

            def discriminate(self, images, inputs=None):
                return self.model_components["discriminator"]["disc_cnn"](images)
        """))
    unused = [*DDP_SETS, f"model.model_flow_path={flow}", "saving.save_folder_name=ddp_unused"]
    run(repo, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2", "train.py",
        "-t", MULTIGPU_CFG, *sets(*unused))
    start, end = assert_trained_alike(newest_run(tmp_path / "model_checkpoints" / "ddp_unused"),  # (beside the flow)
                                      one_process_weights(*unused, f"training.batch_size={2 * DDP_BATCH}"))
    decoder = [k for k in start if ".gen_dec." in k]
    assert decoder and all(torch.equal(start[k], end[k]) for k in decoder)


@pytest.mark.slow
def test_ddp_trains_a_flow_defined_step_as_one_process_of_the_doubled_batch(repo, tmp_path):
    """Two processes of a flow with its own step (three networks, two sharing the generator, one
    updated every second step; tests/test_own_step.py) end where one process does on both halves
    of the data at once. (Its buffer follows each process's own shard, and rank 0's is saved.)"""
    from test_own_step import ARCHITECTURE, FLOW, NETWORKS
    (tmp_path / "info_toy.yaml").write_text(ARCHITECTURE)
    (tmp_path / "info_toy.py").write_text(FLOW)
    own = [*DDP_SETS, f"model.architecture_cfg_path={tmp_path / 'info_toy.yaml'}",
           f"model.model_flow_path={tmp_path / 'info_toy.py'}", "loss.loss_fn=null", "loss.loss_args={}",
           "adversarial.enable_adversarial_training=false", NETWORKS, "saving.save_folder_name=ddp_own_step"]
    run(repo, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2", "train.py",
        "-t", MULTIGPU_CFG, *sets(*own))
    assert_trained_alike(newest_run(tmp_path / "model_checkpoints" / "ddp_own_step"),
                         one_process_weights(*own, f"training.batch_size={2 * DDP_BATCH}"), leave_out=["real_score"])


# ---- resume -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resumed(trained):
    """The same command (model_checkpoint_filename: latest) three times: the first starts the run
    (there is no checkpoint yet) and trains 1 epoch, the second resumes to 2, the third has
    nothing left to do."""
    repo, _ = trained
    first = run(repo, *train_args("resume_run", "training.n_epochs=1", "model.model_checkpoint_filename=latest"))
    folder = run_folder_of(first)
    after_first = by_epoch(folder)
    second = run(repo, *train_args("resume_run", "training.n_epochs=2", "model.model_checkpoint_filename=latest"))
    after_second = by_epoch(folder)
    before_third = set(checkpoints(folder))
    third = run(repo, *train_args("resume_run", "training.n_epochs=2", "model.model_checkpoint_filename=latest"))
    return {"folder": folder, "runs": (first, second, third), "after_first": after_first,
            "after_second": after_second, "before_third": before_third}


@pytest.mark.slow
def test_same_config_gives_same_weights(trained, resumed):
    """Reproducible by default: the resume test's first epoch equals the tiny run's first epoch."""
    _, folder = trained
    a = load(by_epoch(folder)[1])["model_state_dict"]
    b = load(resumed["after_first"][1])["model_state_dict"]
    assert same_weights(a, b)


@pytest.mark.slow
def test_resume_continues_to_n_epochs(resumed):
    assert sorted(resumed["after_first"]) == [0, 1]
    assert sorted(resumed["after_second"]) == [0, 1, 2]
    assert resumed["after_second"][1] == resumed["after_first"][1]  # no epoch trained twice
    assert "no checkpoint yet: starting a new run" in resumed["runs"][0].stdout
    assert "resuming example_gan_epoch1_" in resumed["runs"][1].stdout
    state = load(resumed["after_second"][2])
    assert state["epoch"] == 2 and state["step"] == 2 * STEPS_PER_EPOCH
    for net in ("generator", "discriminator"):
        assert all(len(v) == 2 * STEPS_PER_EPOCH for v in state["loss_history"][net].values())


@pytest.mark.slow
def test_resumed_run_matches_uninterrupted_run(trained, resumed):
    _, folder = trained
    straight = load(by_epoch(folder)[2])
    resumed_state = load(resumed["after_second"][2])
    assert same_weights(straight["model_state_dict"], resumed_state["model_state_dict"], atol=1e-6)
    assert resumed_state["loss_history"] == straight["loss_history"]


@pytest.mark.slow
def test_resume_when_done_does_nothing(resumed):
    third = resumed["runs"][2]
    assert third.returncode == 0
    assert "nothing to do" in third.stdout
    assert set(checkpoints(resumed["folder"])) == resumed["before_third"]


# ---- user errors --------------------------------------------------------------------------------
def write_arch(tmp, name, mutate):
    arch = yaml.safe_load((SRC / ARCH_YAML).read_text())
    mutate(arch)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(arch, sort_keys=False))
    return path


def set_skip(sub, source, target, kind):
    return lambda a: a[sub].__setitem__("skip_connections",
                                        {source: {"future_layers": [target], "connection_types": [kind]}})


def set_layer(sub, index, layer):
    return lambda a: a[sub]["layers"].__setitem__(index, layer)


ARCH_CASES = {
    "arch_unknown_layer_type": (set_layer("disc_cnn", 0, {"Conv2D": {"out_channels": 16, "kernel_size": 3}}),
                                ["disc_cnn.layers[0].layer_type", "did you mean 'Conv2d'"]),
    "arch_unknown_layer_param": (set_layer("disc_cnn", 2, {"Conv2d": {"out_channels": 32, "kernal_size": 3,
                                                                      "stride": 2, "padding": 1}}),
                                 ["disc_cnn.layers[2].layer_params.kernal_size", "did you mean 'kernel_size'"]),
    "arch_skip_to_earlier_layer": (set_skip("gen_cnn", "gen_cnn_LeakyReLU_4", "gen_cnn_LeakyReLU_2", "add"),
                                   ["gen_cnn.skip_connections.gen_cnn_LeakyReLU_4.future_layers[0]", "runs before"]),
    "arch_unknown_connection_type": (set_skip("gen_cnn", "gen_cnn_LeakyReLU_2", "gen_cnn_LeakyReLU_4", "ad"),
                                     ["gen_cnn.skip_connections.gen_cnn_LeakyReLU_2.connection_types[0]",
                                      "did you mean 'add'"]),
    "arch_add_mismatched_shapes": (set_skip("gen_cnn", "gen_cnn_Flatten_0", "gen_cnn_LeakyReLU_4", "add"),
                                   ["gen_cnn.skip_connections.gen_cnn_Flatten_0", "[16]", "[64]"]),
    "arch_skip_generator_into_discriminator": (set_skip("gen_cnn", "gen_cnn_Flatten_0", "disc_cnn_Flatten_4", "cat"),
                                               ["gen_cnn.skip_connections.gen_cnn_Flatten_0.future_layers[0]",
                                                "discriminator"]),
    "arch_skip_into_submodel_input": (set_skip("gen_cnn", "gen_cnn_LeakyReLU_2", "gen_dec_input", "add"),
                                      ["gen_cnn.skip_connections.gen_cnn_LeakyReLU_2.future_layers[0]",
                                       "submodel's input"]),
    "arch_missing_layer_param": (set_layer("disc_cnn", 0, {"Conv2d": {"kernel_size": 3}}),
                                 ["disc_cnn.layers[0].layer_params", "Conv2d needs out_channels"]),
    "arch_skip_to_unknown_layer": (set_skip("gen_cnn", "gen_cnn_LeakyReLU_2", "gen_cnn_Linear_9", "add"),
                                   ["gen_cnn.skip_connections.gen_cnn_LeakyReLU_2.future_layers[0]",
                                    "unknown layer 'gen_cnn_Linear_9'", "did you mean 'gen_cnn_Linear_"]),
    "arch_skip_from_unknown_layer": (set_skip("gen_cnn", "gen_cnn_ReLU_2", "gen_cnn_LeakyReLU_4", "add"),
                                     ["gen_cnn.skip_connections.gen_cnn_ReLU_2", "unknown source layer",
                                      "did you mean 'gen_cnn_LeakyReLU_2'"]),
    "arch_cat_mismatched_spatial_size": (set_skip("disc_cnn", "disc_cnn_Conv2d_0", "disc_cnn_LeakyReLU_3", "cat"),
                                         ["disc_cnn.skip_connections.disc_cnn_Conv2d_0",
                                          "cat into disc_cnn_LeakyReLU_3", "[16, 4, 4]", "[32, 2, 2]"]),
    "arch_reads_undefined_submodel": (lambda a: a["disc_cnn"].__setitem__("submodel_input", {"gen_decc": "output"}),
                                      ["disc_cnn.submodel_input.gen_decc", "unknown submodel",
                                       "did you mean 'gen_dec'"]),
    "arch_reads_later_submodel": (lambda a: a["gen_cnn"].__setitem__("submodel_input", {"gen_dec": "output"}),
                                  ["gen_cnn.submodel_input.gen_dec", "does not run before"]),
    "arch_component_lists_undefined_submodel": (
        lambda a: a["model_components"]["generator"].__setitem__("submodels", ["gen_cnn", "gen_decc"]),
        ["model_components.generator.submodels[1]", "did you mean 'gen_dec'"]),
    "arch_layer_cannot_take_input_shape": (set_layer("gen_dec", 2, {"Conv1d": {"out_channels": 16, "kernel_size": 3}}),
                                           ["gen_dec.layers[2]", "Conv1d cannot take an input of shape [4, 4, 4]"]),
    "arch_lazy_layer": (set_layer("disc_cnn", 0, {"LazyConv2d": {"out_channels": 16, "kernel_size": 3}}),
                        ["disc_cnn.layers[0].layer_type", "use Conv2d"]),
}


class RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def no_file_matching(pattern):
    return lambda repo: not list(repo.rglob(pattern))


@pytest.fixture(scope="module")
def error_runs(trained, tmp_path_factory):
    """Every user-error case, run two at a time.

    name -> (CompletedProcess, (args, strings stderr must hold, nothing-written check), repo, marker
    file that the malicious checkpoint would create)."""
    repo, _ = trained
    tmp = tmp_path_factory.mktemp("errors")
    marker = tmp / "pwned"
    evil_dir = tmp / "evil"
    evil_dir.mkdir()
    evil = evil_dir / "evil.pth"
    torch.save({"model_state_dict": RunsCode(f"touch {marker}"), "epoch": 1}, evil)
    assert evil.is_file() and not marker.exists()

    cases = {  # name: (args, strings stderr must hold, check that nothing was written)
        "unknown_key": (bad_train_args("err_unknown_key", "training.n_epoch=3"),
                        [TRAIN_CFG, "training.n_epoch", "did you mean 'n_epochs'"], None),
        "wrong_type": (bad_train_args("err_wrong_type", "training.batch_size=abc"),
                       [TRAIN_CFG, "training.batch_size", "abc"], None),
        "out_of_range": (bad_train_args("err_out_of_range", "training.batch_size=0"),
                         [TRAIN_CFG, "training.batch_size", ">= 1"], None),
        "unknown_loss": (bad_train_args("err_unknown_loss", "loss.loss_fn=nope"),
                         [TRAIN_CFG, "loss.loss_fn", "nope", "example_gan_loss"], None),
        "missing_data_path": (bad_train_args("err_missing_data",
                                             "dataset.real_images.data_path=data/example_model/nope.npy"),
                              [TRAIN_CFG, "dataset.real_images.data_path", "nope.npy"], None),
        "missing_config_file": (["train.py", "-t", "configs/example_model/nope.yaml",
                                 *sets("saving.save_folder_name=err_missing_cfg")],
                                ["configs/example_model/nope.yaml", "not found"], None),
        "missing_cli_argument": (["train.py"], ["-t/--training_cfg"], None),
        "evaluation_config_value": (["evaluate.py", "-t", TRAIN_CFG, "-e", EVAL_CFG, "--set", "evaluation.n_samples=0"],
                                    [EVAL_CFG, "evaluation.n_samples"], None),
        "training_evaluation_checkpoint": (["evaluate_training.py", "-te", TRAIN_EVAL_CFG,
                                            "--set", "training_evaluation.model_checkpoint_filename=nope.pth"],
                                           [TRAIN_EVAL_CFG, "training_evaluation.model_checkpoint_filename",
                                            "nope.pth"], None),
        "jit_unknown_checkpoint": (["jit_trace_model.py", "-t", TRAIN_CFG, "-c", "nope.pth", "-i", "1", "1", "4", "4"],
                                   ["--checkpoint", "nope.pth", "not found", "latest"], no_file_matching("nope*")),
        "jit_wrong_input_size": (["jit_trace_model.py", "-t", TRAIN_CFG, "-c", "latest", "-i", "1", "1", "4", "5"],
                                 ["--input_size", "1 1 4 5", "-i 1 1 4 4", "example_model_architecture.yaml"],
                                 no_file_matching("*1x1x4x5*")),
        "jit_malicious_checkpoint": (["jit_trace_model.py", "-t", TRAIN_CFG, "-c", str(evil), "-i", "1", "1", "4", "4"],
                                     [str(evil), "weights_only"], lambda repo: not (evil_dir / "jit").exists()),
        "stream_shape_mismatch": (bad_train_args("err_stream_shape",
                                                 "dataset.gen_inputs.data_generating_function_args={shape: [1, 4, 5]}"),
                                  ["gen_inputs", "[1, 4, 4]"], None),
        "debug": (bad_train_args("err_debug", "training.n_epoch=3") + ["--debug"], [], None),
        "gan_loss_without_adversarial": (
            bad_train_args("err_gan_loss", "adversarial.enable_adversarial_training=false"),
            [TRAIN_CFG, "loss.loss_fn", "example_gan_loss", "weighted_reconstruction_loss"], None),
        "section_not_a_mapping": (bad_train_args("err_section", "training=5"),
                                  [TRAIN_CFG, "training: 5 is not a mapping", "n_epochs"], None),
    }
    if not torch.cuda.is_available():
        cases["gpus_without_gpus"] = (bad_train_args("err_gpus", "training.gpus=[0]"),
                                      [TRAIN_CFG, "training.gpus", "[]"], None)
    for name, (mutate, expected) in ARCH_CASES.items():
        path = write_arch(tmp, name, mutate)
        cases[name] = (bad_train_args(f"err_{name}", f"model.architecture_cfg_path={path}"), [str(path), *expected],
                       None)
    # One case in a fresh interpreter (the exit status and stderr of `python train.py` itself); the
    # rest through the Zygote (conftest.run), which saves seconds per case.
    procs = {"unknown_key": run(repo, *cases["unknown_key"][0], check=False, fresh=True)} | \
        run_all(repo, {name: args for name, (args, _, _) in cases.items() if name != "unknown_key"})
    return {name: (procs[name], cases[name], repo, marker) for name in cases}


def check_user_error(error_runs, name):
    proc, (args, expected, nothing_written), repo, _ = error_runs[name]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    for text in expected:
        assert text in proc.stderr, f"{text!r} not in stderr:\n{proc.stderr}"
    folder = next((a.split("=", 1)[1] for a in args if a.startswith("saving.save_folder_name=")), None)
    if folder:
        assert not (repo / CHECKPOINTS / folder).exists(), f"{folder} was created"
        assert not (repo / "results/example_model" / folder).exists()
    if nothing_written:
        assert nothing_written(repo)


USER_ERRORS = ["unknown_key", "wrong_type", "out_of_range", "unknown_loss", "missing_data_path", "missing_config_file",
               "missing_cli_argument", "evaluation_config_value", "training_evaluation_checkpoint",
               "jit_unknown_checkpoint", "jit_wrong_input_size", "gan_loss_without_adversarial",
               "section_not_a_mapping", *ARCH_CASES]


@pytest.mark.parametrize("name", USER_ERRORS)
@pytest.mark.slow
def test_user_error(error_runs, name):
    check_user_error(error_runs, name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has GPUs")
@pytest.mark.slow
def test_gpus_on_a_machine_without_gpus(error_runs):
    check_user_error(error_runs, "gpus_without_gpus")


@pytest.mark.slow
def test_malicious_checkpoint_is_refused(error_runs):
    check_user_error(error_runs, "jit_malicious_checkpoint")
    assert not error_runs["jit_malicious_checkpoint"][3].exists()  # its code did not run


@pytest.mark.slow
def test_stream_shape_that_does_not_fit_the_architecture(error_runs):
    check_user_error(error_runs, "stream_shape_mismatch")


@pytest.mark.slow
def test_debug_shows_traceback(error_runs):
    proc, (args, _, _), repo, _ = error_runs["debug"]
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "UserError" in proc.stderr and "training.n_epoch" in proc.stderr
    assert not (repo / CHECKPOINTS / "err_debug").exists()


# ---- Ctrl-C and SIGTERM -------------------------------------------------------------------------
SIGNAL_BATCH = 8  # 64 steps per epoch: the run is busy in its first epoch when the signal comes


def train_then_signal(repo, folder, signum, log_dir):
    """Start a long run, wait for its initial checkpoint, send `signum`; (exit status, stdout)."""
    args = train_args(folder, "training.n_epochs=1000", f"training.batch_size={SIGNAL_BATCH}",
                      "saving.save_epoch_increment=1000")
    out_path, err_path = log_dir / f"{folder}.out", log_dir / f"{folder}.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:  # files, not pipes: tqdm writes a lot
        proc = subprocess.Popen([sys.executable, *args], cwd=repo, stdout=out, stderr=err, env=script_env())
        try:
            deadline, saves = time.monotonic() + TIMEOUT, repo / CHECKPOINTS / folder
            while not by_epoch(newest_run(saves)) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert proc.poll() is None, f"training ended early:\n{err_path.read_text()}"
            assert by_epoch(newest_run(repo / CHECKPOINTS / folder)), "no checkpoint before the deadline"
            proc.send_signal(signum)
            status = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return status, out_path.read_text(), err_path.read_text()


@pytest.fixture(scope="module")
def interrupted(repo, tmp_path_factory):
    return train_then_signal(repo, "sigint_run", signal.SIGINT, tmp_path_factory.mktemp("logs"))


@pytest.mark.parametrize("signum, folder", [(signal.SIGINT, "sigint_run"), (signal.SIGTERM, "sigterm_run")],
                         ids=["SIGINT", "SIGTERM"])
@pytest.mark.slow
def test_signal_saves_early_stop_checkpoint(trained, interrupted, tmp_path, signum, folder):
    repo, _ = trained
    if signum == signal.SIGINT:
        status, out, err = interrupted
    else:
        status, out, err = train_then_signal(repo, folder, signum, tmp_path)
    assert status == 128 + signum, err
    assert "Traceback" not in err
    early = by_epoch(newest_run(repo / CHECKPOINTS / folder), early_stop=True)
    assert len(early) == 1, list(newest_run(repo / CHECKPOINTS / folder).iterdir())
    (epoch, path), = early.items()
    state = load(path)
    assert state["epoch"] == epoch < 1000
    assert CHECKPOINT_KEYS <= set(state)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.fixture(scope="module")
def resumed_after_interrupt(repo, interrupted):
    """The Ctrl-C'd run resumed with `latest` to one epoch past its _et checkpoint, and the same
    number of epochs run without interruption."""
    folder = newest_run(repo / CHECKPOINTS / "sigint_run")
    (k, _), = by_epoch(folder, early_stop=True).items()
    common = [f"training.batch_size={SIGNAL_BATCH}", f"training.n_epochs={k + 1}"]
    run(repo, *train_args("sigint_run", *common, "model.model_checkpoint_filename=latest"))
    run(repo, *train_args("sigint_reference", *common))
    reference = newest_run(repo / CHECKPOINTS / "sigint_reference")
    return k + 1, load(by_epoch(folder)[k + 1]), load(by_epoch(reference)[k + 1])


@pytest.mark.slow
def test_resume_after_ctrl_c_matches_uninterrupted_run(resumed_after_interrupt):
    epochs, resumed_state, reference = resumed_after_interrupt
    steps = epochs * 512 // SIGNAL_BATCH
    assert reference["step"] == steps
    assert resumed_state["step"] == steps
    assert resumed_state["loss_history"] == reference["loss_history"]
    assert same_weights(resumed_state["model_state_dict"], reference["model_state_dict"], atol=1e-6)


@pytest.mark.slow
def test_evaluate_training_sends_other_overrides_to_the_training_config(resumed):
    """--set saving.save_folder_name=... picks the runs of another save_folder_name."""
    repo = resumed["folder"].parents[4]
    out = repo / "results/example_model/resume_run" / resumed["folder"].name
    run(repo, "evaluate_training.py", "-te", TRAIN_EVAL_CFG, "--set", "saving.save_folder_name=resume_run")
    assert (out / "training_losses.png").read_bytes()[:8] == PNG_MAGIC
    assert f"steps,{2 * STEPS_PER_EPOCH}" in (out / "training_summary.csv").read_text()  # both starts' steps


# ---- from another folder ------------------------------------------------------------------------
@pytest.mark.slow
def test_evaluate_training_from_another_folder(trained, tmp_path):
    repo, folder = trained
    png = repo / "results/example_model/example_run" / folder.name / "training_losses.png"
    png.unlink(missing_ok=True)
    proc = run(repo, repo / "evaluate_training.py", "-te", repo / TRAIN_EVAL_CFG, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_moving_average_uses_the_configured_window():
    """loss_average_window is honoured exactly: each point is the mean of that many steps."""
    import evaluate_training
    assert evaluate_training.moving_average(range(10), 3).tolist() == pytest.approx([1, 2, 3, 4, 5, 6, 7, 8])
    assert evaluate_training.moving_average([1.0, 3.0], 10).tolist() == [2.0]  # shorter than the window


@pytest.mark.slow
def test_evaluate_training_compares_checkpoints_of_two_configs(trained, resumed, tmp_path):
    """Two training configs (save_folder_names) and checkpoints of each run (a glob and latest):
    one figure and table, a column per run and checkpoint, curves up to each checkpoint's step."""
    repo, _ = trained
    cfgs = []
    for folder in ("example_run", "resume_run"):
        cfg = yaml.safe_load((SRC / TRAIN_CFG).read_text())
        cfg["saving"]["save_folder_name"] = folder
        cfgs.append(tmp_path / f"{folder}.yaml")
        cfgs[-1].write_text(yaml.safe_dump(cfg))
    te = tmp_path / "compare.yaml"
    te.write_text(yaml.safe_dump({"training_evaluation": {
        "training_cfg_path": [str(c) for c in cfgs], "model_checkpoint_filename": ["*_epoch1_*", "latest"],
        "loss_average_window": 4}}))
    proc = run(repo, "evaluate_training.py", "-te", te)
    saved = [Path(line.removeprefix("saved ")) for line in proc.stdout.splitlines() if line.startswith("saved ")]
    assert [p.suffix for p in saved] == [".png", ".md", ".csv"]
    assert all(p.parent == repo / "results/example_model/example_run" for p in saved)  # the first config's
    assert saved[0].read_bytes()[:8] == PNG_MAGIC and saved[0].name.startswith("compare_")
    rows = {line.split(",")[0]: line.split(",")[1:] for line in saved[2].read_text().splitlines()}
    assert [re.sub(r"/run_\d+ @ ", " ", label) for label in rows[""]] == [
        f"{name} epoch {epoch}" for name in ("example_run", "resume_run") for epoch in (1, 2)]
    assert rows["steps"] == [str(STEPS_PER_EPOCH), str(2 * STEPS_PER_EPOCH)] * 2
    assert rows["config: config file"] == [str(cfgs[0])] * 2 + [str(cfgs[1])] * 2
    assert rows["config: saving.save_folder_name"] == ["example_run"] * 2 + ["resume_run"] * 2
    te.write_text(te.read_text().replace("'*_epoch1_*'", "'*_epoch7_*'"))
    proc = run(repo, "evaluate_training.py", "-te", te, check=False)
    assert proc.returncode == 2 and "'*_epoch7_*' matches no checkpoint" in proc.stderr, proc.stderr


# ---- the README ---------------------------------------------------------------------------------
# The README's commands verbatim (a line each, as they are searched for), whatever their length.
README_COMMANDS = [
    "python train.py -t configs/example_model/example_training_cfg.yaml",
    "torchrun --standalone --nnodes=1 --nproc_per_node=2 train.py -t configs/example_model/example_multigpu_training_cfg.yaml",  # noqa: E501
    "python evaluate_training.py -te configs/example_model/example_training_evaluation_cfg.yaml",
    "python evaluate.py -t configs/example_model/example_training_cfg.yaml -e configs/example_model/example_evaluation_cfg.yaml",  # noqa: E501
    "python jit_trace_model.py -t configs/example_model/example_training_cfg.yaml -c",
    "python -m pytest -q tests",
    "python train.py -t configs/unet_gan/unet_gan_training_cfg.yaml",
    "python evaluate_training.py -te configs/unet_gan/unet_gan_training_evaluation_cfg.yaml",
    "python evaluate.py -t configs/unet_gan/unet_gan_training_cfg.yaml -e configs/unet_gan/unet_gan_evaluation_cfg.yaml",  # noqa: E501
    "python jit_trace_model.py -t configs/unet_gan/unet_gan_training_cfg.yaml -c latest -i",
    "python -m engine.model_base models/unet_gan/unet_gan_architecture.yaml",
]


def test_readme_shows_the_commands_tested_here():
    text = (SRC / "README.md").read_text()
    for command in README_COMMANDS:
        assert command in text, command
    assert "--set training.n_epochs=" in text
    for path in re.findall(r"\]\(((?:configs|models)/[^)#]+)\)", text):  # its links to files exist
        assert (SRC / path).exists(), path

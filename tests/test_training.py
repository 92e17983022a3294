"""Training behaviour users rely on: mistakes in the schedule, optimizer and loss keys caught before
anything is written, untrusted checkpoints refused, saves that survive kill -9, non-finite losses,
learning-rate schedules, the GAN losses, metrics.jsonl, keep_last and the messages on resume.

End-to-end runs start train.py (and the other scripts) in the session's copy of the repository,
two at a time, each in a run folder of its own (named tt_*); the loss functions and the save
loop are also checked in-process.
"""
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import dataset as dataset_mod
import loss
from conftest import (
    ARCH_YAML,
    CHECKPOINTS,
    EVAL_CFG,
    SRC,
    TRAIN_CFG,
    TRAIN_EVAL_CFG,
    newest_run,
    run_all,
    script_env,
)
from engine import config, registry, runs
from test_cli import RunsCode, by_epoch, load, sets, train_args

STEPS = 512 // 32  # steps per epoch of the toy config
DATA = "data/example_model/blobs_4x4.npy"
COSINE = ["training.scheduler=CosineAnnealingLR", "training.scheduler_args={T_max: 32}",
          "training.scheduler_interval=step"]
ONE_CYCLE = ["training.scheduler=OneCycleLR", "training.scheduler_args={max_lr: 0.01}",
             "training.scheduler_interval=step"]
BAD_STEP = 13  # the step of epoch 1 at which the NaN sample is first read (log_interval is 10)


def folder_of(repo, name):
    return newest_run(repo / CHECKPOINTS / f"tt_{name}")


def rows_of(folder):
    """metrics.jsonl of a run, one dict per line."""
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def column(rows, key):
    return [row[key] for row in rows]


def assert_same(a, b, where="state"):
    """a and b are equal, tensors exactly (torch.equal), through nested dicts and lists."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_user_error(proc, repo, folder_name, expected):
    """Exit status 2, every expected text in stderr, no traceback, no run folder created."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    for text in expected:
        assert text in proc.stderr, f"{text!r} not in stderr:\n{proc.stderr}"
    assert not (repo / CHECKPOINTS / folder_name).exists(), f"{folder_name} was created"
    assert not (repo / "results/example_model" / folder_name).exists(), f"results of {folder_name} were written"


def sample_order(epoch):
    """The order in which train.py reads the 512 samples in `epoch` (its EpochBatches)."""
    seed = config.load_training_config(SRC / TRAIN_CFG)["training"]["seed"]
    batches = dataset_mod.EpochBatches(512, 32, seed)
    batches.set_epoch(epoch)
    return torch.cat([positions for _, positions in batches]).tolist()


def lr_sequence(scheduler_cls, n_steps, lr=0.001, **args):
    """The learning rate at each of `n_steps` steps of torch's own scheduler, stepped once per step."""
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = scheduler_cls(opt, **args)
    lrs = []
    for _ in range(n_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


# ---- 1. bad input: exit 2, file + key path + hint, nothing written --------------------------------
BAD_INPUT = {  # name: (overrides, what stderr must say besides the config path)
    "unknown_scheduler": (["training.scheduler=CosineAnealingLR"],
                          ["training.scheduler", "'CosineAnealingLR'", "did you mean 'CosineAnnealingLR'"]),
    "scheduler_missing_argument": (["training.scheduler=CosineAnnealingLR"],
                                   ["training.scheduler_args", "CosineAnnealingLR needs T_max"]),
    "unknown_optimizer_argument": (["training.optimizer_args={betaz: [0.5, 0.9]}"],
                                   ["training.optimizer_args.betaz", "did you mean 'betas'"]),
    "lr_in_optimizer_args": (["training.optimizer_args={lr: 0.01}"],
                             ["training.optimizer_args.lr", "training.learning_rate"]),
    "step_size_in_steplr_args": (["training.scheduler=StepLR", "training.scheduler_args={step_size: 5}"],
                                 ["training.scheduler_args.step_size", "training.learning_rate_step"]),
    "discriminator_in_loss_args": (["loss.loss_fn=bce_gan_loss", "loss.loss_args={discriminator: 1}"],
                                   ["loss.loss_args.discriminator", "passed by the trainer"]),
    "unknown_nonfinite_policy": (["training.on_nonfinite_loss=maybe"],
                                 ["training.on_nonfinite_loss", "'maybe'", "stop, skip, ignore"]),
    "keep_last_zero": (["saving.keep_last=0"], ["saving.keep_last", ">= 1"]),
    "plateau_every_step": (["training.scheduler=ReduceLROnPlateau", "training.scheduler_interval=step"],
                           ["training.scheduler_interval", "ReduceLROnPlateau", "use epoch"]),
    # passes the config check (every argument exists), but CyclicLR's constructor rejects the mode
    "scheduler_constructor_rejects": (["training.scheduler=CyclicLR",
                                       "training.scheduler_args={base_lr: 0.001, max_lr: 0.01, mode: nope}"],
                                      ["training.scheduler_args", "CyclicLR(", "mode='nope'"]),
}
MALICIOUS = ["train", "evaluate", "evaluate_training"]


@pytest.fixture(scope="module")
def error_runs(repo, tmp_path_factory):
    """Every bad-input case and a malicious checkpoint given to each script, two runs at a time.
    name -> CompletedProcess; plus the malicious checkpoints' marker files."""
    tmp = tmp_path_factory.mktemp("tt_errors")
    evil, markers = {}, {}
    for script in MALICIOUS:
        markers[script], evil[script] = tmp / f"pwned_{script}", tmp / f"evil_{script}.pth"
        torch.save({"model_state_dict": RunsCode(f"touch {markers[script]}"), "epoch": 1}, evil[script])
        assert not markers[script].exists()
    jobs = {name: train_args(f"tt_err_{name}", "training.n_epochs=1", *overrides)
            for name, (overrides, _) in BAD_INPUT.items()}
    jobs["evil_train"] = train_args("tt_evil_train", "training.n_epochs=1",
                                    f"model.model_checkpoint_filename={evil['train']}")
    jobs["evil_evaluate"] = ["evaluate.py", "-t", TRAIN_CFG, "-e", EVAL_CFG, *sets(
        f"evaluation.model_checkpoint_filename={evil['evaluate']}", "saving.save_folder_name=tt_evil_evaluate")]
    jobs["evil_evaluate_training"] = ["evaluate_training.py", "-te", TRAIN_EVAL_CFG, *sets(
        f"training_evaluation.model_checkpoint_filename={evil['evaluate_training']}",
        "saving.save_folder_name=tt_evil_evaluate_training")]
    return SimpleNamespace(procs=run_all(repo, jobs), evil=evil, markers=markers)


@pytest.mark.parametrize("name", list(BAD_INPUT))
@pytest.mark.slow
def test_bad_schedule_optimizer_and_loss_keys_are_user_errors(error_runs, repo, name):
    """A mistake in these keys ends with exit 2 naming the file, the key and the fix, before anything is written."""
    _, expected = BAD_INPUT[name]
    assert_user_error(error_runs.procs[name], repo, f"tt_err_{name}", [TRAIN_CFG, *expected])


@pytest.mark.parametrize("script", MALICIOUS)
@pytest.mark.slow
def test_every_script_refuses_a_checkpoint_that_runs_code(error_runs, repo, script):
    """A checkpoint holding code is refused (weights_only) by every script that loads one; its code never runs."""
    path = error_runs.evil[script]
    assert_user_error(error_runs.procs[f"evil_{script}"], repo, f"tt_evil_{script}", [str(path), "weights_only"])
    assert not error_runs.markers[script].exists(), f"{script} ran the checkpoint's code"


# ---- 3. kill -9 in the middle of saves --------------------------------------------------------
# Importing the pipeline takes seconds, so one subprocess imports it once and forks a fresh save
# loop for every round; the test kills that loop with SIGKILL.
SAVE_LOOP = r"""
import os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
from engine import runs
folder = Path(sys.argv[2])
torch.manual_seed(0)
state = {"weights": torch.randn(1_000_000), "epoch": 0}  # 4 MB: a save takes a while
print("ready", flush=True)
while sys.stdin.readline():
    pid = os.fork()
    if pid == 0:  # the save loop, until killed
        try:
            i = 0
            while True:
                runs.Run(folder, folder, "m").save(state, i % 4)
                i += 1
        finally:
            os._exit(1)
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


def test_kill_during_saves_never_leaves_an_unloadable_checkpoint(tmp_path):
    """kill -9 in the middle of saving leaves only whole checkpoints where loaders look, and hidden temp files
    that the next run removes."""
    folder = tmp_path / "ckpts"
    folder.mkdir()
    err = tmp_path / "stderr"
    delays = [random.uniform(0.05, 0.5) for _ in range(5)]
    with open(err, "w") as err_file:
        server = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(SRC), str(folder)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=err_file, text=True, env=script_env())
    try:
        assert server.stdout.readline() == "ready\n", err.read_text()
        for delay in delays:
            server.stdin.write("go\n")
            server.stdin.flush()
            pid = int(server.stdout.readline())
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            assert server.stdout.readline() == "reaped\n", err.read_text()
    finally:
        server.kill()
        server.wait()
    torch.manual_seed(0)
    weights = torch.randn(1_000_000)
    found = runs.list_checkpoints(folder)
    assert found, f"no checkpoint saved (kill delays {delays})"
    for path in found:
        assert torch.equal(runs.read_checkpoint(path)["weights"], weights), path
    others = [p.name for p in folder.iterdir() if p not in found]
    assert all(name.startswith(".") and name.endswith(".tmp") for name in others), others

    # the next run removes such leftovers (one planted, in case no kill landed mid-save)
    (folder / ".m_epoch3_20260101-000000.pth.abc123.tmp").write_bytes(b"partial")
    run = runs.Run(folder, folder, "m")
    run.start({}, last_step=0, about={}, tensorboard=False)
    run.close()
    assert not list(folder.glob(".*.tmp"))
    assert runs.list_checkpoints(folder) == found


# ---- the training runs ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nan_data(tmp_path_factory):
    """The toy data with NaN in the one sample k that train.py first reads at step BAD_STEP of epoch 1."""
    order = sample_order(1)
    k = order[(BAD_STEP - 1) * 32 + 5]
    data = np.load(SRC / DATA)
    assert data.shape == (512, 1, 4, 4)
    data[k, 0, 1, 2] = np.nan
    path = tmp_path_factory.mktemp("tt_nan") / "blobs_with_nan.npy"
    np.save(path, data)
    return path, k


@pytest.fixture(scope="module")
def training_runs(repo, nan_data, tmp_path_factory):
    """Every independent training run, two at a time. name -> (CompletedProcess, folder, the
    metrics.jsonl rows and {epoch: checkpoint} right after it ended)."""
    nan_path, _ = nan_data
    nan = [f"dataset.real_images.data_path={nan_path}", "dataset.real_images.data_batch_transform=null",
           "training.n_epochs=2", "saving.save_epoch_increment=1"]
    runs = {
        "cosine": [*COSINE, "training.n_epochs=2", "saving.save_epoch_increment=1"],
        "cosine_first_epoch": [*COSINE, "training.n_epochs=1"],  # resumed to 2 in resumed_runs
        "one_cycle": [*ONE_CYCLE, "training.n_epochs=2"],
        "disc_schedule": ["training.scheduler=ReduceLROnPlateau", "adversarial.scheduler=ExponentialLR",
                          "adversarial.scheduler_args={gamma: 0.5}", "training.n_epochs=2"],
        "wgan_gp": ["loss.loss_fn=wgan_gp_loss", "training.n_epochs=1"],
        "bce_r1": ["loss.loss_fn=bce_gan_loss", "loss.loss_args={r1_weight: 5.0}", "training.n_epochs=1"],
        "metrics": ["training.n_epochs=2", "saving.save_epoch_increment=1"],
        "keep_last": ["training.n_epochs=4", "saving.save_epoch_increment=1", "saving.keep_last=2"],
        "nan_stop": nan,
        "nan_skip": [*nan, "training.on_nonfinite_loss=skip"],
    }
    # a save cut short by kill -9 in an earlier run of keep_last's folder
    folder_of(repo, "keep_last").mkdir(parents=True)
    (folder_of(repo, "keep_last") / ".example_gan_epoch3_x.pth.abc.tmp").write_bytes(b"partial")
    procs = run_all(repo, {name: train_args(f"tt_{name}", *overrides) for name, overrides in runs.items()})
    out = {}
    for name, proc in procs.items():
        folder = folder_of(repo, name)
        rows = rows_of(folder) if (folder / "metrics.jsonl").exists() else None
        out[name] = SimpleNamespace(proc=proc, folder=folder, rows=rows, ckpts=by_epoch(folder))
    return out


def succeeded(run_):
    assert run_.proc.returncode == 0, f"exit {run_.proc.returncode}\n{run_.proc.stderr[-3000:]}"
    return run_


@pytest.fixture(scope="module")
def arch_with_changes(tmp_path_factory):
    """The toy architecture with an extra Linear layer in gen_cnn and 8 instead of 16 channels in disc_cnn's
    first conv."""
    arch = yaml.safe_load((SRC / ARCH_YAML).read_text())
    arch["gen_cnn"]["layers"].append({"Linear": {"out_features": 64}})  # gen_cnn_Linear_5
    arch["disc_cnn"]["layers"][0] = {"Conv2d": {"out_channels": 8, "kernel_size": 3, "padding": 1}}
    path = tmp_path_factory.mktemp("tt_arch") / "changed_architecture.yaml"
    path.write_text(yaml.safe_dump(arch, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def resumed_runs(repo, training_runs, arch_with_changes, tmp_path_factory):
    """Runs that resume the training runs: the 1-epoch cosine run to 2 epochs (latest), the metrics run
    from its epoch-1 checkpoint by file name with a lower learning rate, that checkpoint into a
    changed architecture, and the OneCycleLR run to 3 epochs (latest)."""
    epoch1 = succeeded(training_runs["metrics"]).ckpts[1]
    succeeded(training_runs["cosine_first_epoch"])
    procs = run_all(repo, {
        "cosine": train_args("tt_cosine_first_epoch", *COSINE, "training.n_epochs=2",
                             "model.model_checkpoint_filename=latest"),
        "metrics": train_args("tt_metrics", "training.n_epochs=2", "saving.save_epoch_increment=1",
                              "training.learning_rate=0.0005", f"model.model_checkpoint_filename={epoch1.name}"),
        "arch": train_args("tt_arch_changed", "training.n_epochs=2", f"model.architecture_cfg_path={arch_with_changes}",
                           f"model.model_checkpoint_filename={epoch1}"),
        "one_cycle": train_args("tt_one_cycle", *ONE_CYCLE, "training.n_epochs=3",
                                "model.model_checkpoint_filename=latest"),
    })
    return SimpleNamespace(procs=procs, epoch1=epoch1)


# ---- 4. non-finite loss -------------------------------------------------------------------------
@pytest.mark.slow
def test_nonfinite_loss_stops_with_status_3_and_keeps_checkpoints(training_runs, nan_data):
    """A NaN loss ends training with exit 3 and a message naming the step and the bad term; the checkpoints
    already written stay loadable, no later one is written, metrics.jsonl has the steps before it."""
    r = training_runs["nan_stop"]
    assert r.proc.returncode == 3, r.proc.stderr[-3000:]
    err = r.proc.stderr
    assert "Traceback" not in err and "Traceback" not in r.proc.stdout, err
    assert f"non-finite loss at epoch 1, step {BAD_STEP} ({BAD_STEP} of the epoch)" in err, err[-2000:]
    assert "discriminator loss" in err and "d_real=nan" in err, err[-2000:]
    assert sorted(r.ckpts) == [0], list(r.folder.iterdir())
    assert r.ckpts[0].name in err  # "the last checkpoint, ..., is untouched"
    assert load(r.ckpts[0])["epoch"] == 0
    assert column(r.rows, "step") == list(range(1, BAD_STEP))
    assert all(math.isfinite(row["discriminator/d_real"]) for row in r.rows)


@pytest.mark.slow
def test_nonfinite_loss_skip_drops_those_updates(training_runs, nan_data):
    """With on_nonfinite_loss: skip, every update that saw the NaN sample is dropped and counted, and the
    weights stay finite."""
    r = succeeded(training_runs["nan_skip"])
    _, k = nan_data
    orders = {epoch: sample_order(epoch) for epoch in (1, 2)}
    bad_steps = [(epoch - 1) * STEPS + order.index(k) // 32 + 1 for epoch, order in orders.items()]
    assert bad_steps[0] == BAD_STEP
    state = load(r.ckpts[2])
    assert state["skipped_updates"] == sum(k in order for order in orders.values()) == 2
    for name, tensor in state["model_state_dict"].items():
        assert torch.isfinite(tensor).all(), name
    history = state["loss_history"]
    nan_steps = [i + 1 for i, v in enumerate(history["discriminator"]["d_real"]) if not math.isfinite(v)]
    assert nan_steps == bad_steps  # the skipped updates' losses are still logged
    assert all(math.isfinite(v) for terms in history["generator"].values() for v in terms)
    assert f"skipped the discriminator update at epoch 1, step {BAD_STEP}" in r.proc.stdout


# ---- 5. learning-rate schedules --------------------------------------------------------------------
@pytest.mark.slow
def test_step_interval_cosine_schedule_follows_torch(training_runs):
    """CosineAnnealingLR advanced every step gives, step by step, torch's own learning rates."""
    rows = succeeded(training_runs["cosine"]).rows
    expected = lr_sequence(torch.optim.lr_scheduler.CosineAnnealingLR, 2 * STEPS, T_max=32)
    assert column(rows, "step") == list(range(1, 2 * STEPS + 1))
    assert column(rows, "generator/lr") == expected
    assert column(rows, "discriminator/lr") == expected  # adversarial.scheduler null: the same schedule


@pytest.mark.slow
def test_one_cycle_gets_the_run_length(training_runs):
    """OneCycleLR with only max_lr runs to the end: its total_steps is the run's number of steps."""
    rows = succeeded(training_runs["one_cycle"]).rows
    expected = lr_sequence(torch.optim.lr_scheduler.OneCycleLR, 2 * STEPS, max_lr=0.01, total_steps=2 * STEPS)
    assert column(rows, "generator/lr") == expected


@pytest.mark.slow
def test_extending_a_one_cycle_run_rebuilds_its_schedule(training_runs, resumed_runs):
    """A OneCycleLR run resumed with more epochs trains on: its schedule is rebuilt for the new length
    and advanced to where the run is, and it says so."""
    succeeded(training_runs["one_cycle"])
    proc = resumed_runs.procs["one_cycle"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training.n_epochs changed: the generator's OneCycleLR schedule is rebuilt and advanced 32 steps" \
        in proc.stdout, proc.stdout


@pytest.mark.slow
def test_discriminator_schedule_of_its_own(training_runs):
    """adversarial.scheduler sets the discriminator's schedule (ExponentialLR halves it each epoch) while the
    generator's (ReduceLROnPlateau, which trains too) keeps its rate."""
    rows = succeeded(training_runs["disc_schedule"]).rows
    assert column(rows, "discriminator/lr") == [0.001] * STEPS + [0.001 * 0.5] * STEPS
    assert column(rows, "generator/lr") == [0.001] * (2 * STEPS)


@pytest.mark.slow
def test_resume_with_step_schedule_matches_straight_run(repo, training_runs, resumed_runs):
    """1 epoch, then resumed with latest to 2, ends exactly where 2 epochs straight do: weights, optimizer and
    scheduler states, and the learning rates in metrics.jsonl."""
    proc = resumed_runs.procs["cosine"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    straight_run = succeeded(training_runs["cosine"])
    resumed_folder = folder_of(repo, "cosine_first_epoch")
    resumed, straight = load(by_epoch(resumed_folder)[2]), load(straight_run.ckpts[2])
    for key in ("model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "disc_optimizer_state_dict",
                "disc_scheduler_state_dict", "loss_history", "step"):
        assert_same(resumed[key], straight[key], key)
    rows = rows_of(resumed_folder)
    for key in ("step", "generator/lr", "discriminator/lr"):
        assert column(rows, key) == column(straight_run.rows, key), key


# ---- 6. GAN losses ---------------------------------------------------------------------------------
def test_hinge_loss_values():
    """Hinge loss: relu(1 - real) and relu(1 + fake) for the discriminator, -mean(fake) for the generator."""
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    d = loss.hinge_gan_loss("discriminator", None, None, fake, real)
    assert d.keys() == {"d_real", "d_fake"}
    torch.testing.assert_close(d["d_real"], torch.tensor(2.5 / 3))
    torch.testing.assert_close(d["d_fake"], torch.tensor(1.0))
    out, target = torch.zeros(3), torch.tensor([1.0, -1.0, 2.0])
    g = loss.hinge_gan_loss("generator", out, target, fake, None, adversarial_weight=2.0, l1_weight=0.5)
    torch.testing.assert_close(g["g_adv"], torch.tensor(2.0 / 3))
    torch.testing.assert_close(g["l1"], torch.tensor(0.5 * 4 / 3))


def test_example_gan_loss_is_least_squares():
    """The examples' example_gan_loss computes least_squares_gan_loss (same terms, same values),
    and both can be named in a config."""
    assert {"example_gan_loss", "least_squares_gan_loss"} <= set(registry.loss_functions())
    d = loss.least_squares_gan_loss("discriminator", None, None, torch.tensor([0.0, 1.0]), torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(d["d_real"], torch.tensor(0.5 * 4 / 2))
    torch.testing.assert_close(d["d_fake"], torch.tensor(0.5 * 1 / 2))
    fake, out, target = torch.tensor([0.2, -0.7]), torch.tensor([0.5, 1.0]), torch.tensor([0.0, 2.0])
    for net, real in (("discriminator", torch.tensor([0.9, 0.1])), ("generator", None)):
        args = (net, out, target, fake, real)
        a = loss.example_gan_loss(*args, adversarial_weight=2.0, l1_weight=0.5, l2_weight=0.25)
        b = loss.least_squares_gan_loss(*args, adversarial_weight=2.0, l1_weight=0.5, l2_weight=0.25)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def unit_vector(n=16):
    w = torch.randn(n, generator=torch.Generator().manual_seed(0))
    return w / w.norm()


def test_gradient_penalty_of_linear_critics():
    """WGAN-GP: a critic whose gradient has norm 1 everywhere has no penalty; one with norm c has
    gp_weight * (c - 1)^2, which trains the critic's parameters."""
    gen = torch.Generator().manual_seed(1)
    real, fake = torch.randn(8, 1, 4, 4, generator=gen), torch.randn(8, 1, 4, 4, generator=gen)
    w = unit_vector()
    scale = torch.tensor(3.0, requires_grad=True)
    for c, expected in ((torch.tensor(1.0), 0.0), (scale, 10.0 * (3.0 - 1.0) ** 2)):
        def critic(x, c=c):  # this iteration's c
            return c * (x.flatten(1) @ w)

        d = loss.wgan_gp_loss("discriminator", fake, real, critic(fake), critic(real), gp_weight=10.0,
                              discriminator=critic)
        assert d.keys() == {"d_wasserstein", "gp"}
        torch.testing.assert_close(d["gp"], torch.tensor(expected), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(d["d_wasserstein"], critic(fake).mean() - critic(real).mean())
    (grad,) = torch.autograd.grad(d["gp"], scale)  # d/dc of 10 (c - 1)^2 at c = 3
    torch.testing.assert_close(grad, torch.tensor(10.0 * 2 * (3.0 - 1.0)), rtol=1e-5, atol=1e-5)


def test_r1_penalty_of_a_quadratic_discriminator():
    """bce_gan_loss's r1 term is r1_weight * mean squared norm of the score's gradient at real samples
    (for D(x) = a |x|^2 / 2: r1_weight a^2 mean |x|^2), and trains the discriminator's parameters."""
    gen = torch.Generator().manual_seed(2)
    real, fake = torch.randn(8, 1, 4, 4, generator=gen), torch.randn(8, 1, 4, 4, generator=gen)
    a = torch.tensor(1.5, requires_grad=True)

    def disc(x):
        return 0.5 * a * x.flatten(1).pow(2).sum(1)

    d = loss.bce_gan_loss("discriminator", fake, real, disc(fake), disc(real), r1_weight=5.0, discriminator=disc)
    assert d.keys() == {"d_real", "d_fake", "r1"}
    mean_sq = real.flatten(1).pow(2).sum(1).mean()
    torch.testing.assert_close(d["r1"], 5.0 * 1.5 ** 2 * mean_sq)
    torch.testing.assert_close(d["d_real"], F.softplus(-disc(real)).mean())
    (grad,) = torch.autograd.grad(d["r1"], a)
    torch.testing.assert_close(grad, 5.0 * 2 * 1.5 * mean_sq)
    assert "r1" not in loss.bce_gan_loss("discriminator", fake, real, disc(fake), disc(real), discriminator=disc)


@pytest.mark.parametrize("name, term", [("wgan_gp", "gp"), ("bce_r1", "r1")])
@pytest.mark.slow
def test_gradient_penalty_losses_train_end_to_end(training_runs, name, term):
    """wgan_gp_loss and bce_gan_loss with r1_weight train, and their penalty term is logged every step."""
    r = succeeded(training_runs[name])
    history = load(r.ckpts[1])["loss_history"]["discriminator"]
    assert len(history[term]) == STEPS and all(math.isfinite(v) for v in history[term])
    assert column(r.rows, f"discriminator/{term}") == history[term]
    assert any(v > 0 for v in history[term])


# ---- 7. metrics.jsonl -------------------------------------------------------------------------------
@pytest.mark.slow
def test_metrics_has_one_row_per_step_matching_loss_history(training_runs):
    """metrics.jsonl has one row per step with every loss term and both learning rates, the same floats as
    the checkpoint's loss_history."""
    r = succeeded(training_runs["metrics"])
    assert column(r.rows, "step") == list(range(1, 2 * STEPS + 1))
    assert column(r.rows, "epoch") == [1] * STEPS + [2] * STEPS
    history = load(r.ckpts[2])["loss_history"]
    keys = {"epoch", "step", "time", "samples_per_s", "data_wait", "generator/lr", "discriminator/lr"}
    for net, terms in history.items():
        assert "total" in terms
        for term, values in terms.items():
            keys.add(f"{net}/{term}")
            assert column(r.rows, f"{net}/{term}") == values, (net, term)
    assert keys >= {"generator/g_adv", "discriminator/d_real", "discriminator/d_fake"}
    assert all(row.keys() == keys for row in r.rows)
    assert all(0 <= row["data_wait"] <= 1 and row["samples_per_s"] > 0 for row in r.rows)
    times = column(r.rows, "time")
    assert times == sorted(times) and times[-1] - times[0] < 600  # wall-clock seconds, in step order


@pytest.mark.slow
def test_metrics_after_resume_by_file_name_has_each_step_once(training_runs, resumed_runs):
    """Resuming from the epoch-1 checkpoint of a finished run replaces the rows after it: each step once,
    matching the new checkpoint's loss_history."""
    proc = resumed_runs.procs["metrics"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = training_runs["metrics"]
    rows = rows_of(before.folder)
    assert column(rows, "step") == list(range(1, 2 * STEPS + 1))
    assert rows[:STEPS] == before.rows[:STEPS]
    history = load(by_epoch(before.folder)[2])["loss_history"]
    for net, terms in history.items():
        for term, values in terms.items():
            assert column(rows, f"{net}/{term}") == values, (net, term)


# ---- 8. keep_last ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_keep_last_keeps_the_newest_checkpoints(training_runs):
    """keep_last: 2 leaves the epoch-3 and epoch-4 checkpoints, and the run's other files."""
    r = succeeded(training_runs["keep_last"])
    assert sorted(r.ckpts) == [3, 4]
    run_files = re.compile(r"metrics\.jsonl|run\.json|training_cfg_\d{8}-\d{6}\.yaml|events\.out\.tfevents\..+|"
                           r"samples_epoch\d+\.png")
    others = [p.name for p in r.folder.iterdir() if p.suffix != ".pth"]
    assert all(run_files.fullmatch(name) for name in others), others
    assert sorted(r.folder.glob("*.pth")) == sorted(r.ckpts.values())
    assert load(r.ckpts[4])["epoch"] == 4


@pytest.mark.slow
def test_train_removes_partial_saves(training_runs):
    """A temp file that a killed save left in the run's folder is gone after the next run."""
    r = succeeded(training_runs["keep_last"])
    assert not [p.name for p in r.folder.iterdir() if p.name.startswith(".")]


# ---- 9. messages on resume --------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_prints_config_changes(resumed_runs):
    """Resuming with another learning rate says what changed since the checkpoint."""
    proc = resumed_runs.procs["metrics"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"config changes since {resumed_runs.epoch1.name}:" in proc.stdout, proc.stdout
    assert "training.learning_rate: 0.001 -> 0.0005" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_resume_trains_with_the_changed_learning_rate(training_runs, resumed_runs):
    """The learning rate that the resume message reports as changed is the one the resumed epochs train with."""
    assert resumed_runs.procs["metrics"].returncode == 0
    rows = rows_of(training_runs["metrics"].folder)
    assert column(rows, "generator/lr")[STEPS:] == [0.0005] * STEPS


@pytest.mark.slow
def test_resume_into_changed_architecture_names_the_layers(repo, resumed_runs, arch_with_changes):
    """Weights that do not fit the architecture are reported by layer and shape, with exit 2 and nothing written."""
    assert_user_error(resumed_runs.procs["arch"], repo, "tt_arch_changed", [
        str(resumed_runs.epoch1), str(arch_with_changes),
        "disc_cnn_Conv2d_0.weight: [16, 1, 3, 3] in the checkpoint, [8, 1, 3, 3] in the architecture",
        "disc_cnn_Conv2d_2.weight: [32, 16, 3, 3] in the checkpoint, [32, 8, 3, 3] in the architecture",
        "gen_cnn_Linear_5.weight: in the architecture, not in the checkpoint",
        "gen_cnn_Linear_5.bias: in the architecture, not in the checkpoint"])


# ---- 10. progress ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_progress_bar_shows_data_wait(training_runs):
    """The progress bar shows the share of time spent waiting for data."""
    assert "data wait=" in succeeded(training_runs["metrics"]).proc.stderr

"""The trial step before a run writes anything (preflight.check_whole_step): one whole training
step on the first samples, then every piece of state put back. A run with it trains bit for bit as
one without it; what fails in it is a user error naming the config key, before any file exists."""
import copy

import numpy as np
import pytest
import torch

import train
from conftest import SRC, TRAIN_CFG
from engine import config, loop, model_base, preflight, runs
from engine.placement import Placement, seed_everything
from engine.sampling import first_samples
from test_bad_inputs import architecture, assert_refused, run_refused

CPU = Placement(torch.device("cpu"))

# The toy GAN's flow, keeping state of its own as flows do: a call counter in a buffer, a pool of
# its past outputs in an object of its own (pix2pix's and CycleGAN's image pool), a (mean, std)
# pair it updates in place, and a generator of its own random numbers, which it draws from.
STATEFUL_FLOW = '''
import torch
from engine.model_base import PyNet


class ImagePool:
    def __init__(self, size):
        self.size, self.images = size, []

    def add(self, images):
        self.images = (self.images + [images.detach()[:1]])[-self.size:]


class Stateful(PyNet):
    target_key = "real_images"

    def __init__(self, path):
        super().__init__(path)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64), persistent=False)
        self.pool, self.moments = ImagePool(4), (torch.zeros(()), torch.ones(()))
        self.noise = torch.Generator().manual_seed(1)

    def forward(self, inputs):
        self.calls += 1
        self.moments[0].mul_(0.9).add_(0.1 * inputs.mean().detach())
        skips, generator = {}, self.model_components["generator"]
        jitter = 0.01 * torch.randn(inputs.shape, generator=self.noise) + 0.01 * self.moments[0]
        if self.pool.images:  # (so that a pool left as the trial left it would change the run)
            jitter = jitter + 0.01 * torch.cat(self.pool.images).mean()
        outputs = generator["gen_dec"](generator["gen_cnn"](inputs + jitter, skips), skips)
        self.pool.add(outputs)
        return outputs

    def discriminate(self, images, inputs=None):
        return self.model_components["discriminator"]["disc_cnn"](images)
'''

# Every kind of state a step changes: fp16's scalers, two batches a step, clipping, the EMA, a
# per-step OneCycleLR (the generator) and a ReduceLROnPlateau on the validation loss (the
# discriminator), a gradient penalty that draws random numbers, and the flow's own state.
EVERYTHING = ["training.n_epochs=2", "training.batch_size=8", "dataset.gen_inputs.n_inputs=40",
              "dataset.real_images.n_inputs=40", "dataset.validation_fraction=0.2", "training.precision=fp16",
              "training.grad_accumulation_steps=2", "training.grad_clip_norm=1.0", "training.ema_decay=0.9",
              "training.scheduler=OneCycleLR", "training.scheduler_args={max_lr: 0.01}",
              "training.scheduler_interval=step", "adversarial.scheduler=ReduceLROnPlateau",
              "adversarial.scheduler_args={}", "adversarial.scheduler_interval=epoch", "loss.loss_fn=wgan_gp_loss",
              "loss.loss_args={gp_weight: 10.0}", "logging.tensorboard=false", "logging.image_every=100"]


def stateful_trainer(tmp_path, name):
    flow = tmp_path / "stateful.py"
    flow.write_text(STATEFUL_FLOW)
    cfg = config.load_training_config(SRC / TRAIN_CFG, [*EVERYTHING, f"model.model_flow_path={flow}"])
    seed_everything(0)
    model = model_base.build_model(cfg["model"])
    loader, validation = train.make_loaders(cfg, model, CPU, TRAIN_CFG)
    run = runs.Run.of(cfg, folder=tmp_path / name)  # (the config's own folder is in the source tree)
    return loop.Trainer(cfg, model, loader, CPU, None, validation, run)


def trial(trainer):
    """The checks train.py makes before writing: the phases, then the whole step."""
    first = first_samples(trainer.loader.dataset, train.trial_size(trainer.loader))
    preflight.check_step(trainer.losses, first, TRAIN_CFG)
    held_out = first_samples(trainer.validation_loader.dataset, 2)
    preflight.check_whole_step(trainer, first, held_out, TRAIN_CFG)


def everything_of(trainer):
    """What a run ends with: weights, every network's optimizer, schedule, scaler, EMA and histories,
    the flow's own state and the random number generators."""
    nets = {name: (net.optimizer.state_dict(), net.scheduler.state_dict(), net.scaler.state_dict(),
                   net.ema.module.state_dict() if net.ema is not None else None, net.loss_history,
                   net.validation_history, net.lr) for name, net in trainer.networks.items()}
    model = trainer.model
    return copy.deepcopy((model.state_dict(), nets, model.calls, model.pool.images, model.moments,
                          model.noise.get_state(), torch.get_rng_state(), np.random.get_state()[1], trainer.step,
                          trainer.stepper.skipped_updates))  # (copies: the step changes tensors in place)


def assert_same(a, b, path="state"):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"  # (NaN equals NaN here)


def test_a_run_with_the_trial_step_trains_bit_for_bit_as_one_without_it(tmp_path):
    without = stateful_trainer(tmp_path, "without")
    without.fit()
    with_trial = stateful_trainer(tmp_path, "with")
    trial(with_trial)
    with_trial.fit()
    assert with_trial.step == 4 and with_trial.model.calls > 0 and with_trial.model.pool.images  # 2 steps an epoch
    assert_same(everything_of(without), everything_of(with_trial))


def test_the_trial_step_runs_a_step_and_puts_everything_back(tmp_path):
    trainer = stateful_trainer(tmp_path, "run")
    nets = trainer.networks.values()
    before = everything_of(trainer)
    steps_taken = []
    for net in nets:  # (a step of each optimizer is made in the trial, and undone)
        net.optimizer.register_step_post_hook(lambda optimizer, args, kwargs: steps_taken.append(optimizer))
    trial(trainer)
    assert len(steps_taken) == 2
    assert_same(before, everything_of(trainer))
    assert all(not net.optimizer.state for net in nets)  # Adam's buffers are made afresh by the first real step
    assert all(p.grad is None for p in trainer.model.parameters())
    assert all(net.ema.n_averaged.item() == 0 for net in nets if net.ema is not None)
    assert trainer.model.training and not trainer.run.folder.exists()


# ---- what fails in it: one case of each kind, each through train.py -------------------------------
def trial_cases(repo, tmp):
    """{name: ([script, *args], what the message must name, the folder that must stay empty)}."""
    files, out = tmp / "files", tmp / "out"
    files.mkdir()
    np.save(files / "empty.npy", np.zeros((0, 1, 4, 4), np.float32))
    nan_images = np.load(repo / "data/example_model/blobs_4x4.npy")[:64].astype(np.float32)
    nan_images[:2] = np.nan
    np.save(files / "nan.npy", nan_images)
    (files / "no_return.py").write_text((repo / "models/example_model/example_model.py").read_text().replace(
        "        return generator[\"gen_dec\"](gen_outputs, new_skip_dict)", "        generator[\"gen_dec\"]"
        "(gen_outputs, new_skip_dict)"))
    batchnorm = architecture(repo, files, "batchnorm", lambda arch: arch["disc_cnn"]["layers"].insert(5, {
        "BatchNorm1d": None}))

    def train_with(*sets):
        return ["train.py", "-t", TRAIN_CFG, "--set", f"saving.save_folder_name={out}", "--set", "training.n_epochs=2",
                *[a for s in sets for a in ("--set", s)]]

    found = {
        "loss_without_scores": (train_with("loss.loss_fn=weighted_reconstruction_loss", "loss.loss_args={}"),
                                "loss.loss_fn: the discriminator's loss from weighted_reconstruction_loss"),
        "capturable_on_the_cpu": (train_with("training.optimizer_args={capturable: true}"),
                                  "training.optimizer_args"),
        "differentiable_optimizer": (train_with("adversarial.optimizer_args={differentiable: true}"),
                                     "adversarial.optimizer_args"),
        "sparse_gradients_only": (train_with("training.optimizer=SparseAdam", "training.optimizer_args={}"),
                                  "training.optimizer"),
        "scheduler_cannot_step": (train_with("training.scheduler=CosineAnnealingLR",
                                             "training.scheduler_args={T_max: 0.0}"), "training.scheduler_args"),
        "schedule_runs_out": (train_with("training.scheduler=OneCycleLR", "training.scheduler_interval=step",
                                         "training.scheduler_args={max_lr: 0.01, total_steps: 20}"),
                              "cannot step at step 21 of the run's 32"),
        "empty_stream": (train_with(f"dataset.real_images.data_path={files / 'empty.npy'}"), "dataset.real_images"),
        "last_batch_of_one": (train_with(f"model.architecture_cfg_path={batchnorm}", "dataset.real_images.n_inputs=33"),
                              "training.batch_size 32"),
        "first_loss_not_finite": (train_with(f"dataset.real_images.data_path={files / 'nan.npy'}"),
                                  "loss is not finite on the first samples"),
        "forward_returns_none": (train_with(f"model.model_flow_path={files / 'no_return.py'}"),
                                 "model.model_flow_path: ExampleModel.forward"),
    }
    return {name: ([str(a).replace(str(out), str(out / name)) for a in args], named, out / name)
            for name, (args, named) in found.items()}


def test_what_only_a_whole_step_meets_is_refused_before_anything_is_written(repo, tmp_path):
    assert_refused(run_refused(repo, trial_cases(repo, tmp_path), tmp_path), 10)


def test_an_adversarial_setting_copied_from_training_is_named_by_training_key(tmp_path):
    cfg = config.load_training_config(SRC / TRAIN_CFG, ["training.optimizer_args={capturable: true}"])
    model = model_base.build_model(cfg["model"])
    loader, _ = train.make_loaders(cfg, model, CPU, TRAIN_CFG)
    trainer = loop.Trainer(cfg, model, loader, CPU, run=runs.Run.of(cfg, folder=tmp_path / "run"))
    with pytest.raises(preflight.UserError) as e:
        preflight.check_whole_step(trainer, first_samples(loader.dataset, 2), None, TRAIN_CFG)
    message = str(e.value)  # the discriminator updates first (train_disc_first): its optimizer copies training's
    assert message.startswith(f"{TRAIN_CFG}: training.optimizer (adversarial.optimizer copies it), training."
                              "optimizer_args (adversarial.optimizer_args copies it): Adam(lr=0.001, "), message
    assert "cannot update the discriminator's weights: If capturable=True" in message and "\n" not in message


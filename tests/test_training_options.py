"""Training options, in-process on the toy GAN (a few steps each): mixed precision (bf16 trains
on the CPU, fp16's gradient scalers survive a resume), gradient clipping and accumulation, the
generator's EMA (saved, resumed, and used by evaluate.py and jit_trace_model.py through
runs.load_trained_run unless asked not to, and left alone by steps fp16 skips), torch.compile and
channels_last, SyncBatchNorm's refusal on CPUs, and DDP's wrappers in a one-process group (the
runs of several processes are in test_cli.py)."""
import math
import socket

import pytest
import torch
import torch.distributed as dist
from tqdm import tqdm

import train
from conftest import SRC, TRAIN_CFG
from engine import config, loop, model_base, runs
from engine.placement import Placement, prepare_model, seed_everything, setup_placement

CPU = Placement(torch.device("cpu"))


def toy_trainer(tmp_path, *overrides, resume=None, placement=CPU):
    """The toy GAN on 64 real images in batches of 16 (4 steps an epoch), saving into tmp_path."""
    cfg = config.load_training_config(SRC / TRAIN_CFG, ["dataset.real_images.n_inputs=64", "training.batch_size=16",
                                                         "training.n_epochs=1", *overrides])
    seed_everything(0)
    model = model_base.build_model(cfg["model"])
    loader, _ = train.make_loaders(cfg, model, placement, TRAIN_CFG)
    if resume is not None:
        runs.load_weights(model, resume, "checkpoint")
    run = runs.Run.of(cfg, folder=tmp_path / "run")  # (the config's own folder is in the source tree)
    return loop.Trainer(cfg, model, loader, placement, resume, run=run)


def finite_history(trainer):
    return all(math.isfinite(v) for net in trainer.networks.values() for values in net.loss_history.values()
               for v in values)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_the_cpu(tmp_path, precision):
    trainer = toy_trainer(tmp_path, f"training.precision={precision}")
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    assert finite_history(trainer) and len(trainer.networks["generator"].loss_history["total"]) == 4
    end = trainer.model.state_dict()
    assert all(v.dtype == start[k].dtype for k, v in end.items())  # the weights stay fp32; only the math is mixed
    assert any(not torch.equal(start[k], v) for k, v in end.items() if v.is_floating_point())
    scalers = [net.scaler for net in trainer.networks.values() if net.scaler is not None]
    assert len(scalers) == (2 if precision == "fp16" else 0)  # bf16 has fp32's range: no scaler


def test_fp16_scalers_survive_a_resume(tmp_path):
    first = toy_trainer(tmp_path, "training.precision=fp16")
    last = first.fit()
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert set(saved["scaler_state_dicts"]) == {"generator", "discriminator"}
    fresh = torch.amp.GradScaler("cpu").state_dict()
    assert all(state != fresh for state in saved["scaler_state_dicts"].values())  # 4 steps counted towards growth
    resumed = toy_trainer(tmp_path, "training.precision=fp16", "training.n_epochs=2", resume=saved)
    for name, net in resumed.networks.items():
        assert net.scaler.state_dict() == first.networks[name].scaler.state_dict()
        assert net.scaler.get_scale() == first.networks[name].scaler.get_scale()


def test_gradient_clipping_bounds_each_networks_gradient_norm(tmp_path):
    trainer = toy_trainer(tmp_path, "training.grad_clip_norm=0.001", "adversarial.grad_clip_norm=0.002")
    batch = next(iter(trainer.loader))
    trainer.train_step(batch)  # the gradients of the last update of each network stay until the next
    for net, clip in (("generator", 0.001), ("discriminator", 0.002)):
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.networks[net].params]))
        assert norm <= clip * (1 + 1e-4), (net, norm)
    unclipped = toy_trainer(tmp_path)
    unclipped.train_step(next(iter(unclipped.loader)))
    params = unclipped.networks["generator"].params
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])) > 0.001


def test_generator_ema_is_saved_resumed_and_used_for_evaluation(tmp_path):
    decay = 0.5
    trainer = toy_trainer(tmp_path, f"training.ema_decay={decay}")
    generator = trainer.model.components_of("generator")
    # the average of the weights after each generator update, by hand
    expected = None

    def watch(step=trainer.networks["generator"].step):
        nonlocal expected
        stepped = step()
        now = {k: v.detach().clone().float() for k, v in generator.state_dict().items()}
        expected = now if expected is None else {k: decay * expected[k] + (1 - decay) * now[k] for k in now}
        return stepped
    trainer.networks["generator"].step = watch  # after each of the generator's optimizer steps
    last = trainer.fit()
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["ema_updates"] == 4
    for key, value in saved["ema_state_dict"].items():
        if value.is_floating_point():
            assert torch.allclose(value, expected[key], atol=1e-6), key
    assert any(not torch.equal(saved["ema_state_dict"][k], v) for k, v in generator.state_dict().items()
               if v.is_floating_point())  # the average is not the last weights

    # evaluate.py and jit_trace_model.py load the average unless asked not to
    overrides = [f"saving.save_folder_name={tmp_path}"]  # an absolute folder, unused: the checkpoint is given by path
    _, with_ema, _, _ = runs.load_trained_run(SRC / TRAIN_CFG, str(last), "test", overrides)
    _, raw, _, _ = runs.load_trained_run(SRC / TRAIN_CFG, str(last), "test", overrides, use_ema=False)
    for key, value in with_ema.components_of("generator").state_dict().items():
        assert torch.equal(value, saved["ema_state_dict"][key])
        assert torch.equal(raw.components_of("generator").state_dict()[key],
                           saved["model_state_dict"][f"model_components.{key}"])

    resumed = toy_trainer(tmp_path, f"training.ema_decay={decay}", "training.n_epochs=2", resume=saved)
    ema = resumed.networks["generator"].ema
    assert int(ema.n_averaged) == 4
    for key, value in ema.module.state_dict().items():
        assert torch.equal(value, saved["ema_state_dict"][key])


def test_a_step_the_fp16_scaler_skips_leaves_weights_and_ema_alone(tmp_path):
    trainer = toy_trainer(tmp_path, "training.precision=fp16", "training.ema_decay=0.5")
    generator = trainer.model.components_of("generator")
    # (the default first scale, 2**16, may overflow at once, as it is meant to: this one will not)
    scaler = trainer.networks["generator"].scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    ema = trainer.networks["generator"].ema
    batches = iter(trainer.loader)
    trainer.train_step(next(batches))
    assert int(ema.n_averaged) == 1
    weights = {k: v.clone() for k, v in generator.state_dict().items()}
    average = {k: v.clone() for k, v in ema.module.state_dict().items()}
    scaler.update(new_scale=1e38)  # the scaled gradients overflow
    trainer.train_step(next(batches))
    assert scaler.get_scale() < 1e38  # the scaler saw the overflow and skipped the step
    assert all(torch.equal(v, weights[k]) for k, v in generator.state_dict().items())
    assert int(ema.n_averaged) == 1
    assert all(torch.equal(v, average[k]) for k, v in ema.module.state_dict().items())


@pytest.mark.slow
def test_compiled_submodels_train_and_save_plain_weights(tmp_path):
    """training.compile compiles each submodel in place: training runs, and the checkpoint's keys
    are the uncompiled model's, so it loads into one. (aot_eager: the compile path without
    inductor's C++ build, which would take minutes here.)"""
    trainer = toy_trainer(tmp_path, "training.compile=true", "training.compile_args={backend: aot_eager}")
    submodels = [sub for component in trainer.model.model_components.values() for sub in component.values()]
    assert all(sub._compiled_call_impl is not None for sub in submodels)  # nn.Module.compile's mark
    torch._dynamo.reset()
    last = trainer.fit()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= len(submodels)  # they did run compiled
    assert finite_history(trainer)
    saved = torch.load(last, map_location="cpu", weights_only=True)["model_state_dict"]
    plain = model_base.build_model(config.load_training_config(SRC / TRAIN_CFG)["model"])
    assert list(saved) == list(plain.state_dict())
    plain.load_state_dict(saved)


def test_channels_last_trains(tmp_path):
    trainer = toy_trainer(tmp_path, "training.channels_last=true")
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) for p in trainer.model.parameters())
    trainer.fit()
    assert finite_history(trainer)


def test_compile_args_are_checked_against_torch_compile():
    with pytest.raises(config.UserError,
                       match=r"training\.compile_args\.mod: not an argument of compile.*did you mean 'mode'"):
        config.load_training_config(SRC / TRAIN_CFG, ["training.compile_args={mod: max-autotune}"])


@pytest.fixture
def process_group():
    """A gloo process group of this process alone, as torchrun --nproc_per_node=1 makes."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_one_process_under_torchrun_trains_through_ddp_as_without(tmp_path, process_group, accumulate, monkeypatch):
    """A one-process DDP run (accumulating, or sharing the generator's outputs between the two
    updates) averages each network's gradients in one all-reduce per optimizer step, and trains
    to the same weights as a plain run."""
    overrides = [f"training.grad_accumulation_steps={accumulate}", "loss.loss_fn=bce_gan_loss",
                 "loss.loss_args={r1_weight: 1.0}"]
    plain = toy_trainer(tmp_path, *overrides)
    assert plain.run_epoch(1, tqdm(disable=True))
    wrapped = toy_trainer(tmp_path, *overrides, placement=Placement(torch.device("cpu"), distributed=True))
    sizes, all_reduce = [], dist.all_reduce

    def counted(tensor, *args, **kwargs):
        sizes.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)
    monkeypatch.setattr(dist, "all_reduce", counted)
    assert wrapped.run_epoch(1, tqdm(disable=True))
    steps = 4 // accumulate
    for net in wrapped.networks.values():  # every gradient of the network in one flat tensor, once a step
        assert sizes.count(sum(p.numel() for p in net.params)) == steps
        assert net.grads_checked
    weights = plain.model.state_dict()
    assert all(torch.allclose(v, weights[k], rtol=0, atol=1e-6) for k, v in wrapped.model.state_dict().items())


def test_torchrun_with_one_process_joins_a_process_group(monkeypatch):
    with socket.socket() as probe:  # a free port for the group's store
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for key, value in {"TORCHELASTIC_RUN_ID": "test", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    placement = setup_placement([], "config.yaml")
    try:
        assert placement.distributed and dist.is_initialized() and dist.get_backend() == "gloo"
    finally:
        dist.destroy_process_group()


def test_sync_batchnorm_is_refused_for_cpu_processes():
    """torch's SyncBatchNorm needs GPUs: several CPU processes asking for it get a user error."""
    cfg = config.load_training_config(SRC / TRAIN_CFG, ["training.sync_batchnorm=true"])
    model = model_base.build_model(cfg["model"])
    two_cpu_processes = Placement(torch.device("cpu"), rank=0, world_size=2)
    with pytest.raises(config.UserError, match=r"training\.sync_batchnorm: .*GPUs only"):
        prepare_model(model, cfg["training"], two_cpu_processes, "cfg.yaml")


def test_accumulating_two_half_batches_steps_as_one_whole_batch(tmp_path):
    """grad_accumulation_steps k with batches of b: each optimizer step sums k micro-batches'
    gradients, as one batch of k * b would give (the toy has no BatchNorm; no random transforms)."""
    plain = ["dataset.real_images.data_batch_transform=null", "dataset.gen_inputs.data_batch_transform=null"]
    whole = toy_trainer(tmp_path, *plain, "training.batch_size=32")
    halves = toy_trainer(tmp_path, *plain, "training.batch_size=16", "training.grad_accumulation_steps=2")
    assert whole.steps_per_epoch == halves.steps_per_epoch == 2
    for trainer in (whole, halves):
        trainer.loader.batch_sampler.set_epoch(1)
    batch, (first, second) = next(iter(whole.loader)), list(halves.loader)[:2]
    assert torch.equal(torch.cat([first["real_images"], second["real_images"]]), batch["real_images"])
    terms_whole, _ = whole.train_step(batch)
    terms_halves, _ = halves.train_step([first, second])
    for key, value in whole.model.state_dict().items():
        assert torch.allclose(value, halves.model.state_dict()[key], atol=1e-6), key
    for net, terms in terms_whole.items():
        for name, value in terms.items():
            assert torch.allclose(value, terms_halves[net][name], atol=1e-6), (net, name)

    halves.fit()  # the loop groups the loader's batches: 4 batches of 16 make 2 steps
    assert halves.step == 2 and len(halves.networks["generator"].loss_history["total"]) == 2


def test_a_short_last_batch_counts_for_its_samples_when_accumulating(tmp_path):
    """24 samples: one batch of 24, or 16 + 8 accumulated, step alike (the 8 weigh a third)."""
    plain = ["dataset.real_images.data_batch_transform=null", "dataset.gen_inputs.data_batch_transform=null",
             "dataset.real_images.n_inputs=24"]
    whole = toy_trainer(tmp_path, *plain, "training.batch_size=24")
    parts = toy_trainer(tmp_path, *plain, "training.batch_size=16", "training.grad_accumulation_steps=2")
    for trainer in (whole, parts):
        trainer.loader.batch_sampler.set_epoch(1)
    whole.train_step(next(iter(whole.loader)))
    parts.train_step(list(parts.loader))
    for key, value in whole.model.state_dict().items():
        assert torch.allclose(value, parts.model.state_dict()[key], atol=1e-6), key


def test_resuming_with_other_accumulation(tmp_path):
    """At an epoch's end a run may change grad_accumulation_steps: a schedule that counts steps is
    rebuilt for the new number of steps; part way through an epoch it is a user error."""
    one_cycle = ["training.scheduler=OneCycleLR", "training.scheduler_args={max_lr: 0.001}",
                 "training.scheduler_interval=step", "adversarial.scheduler=StepLR", "adversarial.scheduler_args={}",
                 "adversarial.scheduler_interval=epoch", "training.n_epochs=2"]
    first = toy_trainer(tmp_path, *one_cycle, "training.grad_accumulation_steps=2")
    first.n_epochs = 1  # stop after epoch 1 of the 2 the schedule spans
    saved = torch.load(first.fit(), map_location="cpu", weights_only=True)
    resumed = toy_trainer(tmp_path, *one_cycle, resume=saved)
    assert any("training.grad_accumulation_steps changed" in note for note in resumed.notes), resumed.notes
    assert resumed.networks["generator"].scheduler.total_steps == 2 * 4  # 2 epochs of 4 steps now
    resumed.fit()  # runs to the end of the schedule without stepping past it
    assert resumed.step == saved["step"] + 4

    saved["batches_done_in_epoch"] = 1  # as if stopped after a step of epoch 2
    with pytest.raises(config.UserError,
                       match=r"training\.grad_accumulation_steps: .*--set training\.grad_accumulation_steps=2"):
        toy_trainer(tmp_path, *one_cycle, resume=saved)

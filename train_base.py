"""The training loop behind train.py: device and DDP setup (a DistributedDataParallel wrapper
per network, see NetworkLoss), optimizers, the adversarial schedule, mixed precision, gradient
accumulation and clipping, the generator's EMA, validation, progress, checkpoints and resume.

`Trainer` receives a validated config, a built model and data loaders (training, and validation
when the dataset holds samples out), and owns everything that changes while training (weights,
optimizer, scheduler and gradient-scaler state, the EMA, epoch, step, loss history, RNG). Its
state is what a checkpoint holds, so resuming restores all of it.
"""
import contextlib
import functools
import inspect
import itertools
import json
import operator
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

import loss
from checkpoint import atomic_write, checkpoint_name, list_checkpoints, remove_partial_writes, save_checkpoint
from config import checkpoint_dir, to_yaml, torch_optimizers, torch_schedulers
from errors import UserError, kwargs_text, public_functions


def seed_everything(seed):
    """Seed every RNG and ask cuDNN for its deterministic kernels, so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


@dataclass
class Placement:
    """Where this process trains: its device, and its rank among world_size processes;
    `distributed` once it has joined a process group (under torchrun, even as the only process)."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    distributed: bool = False

    @property
    def is_main(self):
        return self.rank == 0


def select_device(gpus, where, index=0):
    """torch.device for `gpus[index]` (the CPU if `gpus` is empty), checked against this machine."""
    if not gpus:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"{where}: {gpus} asks for GPUs, but this machine has none; use [] for the CPU")
    if max(gpus) >= torch.cuda.device_count():
        raise UserError(f"{where}: {gpus} names a GPU this machine lacks; valid ids: 0..{torch.cuda.device_count() - 1}")
    return torch.device("cuda", gpus[index])


def setup_placement(gpus, source):
    """The device from `training.gpus`; under torchrun, one process per GPU (or CPU process)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    where = f"{source}: training.gpus"
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    select_device(gpus, where)  # are there GPUs at all?
    if gpus and local_world_size != len(gpus):
        raise UserError(f"{where}: {len(gpus)} GPUs need one process each, but {local_world_size} "
                        f"{'was' if local_world_size == 1 else 'were'} started; run torchrun --standalone --nnodes=1 "
                        f"--nproc_per_node={len(gpus)} train.py -t {source}")
    device = select_device(gpus, where, local_rank)  # the GPU this process owns
    if gpus:
        torch.cuda.set_device(device)
    # Under torchrun a single process joins a process group too, so that --nproc_per_node=1
    # rehearses a multi-GPU run: NCCL, the DDP wrappers and all.
    distributed = world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if distributed:
        dist.init_process_group("nccl" if gpus else "gloo", device_id=device if gpus else None)
    return Placement(device, rank, world_size, distributed)


def check_training_setup(model, adversarial, loss_fn, source):
    """The model, the training mode and the loss fit together (checked before anything is written)."""
    scores = inspect.signature(loss_fn).parameters.get("fake_scores")
    needs_scores = scores is not None and scores.default is scores.empty
    if adversarial and not model.has_discriminator:
        raise UserError(f"{source}: adversarial.enable_adversarial_training is true, but the architecture "
                        f"{model.architecture_path} has no component with adv_type: discriminator")
    if adversarial and model.target_key is None:
        raise UserError(f"{source}: adversarial training needs real samples, but the model flow "
                        f"{type(model).__name__} sets no target_key (the data stream holding them)")
    if needs_scores and not adversarial:
        raise UserError(f"{source}: loss.loss_fn {loss_fn.__name__} is a GAN loss, but "
                        "adversarial.enable_adversarial_training is false; use weighted_reconstruction_loss "
                        "or enable adversarial training")


def make_optimizer(params, s, where):
    """The optimizer of one network from its config section (`training` or `adversarial`)."""
    name, args = s["optimizer"], s["optimizer_args"]
    try:
        return torch_optimizers()[name](params, lr=s["learning_rate"], **args)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}.optimizer_args: {name}(lr={s['learning_rate']}, **{args}) failed: {e}") from None


def make_scheduler(optimizer, s, steps_per_epoch, n_epochs, where):
    """The learning-rate schedule of one network. StepLR takes the seed's learning_rate_step and
    learning_rate_gamma; a schedule with a total length (OneCycleLR) gets the run's, in steps or
    epochs as scheduler_interval says, unless its args give one."""
    name, args = s["scheduler"], dict(s["scheduler_args"])
    cls = torch_schedulers()[name]
    if name == "StepLR":
        args |= {"step_size": s["learning_rate_step"], "gamma": s["learning_rate_gamma"]}
    if fills_total_length(s):
        args["total_steps"] = n_epochs * (steps_per_epoch if s["scheduler_interval"] == "step" else 1)
    try:
        return cls(optimizer, **args)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}.scheduler_args: {name}({kwargs_text(args)}) failed: {e}") from None


class NonFiniteLoss(Exception):
    """A loss turned NaN or infinite (training.on_nonfinite_loss: stop)."""


def read_metrics(path):
    """The rows of a metrics.jsonl (none if there is no file), skipping a line a kill cut short."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    return rows


class MetricsLog:
    """metrics.jsonl beside the checkpoints: one JSON object per step with its epoch, step, every
    loss term and the learning rate of each network ("generator/l1", "generator/lr", ...), the
    share of time spent waiting for data ("data_wait", per log_interval steps), and
    with a validation split one per epoch of validation losses ("validation/generator/l1", ...).
    Read it with e.g. pandas.read_json(path, lines=True)."""

    def __init__(self, path, last_step):
        self.path = path
        # A resumed run redoes the steps after its checkpoint: drop their rows (and any line cut
        # short by a kill) so that every step appears once.
        text = "".join(json.dumps(row) + "\n" for row in read_metrics(path) if row["step"] <= last_step).encode()
        atomic_write(path, lambda f: f.write(text))
        self.file = open(path, "a")

    def write(self, rows):
        self.file.write("".join(json.dumps(row) + "\n" for row in rows))
        self.file.flush()

    def close(self):
        self.file.close()


class Trainer:
    def __init__(self, cfg, model, loader, placement, resume_state=None, validation_loader=None):
        train, adv = cfg["training"], cfg["adversarial"]
        self.source = cfg["config_path"]
        self.cfg, self.model, self.loader, self.placement = cfg, model, loader, placement
        self.validation_loader = validation_loader
        prepare_model(model, train, placement, self.source)  # before any optimizer holds its parameters
        self.channels_last = train["channels_last"]
        self.adversarial = adv["enable_adversarial_training"]
        self.loss_fn = public_functions(loss)[cfg["loss"]["loss_fn"]]
        self.loss_args = cfg["loss"]["loss_args"]
        check_training_setup(model, self.adversarial, self.loss_fn, self.source)
        # A loss that asks for the discriminator (a penalty on its gradient) gets a callable.
        self.loss_wants_discriminator = "discriminator" in inspect.signature(self.loss_fn).parameters
        self.networks = ["generator", "discriminator"] if self.adversarial else ["generator"]
        self.params = {net: model.parameters_of(net) for net in self.networks}
        self.accumulate = train["grad_accumulation_steps"]  # loader batches per optimizer step
        self.steps_per_epoch = -(-len(loader) // self.accumulate)
        self.optimizers, self.schedulers, self.schedule_every_step = {}, {}, {}
        for net, section in (("generator", "training"), ("discriminator", "adversarial")):
            if net in self.networks:
                s, where = cfg[section], f"{self.source}: {section}"
                self.optimizers[net] = make_optimizer(self.params[net], s, where)
                self.schedulers[net] = make_scheduler(self.optimizers[net], s, self.steps_per_epoch, train["n_epochs"],
                                                      where)
                self.schedule_every_step[net] = s["scheduler_interval"] == "step"
        self.clip = {"generator": train["grad_clip_norm"], "discriminator": adv["grad_clip_norm"]}
        # Mixed precision: forward passes and losses under autocast; with fp16 a scaler per
        # network keeps small gradients from flushing to zero (bf16 has fp32's range: none needed).
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[train["precision"]]
        self.scalers = {net: torch.amp.GradScaler(placement.device.type) for net in self.networks} \
            if train["precision"] == "fp16" else {}
        self.generator_part = model.components_of("generator")
        self.ema = None if train["ema_decay"] is None else AveragedModel(
            self.generator_part, multi_avg_fn=get_ema_multi_avg_fn(train["ema_decay"]), use_buffers=True)
        if train["compile"]:  # in place, after the EMA's copy: the modules and their state_dict keys stay as they are
            compile_submodels(model, train["compile_args"], f"{self.source}: training.compile_args")
        self.on_nonfinite = train["on_nonfinite_loss"]
        self.skipped_updates = 0
        self.keep_last = cfg["saving"]["keep_last"]
        self.metrics = None  # metrics.jsonl, open while fit() runs on rank 0
        self.notes = []  # what resuming changed, for train.py to show
        self.update_order = ["discriminator", "generator"] if adv["train_disc_first"] else ["generator", "discriminator"]
        self.iterations = {"generator": adv["n_gen_iterations"], "discriminator": adv["n_disc_iterations"]}
        self.n_epochs, self.log_interval = train["n_epochs"], train["log_interval"]
        self.save_every, self.save_prefix = cfg["saving"]["save_epoch_increment"], cfg["saving"]["save_filename_prefix"]
        self.folder = checkpoint_dir(cfg)
        self.epoch, self.step = 0, 0  # completed epochs, steps
        self.batches_done = 0  # steps of the current epoch (non-zero only in a run stopped part way)
        self.loss_history = {net: {} for net in self.networks}
        self.validation_history = {"step": [], **{net: {} for net in self.networks}}  # one value per epoch
        self.stop_signal = None
        if resume_state is not None:
            self.load_state(resume_state)
        # Under DDP each trained network gets its own wrapper (see NetworkLoss), which starts
        # every process from rank 0's weights; and from rank 0's buffers, which older torch
        # versions' wrappers leave alone.
        self.ddp = {net: wrap_for_ddp(NetworkLoss(model.components_of(net))) for net in self.networks} \
            if placement.distributed else {}
        self.share_buffers()
        self.gradients_checked = {net: False for net in self.ddp}

    # ---- one step ----
    def train_step(self, batches):
        """Update the network(s) once (each n_*_iterations times in adversarial training) on a
        batch, or on a list of micro-batches whose gradients are summed
        (training.grad_accumulation_steps). Returns ({network: loss terms, averaged over the
        micro-batches}, {network: lr})."""
        micro = [self.to_device(b) for b in (batches if isinstance(batches, list) else [batches])]
        lrs = {net: opt.param_groups[0]["lr"] for net, opt in self.optimizers.items()}
        # One batch: the generator's outputs are made once per generator state and shared by
        # both networks' updates. Several: each update makes its own, one micro-batch at a time,
        # so that only one micro-batch's activations are held at once.
        reuse = len(micro) == 1
        terms, outputs = {}, None
        for net in self.update_order if self.adversarial else ["generator"]:
            for _ in range(self.iterations[net] if self.adversarial else 1):
                if reuse and outputs is None:
                    outputs = [self.forward(micro[0][0])]
                terms[net] = self.update(net, micro, outputs if reuse else None)
                if net == "generator":
                    outputs = None
        for net, every_step in self.schedule_every_step.items():
            if every_step:
                self.schedulers[net].step()
        return terms, lrs

    def autocast(self):
        """The precision context of forward passes and losses. (For fp32 none at all: even a
        disabled torch.autocast costs some microseconds, three times a step.)"""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.placement.device.type, dtype=self.autocast_dtype)

    def forward(self, inputs):
        with self.autocast():
            return self.model(inputs)

    def to_device(self, batch):
        """The batch's (inputs, targets) on this process's device."""
        inputs, targets = self.model.split_batch(batch)
        device = self.placement.device
        inputs = inputs.to(device, non_blocking=True)
        if self.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs, targets.to(device, non_blocking=True) if targets is not None else None

    def update(self, net, micro, outputs=None):
        """One optimizer step of `net` with the gradients summed over the micro-batches `micro`
        ([(inputs, targets)], each loss weighted by its share of their samples, so that they step
        as one batch of all of them would). `outputs`: the generator's outputs for them, if already
        made. Under DDP the gradients are averaged over the processes during the last
        micro-batch's backward pass. Returns the loss terms, averaged, plus their total
        (detached, float)."""
        optimizer, scaler, ddp = self.optimizers[net], self.scalers.get(net), self.ddp.get(net)
        optimizer.zero_grad(set_to_none=True)
        sums, bad = {}, None
        n_samples = sum(len(inputs) for inputs, _ in micro)
        for i, (inputs, targets) in enumerate(micro):
            weight = len(inputs) / n_samples  # a short last batch of the epoch counts for its samples
            out = outputs[i] if outputs is not None else None
            # DDP all-reduces once per step: not after the micro-batches before the last.
            reduce_later = ddp.no_sync() if ddp is not None and i < len(micro) - 1 else contextlib.nullcontext()
            with reduce_later:
                args = (net, inputs, targets, out)
                total, terms = ddp(self.micro_loss, *args) if ddp is not None else self.micro_loss(*args)
                part = total * weight if len(micro) > 1 else total
                # the generator's loss needs no discriminator gradients
                (scaler.scale(part) if scaler else part).backward(inputs=self.params[net])
            for name, value in {"total": total, **terms}.items():  # (float: autocast may give half precision)
                value = value.detach().float()
                if len(micro) > 1:
                    value = value * weight
                sums[name] = sums[name] + value if name in sums else value
            if self.on_nonfinite != "ignore":
                finite = torch.isfinite(total.detach())
                bad = ~finite if bad is None else bad | ~finite
        if ddp is not None and not self.gradients_checked[net]:  # (a NaN loss leaves gradients too)
            self.check_every_parameter_trained(net)
        if bad is not None and self.placement.world_size > 1:  # a NaN on any process skips the step on all
            bad = bad.float()
            dist.all_reduce(bad)
        if bad is not None and bad.item():  # one host sync per update; `ignore` saves it
            self.nonfinite(net, sums)
            optimizer.zero_grad(set_to_none=True)
            return sums
        stepped = self.step_optimizer(net, optimizer, scaler)
        if stepped and net == "generator" and self.ema is not None:  # (not after a step fp16 skipped)
            self.ema.update_parameters(self.generator_part)
        return sums

    def check_every_parameter_trained(self, net):
        """Under DDP each of the network's parameters must get a gradient in every update: DDP
        reduces them in buckets and would fail at the next step, with a message naming neither
        the parameters nor the file to fix. Checked after the network's first update."""
        unused = [name for name, p in self.model.components_of(net).named_parameters()
                  if p.requires_grad and p.grad is None]
        if unused:
            shown = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
            method = "forward" if net == "generator" else "discriminate"
            raise UserError(f"{self.source}: model.model_flow_path: under DDP every parameter of the {net} must take "
                            f"part in its loss, but {shown} got no gradient; call each of the {net}'s submodels "
                            f"in the flow's {method}, or drop unused ones from {self.model.architecture_path}")
        self.gradients_checked[net] = True

    def micro_loss(self, net, inputs, targets, outputs=None):
        """The total loss of `net` on one (micro-)batch, and its terms; the generator runs first
        unless its `outputs` are given (without autograd for the discriminator's loss)."""
        if outputs is None:
            with torch.set_grad_enabled(net == "generator"):  # the discriminator's terms detach it
                outputs = self.forward(inputs)
        with self.autocast():
            terms = self.loss_terms(net, outputs, inputs, targets)
            return functools.reduce(operator.add, terms.values()), terms  # (sum() would add a 0 first)

    def step_optimizer(self, net, optimizer, scaler):
        """Clip the (unscaled) gradients if asked, then step. An fp16 scaler skips a step whose
        gradients overflowed, and lowers its scale; returned is whether the weights changed."""
        if self.clip[net]:
            if scaler:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.params[net], self.clip[net])
        if not scaler:
            optimizer.step()
            return True
        scale = scaler.get_scale()  # (get_scale syncs with the device, as scaler.step's check of the gradients does)
        scaler.step(optimizer)
        scaler.update()
        return scaler.get_scale() >= scale  # update() lowers the scale exactly when it skipped the step

    def loss_terms(self, net, outputs, inputs, targets):
        """The loss function's terms for `net` on one batch (scoring with the discriminator in
        adversarial training; the discriminator's terms see the outputs detached)."""
        fake_scores = real_scores = None
        extra = {}
        if self.adversarial:
            if net == "discriminator":
                outputs = outputs.detach()
                real_scores = self.model.discriminate(targets, inputs)
            fake_scores = self.model.discriminate(outputs, inputs)
            if self.loss_wants_discriminator:
                extra["discriminator"] = lambda samples: self.model.discriminate(samples, inputs)
        terms = self.loss_fn(net, outputs, targets, fake_scores, real_scores, **self.loss_args, **extra)
        if not terms:
            raise UserError(f"{self.source}: loss.loss_fn {self.loss_fn.__name__} returned no loss terms for the "
                            f"{net}; check loss.loss_args (all weights zero?)")
        return terms

    def nonfinite(self, net, terms):
        """A NaN or inf loss (on any DDP process): stop, or skip this update, as configured."""
        values = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
        where = (f"epoch {self.epoch + 1}, step {self.step + 1} ({self.batches_done + 1} of the epoch): "
                 f"{net} loss {values}")
        if self.on_nonfinite == "stop":
            raise NonFiniteLoss(f"non-finite loss at {where}")
        self.skipped_updates += 1
        if self.placement.is_main:
            tqdm.write(f"skipped the {net} update at {where} (training.on_nonfinite_loss: skip)")

    # ---- the loop ----
    def fit(self):
        """Train epochs epoch+1 .. n_epochs; Ctrl-C or SIGTERM ends the step, saves `_et`, exits.
        A non-finite loss (on_nonfinite_loss: stop) ends training without saving, exit status 3."""
        previous = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        main = self.placement.is_main
        steps_per_epoch = self.steps_per_epoch
        bar = tqdm(total=self.n_epochs * steps_per_epoch, initial=self.epoch * steps_per_epoch + self.batches_done,
                   disable=not main, dynamic_ncols=True, unit="step")
        if main:
            self.remove_partial_saves()
            self.metrics = MetricsLog(self.folder / "metrics.jsonl", self.step)
        last = self.save() if self.step == 0 else self.latest_checkpoint()  # the initial weights
        try:
            for epoch in range(self.epoch + 1, self.n_epochs + 1):
                bar.set_description(f"epoch {epoch}/{self.n_epochs}")
                if not self.run_epoch(epoch, bar):
                    break
                self.epoch = epoch
                validation = self.validate(bar) if self.validation_loader is not None else None
                self.step_epoch_schedules(steps_per_epoch, validation)
                if epoch % self.save_every == 0 or epoch == self.n_epochs:
                    last = self.save()
        except NonFiniteLoss as e:
            bar.close()
            if main:
                print(f"error: {e}\nThe last checkpoint, {last}, is untouched. To skip such updates instead, set "
                      "training.on_nonfinite_loss: skip; a lower learning rate often helps.", file=sys.stderr)
            raise SystemExit(3) from None
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None
            for s, handler in previous.items():
                signal.signal(s, handler)
        if self.stop_signal is not None:
            last = self.save(early_stop=True)
            if main:
                print(f"stopped by {signal.Signals(self.stop_signal).name}; saved {last}")
            raise SystemExit(128 + self.stop_signal)
        if main:
            print(f"trained to epoch {self.epoch}; latest checkpoint: {last}")
        return last

    @property
    def finished(self):
        return self.epoch >= self.n_epochs

    def run_epoch(self, epoch, bar):
        """Train one epoch (the rest of it, when resuming part way); False if a stop was requested."""
        self.loader.batch_sampler.set_epoch(epoch, skip=self.batches_done * self.accumulate)
        pending, waited, since = [], 0.0, time.perf_counter()
        batches = iter(self.loader)
        while True:
            start = time.perf_counter()
            group = list(itertools.islice(batches, self.accumulate))  # one step's batches
            waited += time.perf_counter() - start
            if not group:
                break
            try:
                pending.append(self.train_step(group if self.accumulate > 1 else group[0]))
            except NonFiniteLoss:
                if pending:  # keep the good steps before it in loss_history and metrics.jsonl
                    self.record(pending, epoch, bar, waited / (time.perf_counter() - since))
                raise
            self.step += 1
            self.batches_done += 1
            bar.update()
            if len(pending) == self.log_interval:
                self.record(pending, epoch, bar, waited / (time.perf_counter() - since))
                pending, waited, since = [], 0.0, time.perf_counter()
            if self.stop_requested(agree=not pending):
                break
        if pending:
            self.record(pending, epoch, bar, waited / (time.perf_counter() - since))
        if self.stop_requested(agree=True):
            return False
        self.batches_done = 0
        return True

    def step_epoch_schedules(self, steps_per_epoch, validation=None):
        """Advance the per-epoch schedules; ReduceLROnPlateau follows the validation loss when
        there is one, else the epoch's mean training loss."""
        for net, scheduler in self.schedulers.items():
            if self.schedule_every_step[net]:
                continue
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(validation[net]["total"] if validation else self.epoch_mean_loss(net, steps_per_epoch))
            else:
                scheduler.step()

    def validate(self, bar):
        """Each network's mean loss terms over the held-out samples (of every process), in eval
        mode; kept in validation_history and metrics.jsonl, and shown."""
        self.share_buffers()
        self.model.eval()
        sums, count = {}, 0
        # No autograd, unless a loss term penalises the discriminator's gradient (WGAN-GP, R1);
        # and the random numbers such a penalty draws do not shift training's.
        devices = [self.placement.device] if self.placement.device.type == "cuda" else []
        with torch.set_grad_enabled(self.loss_wants_discriminator), torch.random.fork_rng(devices), self.autocast():
            for batch in self.validation_loader:
                inputs, targets = self.to_device(batch)
                outputs = self.model(inputs)
                for net in self.networks:
                    total, terms = self.micro_loss(net, inputs, targets, outputs)
                    for name, value in {"total": total, **terms}.items():
                        sums[net, name] = sums.get((net, name), 0) + value.detach().float() * len(inputs)
                count += len(inputs)
        self.model.train()
        totals = torch.stack([*sums.values(), torch.tensor(float(count), device=self.placement.device)])
        if self.placement.world_size > 1:
            dist.all_reduce(totals)
        means = (totals[:-1] / totals[-1]).tolist()
        result = {net: {} for net in self.networks}
        for (net, name), mean in zip(sums, means):
            result[net][name] = mean
            self.validation_history[net].setdefault(name, []).append(mean)
        self.validation_history["step"].append(self.step)
        if self.metrics is not None:
            self.metrics.write([{"epoch": self.epoch, "step": self.step,
                                 **{f"validation/{net}/{name}": v for (net, name), v in zip(sums, means)}}])
        if self.placement.is_main:
            bar.write(f"epoch {self.epoch}: validation loss " + ", ".join(
                f"{net} {terms['total']:.4f}" for net, terms in result.items()))
        return result

    def epoch_mean_loss(self, net, steps_per_epoch):
        """The mean total loss of `net` over the epoch just trained (over all DDP processes)."""
        mean = torch.tensor(float(np.mean(self.loss_history[net]["total"][-steps_per_epoch:])),
                            device=self.placement.device)
        if self.placement.world_size > 1:
            dist.all_reduce(mean)
            mean /= self.placement.world_size
        return mean.item()

    def record(self, pending, epoch, bar, data_share):
        """Move pending per-step losses to loss_history and metrics.jsonl (one device sync per
        log_interval steps), and show the latest losses and the share of time spent waiting for data."""
        first_step = self.step - len(pending) + 1
        # data_wait: the share of these steps' time spent waiting for the loader (same for each).
        rows = [{"epoch": epoch, "step": first_step + i, "data_wait": round(data_share, 4)} for i in range(len(pending))]
        for net in pending[0][0]:
            names = list(pending[0][0][net])
            values = torch.stack([torch.stack([terms[net][k] for k in names]) for terms, _ in pending]).cpu().tolist()
            history = self.loss_history[net]
            for i, name in enumerate(names):
                history.setdefault(name, []).extend(row[i] for row in values)
            for row, step_values, (_, lrs) in zip(rows, values, pending):
                row |= {f"{net}/{name}": v for name, v in zip(names, step_values)}
                row[f"{net}/lr"] = lrs[net]
        if self.metrics is not None:
            self.metrics.write(rows)
        bar.set_postfix({**{f"{net} loss": f"{h['total'][-1]:.4f}" for net, h in self.loss_history.items()},
                         "data wait": f"{data_share:.0%}"}, refresh=False)

    def stop_requested(self, agree):
        """Whether to stop after this step. Under DDP every process must stop at the same step (or
        the others would wait forever in the next gradient all-reduce), so they decide together, and
        only when `agree` (every log_interval steps and at the epoch's end) to keep this all-reduce
        and its host sync off most steps."""
        if self.placement.world_size == 1:
            return self.stop_signal is not None
        if not agree:
            return False
        flag = torch.tensor([self.stop_signal or 0], device=self.placement.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.stop_signal = int(flag.item()) or None
        return self.stop_signal is not None

    def request_stop(self, signum, frame):
        if self.stop_signal is not None:  # a second Ctrl-C: stop now, without saving
            raise KeyboardInterrupt
        self.stop_signal = signum

    # ---- checkpoints ----
    def state(self, early_stop):
        return {
            "model_state_dict": self.model.state_dict(),
            "optimizer_state_dict": self.optimizers["generator"].state_dict(),
            "scheduler_state_dict": self.schedulers["generator"].state_dict(),
            "disc_optimizer_state_dict": self.optimizers["discriminator"].state_dict() if self.adversarial else None,
            "disc_scheduler_state_dict": self.schedulers["discriminator"].state_dict() if self.adversarial else None,
            "epoch": self.epoch,
            "step": self.step,
            "batches_done_in_epoch": self.batches_done,
            "early_stop": early_stop,
            "skipped_updates": self.skipped_updates,
            "scaler_state_dicts": {net: scaler.state_dict() for net, scaler in self.scalers.items()},
            # the generator's averaged weights, keyed as in model.components_of("generator")
            "ema_state_dict": self.ema.module.state_dict() if self.ema is not None else None,
            "ema_updates": int(self.ema.n_averaged) if self.ema is not None else 0,
            "loss_history": self.loss_history,
            "validation_history": self.validation_history,
            "split": self.split_record(),
            "world_size": self.placement.world_size,
            "config": to_yaml(self.cfg),
            "architecture": self.model.architecture_text,
            "rng_state": rng_state(),
        }

    def split_record(self):
        """How the run split its samples, for evaluate.py to find the held-out ones again."""
        data = self.cfg["dataset"]
        return {"n_samples": len(self.loader.dataset.streams[data["data_len_key"]]),
                "validation_fraction": data["validation_fraction"], "split_seed": data["split_seed"],
                "batch_size": self.cfg["training"]["batch_size"]}  # of the validation batches

    def share_buffers(self):
        """Rank 0's buffers (BatchNorm running statistics) to every process. Gradients are
        averaged, so the weights agree, but each process updates buffers from its own shard:
        validation and checkpoints use one set, as DDP's broadcast_buffers does."""
        if self.placement.world_size > 1:
            for buffer in self.model.buffers():
                dist.broadcast(buffer, 0)

    def save(self, early_stop=False):
        """Every process calls this; rank 0 writes the checkpoint."""
        self.share_buffers()
        if not self.placement.is_main:
            return None
        state = self.state(early_stop)
        path = save_checkpoint(self.folder / checkpoint_name(self.save_prefix, self.epoch, early_stop), state)
        if self.keep_last:  # only once the new one is safely on disk
            for old in self.own_checkpoints()[:-self.keep_last]:
                old.unlink(missing_ok=True)
        return path

    def own_checkpoints(self):
        """This run's checkpoints (its prefix, in its folder), oldest first."""
        return [p for p in list_checkpoints(self.folder) if p.name.startswith(f"{self.save_prefix}_epoch")]

    def latest_checkpoint(self):
        found = self.own_checkpoints()
        return found[-1] if found else None

    def remove_partial_saves(self):
        """Leftovers of checkpoint, metrics.jsonl or config writes that a kill -9 cut short."""
        remove_partial_writes(self.folder)

    def load_state(self, state):
        self.epoch, self.step, self.batches_done = state["epoch"], state["step"], state["batches_done_in_epoch"]
        saved_cfg = yaml.safe_load(state["config"])
        saved_k = saved_cfg["training"].get("grad_accumulation_steps", 1)
        if self.batches_done and saved_k != self.accumulate:
            raise UserError(f"{self.source}: training.grad_accumulation_steps: the checkpoint stopped part way through "
                            f"an epoch with {saved_k} batches per step, which says where to go on from; resume with "
                            f"--set training.grad_accumulation_steps={saved_k} (or from a checkpoint at an epoch's end)")
        for net, section, prefix in (("generator", "training", ""), ("discriminator", "adversarial", "disc_")):
            if net in self.networks and state.get(f"{prefix}optimizer_state_dict"):
                self.load_schedule(net, section, saved_cfg, state[f"{prefix}optimizer_state_dict"],
                                   state[f"{prefix}scheduler_state_dict"])
        self.skipped_updates = state.get("skipped_updates", 0)
        if self.ema is not None and state.get("ema_state_dict"):  # (else the average starts afresh)
            self.ema.module.load_state_dict(state["ema_state_dict"])
            self.ema.n_averaged.fill_(state["ema_updates"])
        for net, scaler_state in state.get("scaler_state_dicts", {}).items():
            if net in self.scalers:  # (a run switched to fp16 starts its scalers afresh)
                self.scalers[net].load_state_dict(scaler_state)
        for net, history in state["loss_history"].items():
            if net in self.loss_history:
                self.loss_history[net] = history
        if "validation_history" in state:
            self.validation_history = state["validation_history"]
        saved_world = state.get("world_size") or len(state["rng_state"]["batch_transforms"])  # or an older file's
        if saved_world != self.placement.world_size:
            raise UserError(f"{self.source}: model.model_checkpoint_filename: the checkpoint was written by "
                            f"{saved_world} process(es), this run has {self.placement.world_size}; resume with "
                            f"--nproc_per_node={saved_world} (or start a new run from its weights)")
        set_rng_state(state["rng_state"])


    def load_schedule(self, net, section, saved_cfg, optimizer_state, scheduler_state):
        """Restore `net`'s optimizer and schedule. Unchanged settings resume exactly. Changed ones
        win over the checkpoint's (`saved_cfg`): new optimizer_args apply to the restored optimizer,
        and a changed learning rate or schedule is rebuilt and advanced to this point of the run."""
        s, saved = self.cfg[section], saved_cfg[section]
        optimizer = self.optimizers[net]
        if s["optimizer"] != saved["optimizer"]:
            self.say(f"{section}.optimizer changed ({saved['optimizer']} -> {s['optimizer']}): the {net}'s optimizer "
                     "starts afresh")
            return
        optimizer.load_state_dict(optimizer_state)
        for group in optimizer.param_groups:
            group.update(s["optimizer_args"])
        now = {f"{section}.{k}": s[k] for k in SCHEDULE_KEYS}
        before = {f"{section}.{k}": saved.get(k) for k in SCHEDULE_KEYS}
        if fills_total_length(s):  # the schedule's length is the run's
            now["training.n_epochs"], before["training.n_epochs"] = self.n_epochs, saved_cfg["training"]["n_epochs"]
        if self.schedule_every_step[net]:  # it counts optimizer steps, which batches per step decides
            now["training.grad_accumulation_steps"] = self.accumulate
            before["training.grad_accumulation_steps"] = saved_cfg["training"].get("grad_accumulation_steps", 1)
        changed = [key for key in now if now[key] != before[key]]
        if not changed:
            self.schedulers[net].load_state_dict(scheduler_state)
            return
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] = s["learning_rate"]
        where = f"{self.source}: {section}"
        self.schedulers[net] = make_scheduler(optimizer, s, self.steps_per_epoch, self.n_epochs, where)
        done = self.epoch * self.steps_per_epoch + self.batches_done if self.schedule_every_step[net] else self.epoch
        with warnings.catch_warnings():  # stepping a schedule without optimizer steps is the point here
            warnings.simplefilter("ignore")
            for _ in range(done):
                if not isinstance(self.schedulers[net], torch.optim.lr_scheduler.ReduceLROnPlateau):
                    self.schedulers[net].step()
        self.say(f"{', '.join(changed)} changed: "
                 f"the {net}'s {s['scheduler']} schedule is rebuilt and advanced {done} "
                 f"{'steps' if self.schedule_every_step[net] else 'epochs'} (learning rate now "
                 f"{optimizer.param_groups[0]['lr']:.4g})")

    def say(self, message):
        self.notes.append(message)  # train.py prints them with the other resume messages


# The settings that shape a network's learning-rate schedule.
SCHEDULE_KEYS = ["learning_rate", "scheduler", "scheduler_args", "scheduler_interval", "learning_rate_step",
                 "learning_rate_gamma"]


def prepare_model(model, train, placement, source):
    """Move the model to its device, with the BatchNorm kind and memory format the config asks for."""
    model.to(placement.device)
    if train["sync_batchnorm"] and placement.world_size > 1:
        if placement.device.type != "cuda":
            raise UserError(f"{source}: training.sync_batchnorm: torch's SyncBatchNorm runs on GPUs only; "
                            "set it to false for CPU processes")
        # in place: the components keep their modules, and the weights their names
        for name, component in model.model_components.items():
            model.model_components[name] = torch.nn.SyncBatchNorm.convert_sync_batchnorm(component)
    if train["channels_last"]:
        model.to(memory_format=torch.channels_last)


def compile_submodels(model, args, where):
    """torch.compile each submodel's forward in place (nn.Module.compile): the flow between
    submodels stays eager Python, and the weights keep their names."""
    for component in model.model_components.values():
        for submodel in component.values():
            try:
                submodel.compile(**args)
            except (TypeError, ValueError, RuntimeError, AssertionError) as e:  # (torch checks some values by assert)
                raise UserError(f"{where}: torch.compile({kwargs_text(args)}) failed: {e}") from None


def fills_total_length(s):
    """Whether make_scheduler gives this schedule the run's length (which then depends on n_epochs)."""
    return "total_steps" in inspect.signature(torch_schedulers()[s["scheduler"]]).parameters and \
        s["scheduler_args"].get("total_steps") is None and s["scheduler_args"].get("epochs") is None


class NetworkLoss(torch.nn.Module):
    """What DDP wraps for one network: that network's components, and a forward that runs the
    loss function it is handed. DDP's gradient hooks then cover exactly this network's
    parameters, whatever else the loss runs: the discriminator scoring the generator's samples,
    or the generator making them without autograd for the discriminator's update, never enters
    the other network's reduction. Every parameter of the network being trained gets a gradient,
    so DDP needs no find_unused_parameters search. The checkpoint saves the model itself, so
    its keys carry no "module." prefix."""

    def __init__(self, components):
        super().__init__()
        self.components = components

    def forward(self, loss_fn, *args):
        return loss_fn(*args)


def wrap_for_ddp(module):
    """DDP over `module` (in the Trainer, a network's NetworkLoss). Buffers are not synchronised
    at every forward pass: Trainer.share_buffers hands rank 0's to all before a validation pass
    or a save, where running statistics are read. (Each process's EMA averages its own buffers;
    rank 0's EMA is saved.)"""
    parameters = inspect.signature(DistributedDataParallel).parameters
    # torch 2.13 renamed broadcast_buffers (which now warns) to forward_sync_buffers
    keyword = "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"
    return DistributedDataParallel(module, **{keyword: False})


def rng_state():
    """The global random number generators, in weights_only-loadable form. (Batch transforms
    draw from seeds fixed by the batch, see dataset.py: they need no state.)"""
    np_state = np.random.get_state()
    return {
        "python": list(random.getstate()[1]),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state):
    random.setstate((3, tuple(state["python"]), None))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

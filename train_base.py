"""The training loop behind train.py: device and DDP setup, optimizers, the adversarial
schedule, progress, checkpoints and resume.

`Trainer` receives a validated config, a built model and a data loader, and owns everything
that changes while training (weights, optimizer and scheduler state, epoch, step, loss
history, RNG). Its state is what a checkpoint holds, so resuming restores all of it.
"""
import inspect
import os
import random
import signal
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import loss
from checkpoint import checkpoint_name, save_checkpoint
from config import checkpoint_dir, to_yaml, torch_optimizers
from errors import UserError, public_functions


def seed_everything(seed):
    """Seed every RNG and ask cuDNN for its deterministic kernels, so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


@dataclass
class Placement:
    """Where this process trains: its device, and its rank among world_size processes."""
    device: torch.device
    rank: int = 0
    world_size: int = 1

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
    if world_size > 1:
        dist.init_process_group("nccl" if gpus else "gloo", device_id=device if gpus else None)
    return Placement(device, rank, world_size)


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


def make_optimizer(params, name, learning_rate, optimizer_args, where):
    try:
        return torch_optimizers()[name](params, lr=learning_rate, **optimizer_args)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {name}(lr={learning_rate}, **{optimizer_args}) failed: {e}") from None


class Trainer:
    def __init__(self, cfg, model, loader, placement, resume_state=None):
        train, adv = cfg["training"], cfg["adversarial"]
        self.cfg, self.model, self.loader, self.placement = cfg, model.to(placement.device), loader, placement
        self.source = cfg["config_path"]
        self.adversarial = adv["enable_adversarial_training"]
        self.loss_fn = public_functions(loss)[cfg["loss"]["loss_fn"]]
        self.loss_args = cfg["loss"]["loss_args"]
        check_training_setup(model, self.adversarial, self.loss_fn, self.source)
        self.networks = ["generator", "discriminator"] if self.adversarial else ["generator"]
        self.params = {net: model.parameters_of(net) for net in self.networks}
        self.optimizers, self.schedulers = {}, {}
        for net, section in (("generator", "training"), ("discriminator", "adversarial")):
            if net in self.networks:
                s = cfg[section]
                self.optimizers[net] = make_optimizer(self.params[net], s["optimizer"], s["learning_rate"],
                                                      s["optimizer_args"], f"{self.source}: {section}")
                self.schedulers[net] = torch.optim.lr_scheduler.StepLR(self.optimizers[net], s["learning_rate_step"],
                                                                       s["learning_rate_gamma"])
        self.update_order = ["discriminator", "generator"] if adv["train_disc_first"] else ["generator", "discriminator"]
        self.iterations = {"generator": adv["n_gen_iterations"], "discriminator": adv["n_disc_iterations"]}
        self.n_epochs, self.log_interval = train["n_epochs"], train["log_interval"]
        self.save_every, self.save_prefix = cfg["saving"]["save_epoch_increment"], cfg["saving"]["save_filename_prefix"]
        self.folder = checkpoint_dir(cfg)
        self.epoch, self.step = 0, 0  # completed epochs, steps
        self.batches_done = 0  # steps of the current epoch (non-zero only in a run stopped part way)
        self.loss_history = {net: {} for net in self.networks}
        self.stop_signal = None
        if resume_state is not None:
            self.load_state(resume_state)
        if placement.world_size > 1:
            for tensor in self.model.state_dict().values():
                dist.broadcast(tensor, 0)  # every process starts from rank 0's weights

    # ---- one step ----
    def train_step(self, batch):
        device = self.placement.device
        inputs, targets = self.model.split_batch(batch)
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True) if targets is not None else None
        if not self.adversarial:
            return {"generator": self.update("generator", self.model(inputs), inputs, targets)}
        terms, outputs = {}, None
        for net in self.update_order:
            for _ in range(self.iterations[net]):
                if outputs is None:  # generated once per generator state, shared by both networks
                    outputs = self.model(inputs)
                terms[net] = self.update(net, outputs, inputs, targets)
                if net == "generator":
                    outputs = None
        return terms

    def update(self, net, outputs, inputs, targets):
        """One optimizer step of `net`; returns its loss terms (detached) plus their total."""
        fake_scores = real_scores = None
        if self.adversarial:
            if net == "discriminator":
                outputs = outputs.detach()
                real_scores = self.model.discriminate(targets, inputs)
            fake_scores = self.model.discriminate(outputs, inputs)
        terms = self.loss_fn(net, outputs, targets, fake_scores, real_scores, **self.loss_args)
        if not terms:
            raise UserError(f"{self.source}: loss.loss_fn {self.loss_fn.__name__} returned no loss terms for the "
                            f"{net}; check loss.loss_args (all weights zero?)")
        total = sum(terms.values())
        optimizer = self.optimizers[net]
        optimizer.zero_grad(set_to_none=True)
        total.backward(inputs=self.params[net])  # the generator's loss needs no discriminator gradients
        if self.placement.world_size > 1:
            average_gradients(self.params[net], self.placement.world_size)
        optimizer.step()
        return {"total": total.detach(), **{k: v.detach() for k, v in terms.items()}}

    # ---- the loop ----
    def fit(self):
        """Train epochs epoch+1 .. n_epochs; Ctrl-C or SIGTERM ends the step, saves `_et`, exits."""
        previous = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        main = self.placement.is_main
        steps_per_epoch = len(self.loader)
        bar = tqdm(total=self.n_epochs * steps_per_epoch, initial=self.step, disable=not main, dynamic_ncols=True,
                   unit="step")
        last = self.save() if self.step == 0 else None  # the initial weights
        try:
            for epoch in range(self.epoch + 1, self.n_epochs + 1):
                bar.set_description(f"epoch {epoch}/{self.n_epochs}")
                if not self.run_epoch(epoch, bar):
                    break
                self.epoch = epoch
                for scheduler in self.schedulers.values():
                    scheduler.step()
                if epoch % self.save_every == 0 or epoch == self.n_epochs:
                    last = self.save()
        finally:
            bar.close()
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
        self.loader.sampler.set_epoch(epoch, skip=self.batches_done * self.loader.batch_size)
        pending = []
        for batch in self.loader:
            pending.append(self.train_step(batch))
            self.step += 1
            self.batches_done += 1
            bar.update()
            if len(pending) == self.log_interval:
                self.record(pending, bar)
                pending = []
            if self.stop_requested(agree=not pending):
                break
        self.record(pending, bar)
        if self.stop_requested(agree=True):
            return False
        self.batches_done = 0
        return True

    def record(self, pending, bar):
        """Move pending per-step losses to loss_history (one device sync per log_interval steps)."""
        if not pending:
            return
        for net in pending[0]:
            names = list(pending[0][net])
            values = torch.stack([torch.stack([step[net][k] for k in names]) for step in pending]).cpu().tolist()
            history = self.loss_history[net]
            for i, name in enumerate(names):
                history.setdefault(name, []).extend(row[i] for row in values)
        bar.set_postfix({f"{net} loss": f"{h['total'][-1]:.4f}" for net, h in self.loss_history.items()},
                        refresh=False)

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
    def state(self, early_stop, batch_transform_states):
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
            "loss_history": self.loss_history,
            "config": to_yaml(self.cfg),
            "architecture": self.model.architecture_text,
            "rng_state": rng_state(batch_transform_states),
        }

    def save(self, early_stop=False):
        """Every process calls this (each adds its batch-transform RNG state); rank 0 writes the file."""
        own = self.loader.dataset.generator.get_state()
        transforms = [own]
        if self.placement.world_size > 1:
            transforms = [None] * self.placement.world_size
            dist.all_gather_object(transforms, own)
        if not self.placement.is_main:
            return None
        state = self.state(early_stop, transforms)
        return save_checkpoint(self.folder / checkpoint_name(self.save_prefix, self.epoch, early_stop), state)

    def load_state(self, state):
        self.optimizers["generator"].load_state_dict(state["optimizer_state_dict"])
        self.schedulers["generator"].load_state_dict(state["scheduler_state_dict"])
        if self.adversarial and state.get("disc_optimizer_state_dict"):
            self.optimizers["discriminator"].load_state_dict(state["disc_optimizer_state_dict"])
            self.schedulers["discriminator"].load_state_dict(state["disc_scheduler_state_dict"])
        self.epoch, self.step, self.batches_done = state["epoch"], state["step"], state["batches_done_in_epoch"]
        for net, history in state["loss_history"].items():
            if net in self.loss_history:
                self.loss_history[net] = history
        saved_world = len(state["rng_state"]["batch_transforms"])
        if saved_world != self.placement.world_size:
            raise UserError(f"{self.source}: model.model_checkpoint_filename: the checkpoint was written by "
                            f"{saved_world} process(es), this run has {self.placement.world_size}; resume with "
                            f"--nproc_per_node={saved_world} (or start a new run from its weights)")
        set_rng_state(state["rng_state"], self.loader, self.placement.rank)


def average_gradients(params, world_size):
    """All-reduce the gradients of `params` in one flat buffer and average them (DDP)."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    for grad, synced in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(synced.view_as(grad))


def rng_state(batch_transform_states):
    """Every random number generator that affects training, in weights_only-loadable form. The
    batch transforms' generator differs between DDP processes: one state per process."""
    np_state = np.random.get_state()
    return {
        "python": list(random.getstate()[1]),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "batch_transforms": batch_transform_states,
    }


def set_rng_state(state, loader, rank):
    random.setstate((3, tuple(state["python"]), None))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    loader.dataset.generator.set_state(state["batch_transforms"][rank])

"""The training loop behind train.py: epochs of steps, what happens at an epoch's end, stopping
and resuming.

`Trainer` receives a validated config, a built model, data loaders (training, and validation
when the dataset holds samples out) and the run whose folder it saves into. It keeps one
`Network` (network.py) per trained network, which owns that network's optimizer, schedule,
scaler, clipping, gradient averaging, EMA and loss history. A step asks `Losses` (step.py) for
each network's loss terms on the batch, in the networks' order, as often and as seldom as each
one's `updates` and `every` say. Around the steps: the logbook (metrics.jsonl, the progress bar,
the non-finite stop), validation, the dashboard's picture (sampling.py), sample metrics, the best
checkpoint, and checkpoints whose contents resume.py writes and reads back.
"""
import dataclasses
import itertools
import signal
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from dataset_base import stream_classes
from engine.config import keep_best
from engine.dashboard import use_tensorboard
from engine.logbook import Logbook, NonFiniteLoss, nonfinite_message
from engine.network import Network, network_specs, step_epoch_schedules, update_order
from engine.placement import compile_submodels, prepare_model, share_buffers
from engine.resume import best_line, keep_if_best, restore, training_state
from engine.runs import Run
from engine.sampling import Sampler
from engine.step import Losses, Stepper
from engine.validation import Validation


class Trainer:
    """Trains a built model on its loaders into a run (see the module's docstring); `fit` is the loop."""

    def __init__(self, cfg, model, loader, placement, resume_state=None, validation_loader=None, run=None,
                 samples=None, resume_path=None):
        train, logging = cfg["training"], cfg["logging"]
        self.cfg, self.model, self.loader, self.placement = cfg, model, loader, placement
        self.source, self.validation_loader, self.run = cfg["config_path"], validation_loader, run or Run.new(cfg)
        self.tensorboard = use_tensorboard(logging["tensorboard"], f"{self.source}: logging")
        prepare_model(model, train, placement, self.source)  # before any optimizer holds its parameters
        self.losses = Losses(model, cfg, placement.device)
        self.accumulate = train["grad_accumulation_steps"]  # loader batches per optimizer step
        self.steps_per_epoch = -(-len(loader) // self.accumulate)
        self.networks = {spec.name: Network(spec, model, cfg, placement, self.steps_per_epoch)
                         for spec in network_specs(cfg, model)}
        self.update_order = [self.networks[name] for name in update_order(cfg, self.networks)]
        self.stepper = Stepper(self.losses, self.update_order, placement, train, self.source)
        if train["compile"]:  # in place, after the EMA's copy: the modules and their state_dict keys stay as they are
            compile_submodels(model, train["compile_args"], f"{self.source}: training.compile_args")
        self.n_epochs, self.log_interval = train["n_epochs"], train["log_interval"]
        self.budget = Budget(self.n_epochs, train["max_steps"], self.steps_per_epoch)
        self.save_every, self.image_every = cfg["saving"]["save_epoch_increment"], logging["image_every"]
        self.epoch, self.step = 0, 0  # completed epochs, steps
        self.batches_done = 0  # steps of the current epoch (non-zero only in a run stopped part way)
        self.saved_step = None  # the step of the newest checkpoint this start wrote
        self.stop = StopSignal(placement)
        self.samples, self.sample_every = samples, cfg["sample_metrics"]["every_epochs"]  # SampleMetrics (rank 0)
        best = keep_best(cfg)  # the best checkpoint so far by saving.keep_best: its value and epoch
        self.best = None if best is None else {"key": best[0], "mode": best[1], "value": None, "epoch": None}
        self.classes = stream_classes(cfg["dataset"], self.source)  # {class_labels stream: class names}
        self.sampler = Sampler(model, self.networks, self.losses, placement, train["batch_size"],
                               (validation_loader or loader).dataset, logging["n_images"], cfg["dataset"], self.source)
        samples_per_step = train["batch_size"] * self.accumulate * placement.world_size  # (a short batch as full)
        self.logbook = Logbook(self.networks, self.losses.watched, placement, samples_per_step,
                              train["on_nonfinite_loss"])
        self.validation = Validation(cfg, model, self.losses, self.networks, placement, validation_loader,
                                     self.update_order[0].name, self.logbook)
        self.notes = []  # what resuming changed, for train.py to show
        if resume_state is not None:
            restore(self, resume_state, resume_path or "the checkpoint")
        # Under DDP every process starts from rank 0's weights (then gradients are averaged: network.py)
        share_buffers(model, placement, parameters=True)

    # ---- one step ----
    def train_step(self, batches):
        """Update every network once on a step's batch(es) (Stepper): ({network: its terms}, {network: lr})."""
        return self.stepper(batches, (self.step, self.epoch, self.batches_done))

    # ---- the loop ----
    def fit(self):
        """Train epochs epoch+1 .. n_epochs, or up to training.max_steps (saving where it stops);
        Ctrl-C or SIGTERM ends the step, saves `_et`, exits. A non-finite loss (on_nonfinite_loss:
        stop) ends training without saving, exit status 3."""
        main = self.placement.is_main
        bar = tqdm(total=self.budget.total_steps, disable=not main, dynamic_ncols=True, unit="step",
                   initial=self.epoch * self.steps_per_epoch + self.batches_done)
        last = None
        try:
            with self.stop:
                if main:  # (run.json records where this start ran, and where it went on from)
                    about = {**self.placement.about(), "resumed_at_step": self.step, "resumed_at_epoch": self.epoch,
                             "total_steps": self.budget.total_steps}
                    self.run.start(self.cfg, self.step, about, self.tensorboard)
                last = self.save() if self.step == 0 else self.run.latest()  # the initial weights
                if self.step == 0 and self.samples is not None:  # where the curves start
                    keep_if_best(self, self.sampler.measure(self.samples, self.run, bar, self.epoch, self.step), bar)
                for epoch in range(self.epoch + 1, self.n_epochs + 1):
                    bar.set_description(f"epoch {epoch}/{self.n_epochs}")
                    if not self.run_epoch(epoch, bar):
                        break
                    self.epoch = epoch
                    last = self.end_epoch(bar) or last
                    if self.budget.out_of_steps(self.step):
                        break
                if self.budget.out_of_steps(self.step) and self.stop.signum is None and self.saved_step != self.step:
                    last = self.save(early_stop=self.batches_done > 0)  # where the step budget ran out
        except NonFiniteLoss as e:
            bar.close()
            if main:
                print(nonfinite_message(e, last), file=sys.stderr)
            raise SystemExit(3) from None
        finally:
            bar.close()
            self.run.close()
        if self.stop.signum is not None:
            last = self.save(early_stop=True)
            if main:
                print(f"stopped by {signal.Signals(self.stop.signum).name}; saved {last}")
            raise SystemExit(128 + self.stop.signum)
        if main:
            print(f"trained to {self.budget.reached(self.epoch, self.step, self.batches_done)}; latest checkpoint: "
                  f"{last}" + best_line(self.best, self.run))
        return last

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
            pending.append((*self.train_step(group if self.accumulate > 1 else group[0]), time.time()))
            self.step += 1
            self.batches_done += 1
            bar.update()
            if len(pending) == self.log_interval:
                self.logbook.record(self.run, bar, pending, epoch, self.step, self.batches_done, waited,
                                    time.perf_counter() - since)
                pending, waited, since = [], 0.0, time.perf_counter()
            if self.stop.requested(agree=not pending) or self.budget.out_of_steps(self.step):
                break
        if pending:
            self.logbook.record(self.run, bar, pending, epoch, self.step, self.batches_done, waited,
                                time.perf_counter() - since)
        part_way = self.budget.out_of_steps(self.step) and self.batches_done < self.steps_per_epoch
        if self.stop.requested(agree=True) or part_way:
            return False  # (stopped, or out of steps part way)
        self.batches_done = 0
        return True

    def end_epoch(self, bar):
        """An epoch's end: validation, sample metrics, the schedules, the dashboard's picture, the
        best and the periodic checkpoints. Returns the checkpoint written, if any."""
        validation = self.validation(self.run, bar, self.step, self.epoch) \
            if self.validation_loader is not None else None
        measured = self.sampler.measure(self.samples, self.run, bar, self.epoch, self.step) \
            if self.sample_every and self.epoch % self.sample_every == 0 else {}
        step_epoch_schedules(self.networks, validation, self.steps_per_epoch, self.placement)
        if self.placement.is_main and self.epoch % self.image_every == 0:
            self.run.log_images(self.epoch, self.step, *self.sampler.sample_outputs(), self.sampler.image_range)
        keep_if_best(self, {f"validation/{name}/{term}": value for name, terms in (validation or {}).items()
                           for term, value in terms.items()} | measured, bar)
        if self.epoch % self.save_every == 0 or self.epoch == self.n_epochs:
            return self.save()
        return None

    @property
    def finished(self):
        return self.budget.finished(self.epoch, self.step)

    def save(self, early_stop=False):
        """Every process calls this; rank 0 writes the checkpoint."""
        share_buffers(self.model, self.placement)
        self.saved_step = self.step
        return self.run.save(training_state(self, early_stop), self.epoch, early_stop) if self.placement.is_main \
            else None


@dataclasses.dataclass
class Budget:
    """How long a run trains: training.n_epochs, cut short by training.max_steps (None: no cut)."""
    n_epochs: int
    max_steps: int | None
    steps_per_epoch: int

    @property
    def total_steps(self):
        return min(self.n_epochs * self.steps_per_epoch, self.max_steps or self.n_epochs * self.steps_per_epoch)

    def out_of_steps(self, step):
        return self.max_steps is not None and step >= self.max_steps

    def finished(self, epoch, step):
        return epoch >= self.n_epochs or self.out_of_steps(step)

    def reached(self, epoch, step, batches_done):
        """Where training stopped, in words."""
        if not self.out_of_steps(step):
            return f"epoch {epoch}"
        part = f" and {batches_done} steps" if batches_done else ""
        return f"step {step} (training.max_steps), epoch {epoch}{part}"


class StopSignal:
    """Ctrl-C or SIGTERM while training (`with` this): the step ends, then training stops; a
    second one stops at once, without saving."""

    def __init__(self, placement):
        self.placement, self.signum, self.previous = placement, None, {}

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def requested(self, agree):
        """Whether to stop after this step. Under DDP every process must stop at the same step (or
        the others would wait forever in the next gradient all-reduce), so they decide together,
        and only when `agree` (every log_interval steps and at the epoch's end) to keep this
        all-reduce and its host sync off most steps."""
        if self.placement.world_size == 1:
            return self.signum is not None
        if not agree:
            return False
        flag = torch.tensor([self.signum or 0], device=self.placement.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signum = int(flag.item()) or None
        return self.signum is not None

"""The training loop behind train.py: the adversarial schedule, validation, progress, stopping
and resuming, plus where this process trains (device and DDP setup).

`Trainer` receives a validated config, a built model, data loaders (training, and validation
when the dataset holds samples out) and the run whose folder it saves into. It keeps one
`Network` (network.py) per trained network, which owns that network's optimizer, schedule,
scaler, clipping, gradient averaging, EMA and loss history. A step asks `Losses` for each
network's loss terms on the batch, in the networks' order, as often and as seldom as each one's
`updates` and `every` say: the flow's own `losses(network, batch, step)` where it writes one,
else the built-in GAN/supervised step. Its state, with the networks', is what a checkpoint
holds, so resuming restores all of it.
"""
import contextlib
import functools
import inspect
import itertools
import operator
import os
import platform
import random
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

import cuda_graphs
import metrics
from cli import resolve_gpus, select_device, targets_are_paired
from config import keep_best, to_yaml
from dashboard import use_tensorboard
from dataset_base import check_same_classes, stream_classes, value_range
from errors import UserError, did_you_mean, kwargs_text
from model_base import inputs_to, run_model, split_inputs
from network import AUTOCAST, Network, Step, autocast, checkpoint_entries, network_specs, network_state, update_order
from preflight import eagerly
from registry import loss_functions
from runs import BEST, Run, first_line
from sample_metrics import weights_of


class Trainer:
    def __init__(self, cfg, model, loader, placement, resume_state=None, validation_loader=None, run=None,
                 samples=None, resume_path=None):
        train = cfg["training"]
        self.cfg, self.model, self.loader, self.placement = cfg, model, loader, placement
        self.source, self.validation_loader = cfg["config_path"], validation_loader
        self.run = run or Run.new(cfg)
        logging = cfg["logging"]
        self.tensorboard = use_tensorboard(logging["tensorboard"], f"{self.source}: logging")
        self.image_every = logging["image_every"]
        prepare_model(model, train, placement, self.source)  # before any optimizer holds its parameters
        self.losses = Losses(model, cfg, placement.device)
        self.accumulate = train["grad_accumulation_steps"]  # loader batches per optimizer step
        self.steps_per_epoch = -(-len(loader) // self.accumulate)
        self.networks = {spec.name: Network(spec, model, cfg, placement, self.steps_per_epoch)
                         for spec in network_specs(cfg, model)}
        self.update_order = [self.networks[name] for name in update_order(cfg, self.networks)]
        self.graphed = None  # training.cuda_graphs: the step as a CUDA graph
        if train["cuda_graphs"]:
            why = cuda_graphs.refusal(train, train["on_nonfinite_loss"], placement,
                                      [net.settings for net in self.update_order])
            if why:
                raise UserError(f"{self.source}: training.cuda_graphs: {why}")
            self.graphed = cuda_graphs.GraphedStep(lambda batch: self.updates([batch]),
                                                   [net.optimizer for net in self.networks.values()],
                                                   f"{self.source}: training")
        if train["compile"]:  # in place, after the EMA's copy: the modules and their state_dict keys stay as they are
            compile_submodels(model, train["compile_args"], f"{self.source}: training.compile_args")
        self.on_nonfinite, self.skipped_updates = train["on_nonfinite_loss"], 0
        self.n_epochs, self.log_interval = train["n_epochs"], train["log_interval"]
        self.save_every = cfg["saving"]["save_epoch_increment"]
        self.epoch, self.step = 0, 0  # completed epochs, steps
        self.batches_done = 0  # steps of the current epoch (non-zero only in a run stopped part way)
        self.validation_steps = []  # the step at each validation (one per epoch)
        self.stop = StopSignal(placement)
        # the generator's inputs whose outputs the dashboard shows every image_every epochs
        self.fixed_inputs = first_inputs(validation_loader or loader, model, logging["n_images"])
        # a flow that draws its own sample picture (sample_rows) gets the fixed samples' every stream
        self.fixed_batch = first_samples((validation_loader or loader).dataset, logging["n_images"]) \
            if callable(getattr(model, "sample_rows", None)) else None
        # samples per optimizer step, over all processes (a short last batch counts as a full one)
        self.samples_per_step = train["batch_size"] * self.accumulate * placement.world_size
        # sample_metrics.SampleMetrics on fixed inputs, measured every sample_every epochs (rank 0)
        self.samples, self.sample_every = samples, cfg["sample_metrics"]["every_epochs"]
        best = keep_best(cfg)  # the best checkpoint so far by saving.keep_best: its value and epoch
        self.best = None if best is None else {"key": best[0], "mode": best[1], "value": None, "epoch": None}
        self.classes = stream_classes(cfg["dataset"], self.source)  # {class_labels stream: class names}
        # validation's accuracy, PSNR and SSIM (metrics.py) for outputs paired with their targets,
        # PSNR's range the target stream's (held-out targets only for a guess, where none is declared)
        self.paired = targets_are_paired(model, self.losses.adversarial)
        self.validation_range = None
        if validation_loader is not None:
            targets = model.split_batch(first_samples(validation_loader.dataset, 256))[1]
            if targets is not None and targets.dim() > 1:  # (images; class labels need no range)
                self.validation_range = value_range(cfg["dataset"], model.target_key, targets)
        # what the dashboard shows the outputs on: the range the target stream declares, if it does
        declared = value_range(cfg["dataset"], model.target_key) if model.target_key is not None else None
        self.image_range = (declared.low, declared.high) if declared is not None and declared.declared else None
        self.notes = []  # what resuming changed, for train.py to show
        if resume_state is not None:
            self.load_state(resume_state, resume_path or "the checkpoint")
        # Under DDP every process starts from rank 0's weights and buffers; from then on each
        # network's gradients are averaged at each update (Network.average_gradients).
        self.share_buffers(parameters=True)

    # ---- one step ----
    def train_step(self, batches):
        """Update the networks once on a batch, or on a list of micro-batches whose gradients are
        summed (training.grad_accumulation_steps): each network `updates` times in a row, on the
        steps its `every` picks. Returns ({network: its loss terms, averaged over the
        micro-batches}, {network: lr})."""
        micro = [self.losses.to_device(b) for b in (batches if isinstance(batches, list) else [batches])]
        lrs = {name: net.lr for name, net in self.networks.items()}
        terms = self.graphed(micro[0]) if self.graphed is not None else self.updates(micro)
        for net in self.networks.values():
            net.step_schedule(epoch_end=False)
        return terms, lrs

    def updates(self, micro, every_network=False):
        """Every update of one step on its micro-batches (what training.cuda_graphs records; with
        `every_network`, as the trial step runs it, also those of networks whose turn it is not):
        {network: its loss terms}. Each micro-batch has a `Step` that its updates share: what an
        earlier update made for it (the generator's samples) is there for the later ones."""
        steps = [Step(self.step, self.epoch + 1, i, len(micro)) for i in range(len(micro))]
        terms = {}
        for net in self.update_order:
            if self.step % net.every and not every_network:
                continue
            for _ in range(net.iterations):
                terms[net.name] = self.update(net, micro, steps)
        return terms

    def update(self, net, micro, steps):
        """One optimizer step of `net` on the micro-batches `micro` ({stream: tensor} each)."""
        def loss(i):
            return self.losses(net.name, micro[i], steps[i])

        terms, made = net.update(loss, [batch_size(batch) for batch in micro], self.on_nonfinite == "skip")
        if not made:
            self.skipped_updates += 1
            if self.placement.is_main:
                where = self.where_nonfinite(self.step + 1, self.batches_done + 1, net.name,
                                             {k: v.item() for k, v in terms.items()})
                tqdm.write(f"skipped the {net.name} update at {where} (training.on_nonfinite_loss: skip)")
        return terms

    def where_nonfinite(self, step, epoch_step, net, terms):
        values = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
        return f"epoch {self.epoch + 1}, step {step} ({epoch_step} of the epoch): {net} loss {values}"

    def first_nonfinite(self, totals):
        """The index of the first of the pending steps with a NaN or inf loss on any process
        (`totals`: [step][network] total loss, on the CPU), or None. on_nonfinite_loss: stop looks
        here, once per log_interval steps, rather than in every update: the steps never wait for
        the device, and the few after a bad one change only weights that are never saved."""
        bad = next((i for i, row in enumerate(totals) if not all(map(np.isfinite, row))), len(totals))
        if self.placement.world_size > 1:  # the first on any process, so that all stop at the same step
            first = torch.tensor([bad], device=self.placement.device)
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
            bad = int(first.item())
        return bad if bad < len(totals) else None

    # ---- the loop ----
    def fit(self):
        """Train epochs epoch+1 .. n_epochs; Ctrl-C or SIGTERM ends the step, saves `_et`, exits.
        A non-finite loss (on_nonfinite_loss: stop) ends training without saving, exit status 3."""
        main = self.placement.is_main
        bar = tqdm(total=self.n_epochs * self.steps_per_epoch, disable=not main, dynamic_ncols=True, unit="step",
                   initial=self.epoch * self.steps_per_epoch + self.batches_done)
        try:
            with self.stop:
                if main:
                    self.run.start(self.cfg, self.step, self.about(), self.tensorboard)
                last = self.save() if self.step == 0 else self.run.latest()  # the initial weights
                if self.step == 0 and self.samples is not None:  # where the curves start
                    self.keep_if_best(self.measure_samples(bar), bar)
                for epoch in range(self.epoch + 1, self.n_epochs + 1):
                    bar.set_description(f"epoch {epoch}/{self.n_epochs}")
                    if not self.run_epoch(epoch, bar):
                        break
                    self.epoch = epoch
                    validation = self.validate(bar) if self.validation_loader is not None else None
                    measured = self.measure_samples(bar) if self.sample_every and epoch % self.sample_every == 0 else {}
                    self.step_epoch_schedules(validation)
                    if main and epoch % self.image_every == 0:
                        self.run.log_images(epoch, self.step, *self.sample_outputs(), self.image_range)
                    self.keep_if_best({f"validation/{name}/{term}": value for name, terms in (validation or {}).items()
                                       for term, value in terms.items()} | measured, bar)
                    if epoch % self.save_every == 0 or epoch == self.n_epochs:
                        last = self.save()
        except NonFiniteLoss as e:
            bar.close()
            if main:
                kept = f"The last checkpoint, {last}, is untouched." if last else \
                    "No checkpoint of this run was written."
                print(f"error: {e}\n{kept} To skip such updates instead, set training.on_nonfinite_loss: skip; a lower "
                      "learning rate often helps.", file=sys.stderr)
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
            print(f"trained to epoch {self.epoch}; latest checkpoint: {last}")
            if self.best and self.best["epoch"] is not None:
                print(f"best checkpoint: {self.run.folder / BEST.format(prefix=self.run.prefix)} (epoch "
                      f"{self.best['epoch']}, {self.best['key']} {self.best['value']:.6g})")
        return last

    def about(self):
        """What run.json records of this start, beside the command line and versions."""
        device = self.placement.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        return {"device": str(device), "device_name": name, "world_size": self.placement.world_size,
                "resumed_at_step": self.step, "resumed_at_epoch": self.epoch}

    @torch.no_grad()
    def measure_samples(self, bar):
        """The sample metrics (sample_metrics section) of the generator, with its EMA weights when
        it keeps them, on the fixed sample inputs; logged as sample/<key> and shown. Rank 0 alone
        measures: the other processes go on to the next collective (the next step's gradient
        all-reduce) and wait there for it."""
        if not self.placement.is_main:
            return {}
        outputs = self.generate(self.samples.inputs, use_ema=True)
        measured = self.samples(outputs, f"{self.source}: sample_metrics")
        values = {f"sample/{key}": value for key, value in measured.items()}
        self.run.log([{"epoch": self.epoch, "step": self.step, **values}])
        bar.write(f"epoch {self.epoch}: " + ", ".join(f"{key.removeprefix('sample/')} {value:.4g}"
                                                       for key, value in values.items())
                  + f" ({len(outputs)} samples, {self.samples.features.name})")
        return values

    def keep_if_best(self, values, bar):
        """Save the best checkpoint when saving.keep_best's key, among this epoch's `values`
        ({metrics.jsonl key: value}), beats the best so far (rank 0 writes it)."""
        value = values.get(self.best["key"]) if self.best else None
        if value is None or not np.isfinite(value):
            return
        best, better = self.best["value"], operator.lt if self.best["mode"] == "min" else operator.gt
        if best is not None and not better(value, best):
            return
        self.best |= {"value": value, "epoch": self.epoch}
        if self.placement.is_main:
            path = self.run.save_best(self.state(early_stop=False))
            bar.write(f"epoch {self.epoch}: best {self.best['key']} so far ({value:.6g}): saved {path.name}")

    def sample_outputs(self):
        """What the dashboard shows at an epoch's end: (images, row names). The model's outputs on
        the fixed inputs (row names None); or, from a flow that draws its own picture, the rows its
        `sample_rows(batch)` gives ({row name: images}, e.g. one per class), stacked."""
        if self.fixed_batch is None:
            return self.generate(self.fixed_inputs), None
        with self.inference():
            rows = self.model.sample_rows(self.losses.to_device(self.fixed_batch))
        return torch.cat([images.float().cpu() for images in rows.values()]), list(rows)

    def generate(self, inputs, use_ema=False):
        """The model's outputs (its forward, the inference path) for `inputs`, batch_size at a
        time, on the CPU (see inference)."""
        device, batch = self.placement.device, self.cfg["training"]["batch_size"]
        with self.inference(use_ema):
            return torch.cat([self.losses.forward(inputs_to(x, device)).float().cpu()
                              for x in split_inputs(inputs, batch)])

    @contextlib.contextmanager
    def inference(self, use_ema=False):
        """The model in eval mode, without autograd and without drawing from training's random
        numbers; with `use_ema`, with the moving averages of the networks' weights where they keep
        them. Compiled submodels run eagerly: eval mode would otherwise compile them a second time."""
        device = self.placement.device
        self.model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng([device] if device.type == "cuda" else []), eagerly(), \
                    contextlib.ExitStack() as averaged:
                for net in self.networks.values():
                    if use_ema and net.ema is not None:
                        averaged.enter_context(weights_of(net.module, net.ema.module.state_dict()))
                yield
        finally:
            self.model.train()

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
            pending.append((*self.train_step(group if self.accumulate > 1 else group[0]), time.time()))
            self.step += 1
            self.batches_done += 1
            bar.update()
            if len(pending) == self.log_interval:
                self.record(pending, epoch, bar, waited, time.perf_counter() - since)
                pending, waited, since = [], 0.0, time.perf_counter()
            if self.stop.requested(agree=not pending):
                break
        if pending:
            self.record(pending, epoch, bar, waited, time.perf_counter() - since)
        if self.stop.requested(agree=True):
            return False
        self.batches_done = 0
        return True

    def step_epoch_schedules(self, validation=None):
        """Advance the per-epoch schedules (`validation`: this epoch's validation losses, if any)."""
        for name, net in self.networks.items():
            net.step_schedule(epoch_end=True, plateau_loss=functools.partial(self.plateau_loss, name, validation))

    def plateau_loss(self, name, validation):
        """What ReduceLROnPlateau follows: the validation loss when there is one, else the mean
        total loss over the epoch just trained (over all DDP processes)."""
        if validation:
            return validation[name]["total"]
        net = self.networks[name]
        history = net.loss_history["total"][-max(1, self.steps_per_epoch // net.every):]
        mean = torch.tensor(float(np.mean(history)), device=self.placement.device)
        if self.placement.world_size > 1:
            dist.all_reduce(mean)
            mean /= self.placement.world_size
        return mean.item()

    def validate(self, bar):
        """Each network's mean loss terms over the held-out samples, kept in its
        validation_history and in metrics.jsonl, and shown."""
        self.share_buffers()
        means, quality = self.validation_of(self.validation_loader)
        means |= {(self.quality_network, name): value for name, value in quality.items()}  # beside its loss terms
        result = {name: {} for name in self.networks}
        for (name, term), mean in means.items():
            result[name][term] = mean
            self.networks[name].validation_history.setdefault(term, []).append(mean)
        self.validation_steps.append(self.step)
        self.run.log([{"epoch": self.epoch, "step": self.step,
                       **{f"validation/{name}/{term}": v for (name, term), v in means.items()}}])
        if self.placement.is_main:
            bar.write(f"epoch {self.epoch}: validation loss " + ", ".join(
                f"{self.shown_name(name)}{terms['total']:.4f}" for name, terms in result.items())
                + "".join(f", {name} {value:.4g}" for name, value in quality.items()))
        return result

    @property
    def quality_network(self):
        """The network whose validation rows carry the outputs' metrics (validation/<it>/psnr, ...):
        the generator, or the first network of a flow's own step that has none by that name."""
        return "generator" if "generator" in self.networks else self.update_order[0].name

    def validation_of(self, batches):
        """({(network, term): mean loss}, {metric: value}) over `batches` (the validation loader,
        or the trial step's one batch), over every process."""
        return validation_means(self.losses, batches, self.networks, self.placement, self.paired,
                                self.validation_range, self.step, self.epoch)

    def shown_name(self, name):
        """How the progress bar names a network: a GAN's two by role ("generator "), a lone one
        not at all, since a classifier or a denoiser is no generator."""
        return f"{name} " if len(self.networks) > 1 else ""

    def record(self, pending, epoch, bar, waited, elapsed):
        """Move pending per-step losses to the networks' loss_history and to metrics.jsonl (one
        device sync per log_interval steps), and show the latest losses and the share of the
        `elapsed` seconds of these steps spent waiting for data (`waited`). A step holds the terms
        of the networks it updated, and each the terms its loss gave at that step."""
        first_step = self.step - len(pending) + 1
        speed = round(self.samples_per_step * len(pending) / elapsed, 1)  # the same for each of these steps
        keys = [(i, name, term) for i, (found, _, _) in enumerate(pending) for name, terms in found.items()
                for term in terms]
        values = torch.stack([pending[i][0][name][term] for i, name, term in keys]).cpu().tolist() if keys else []
        steps = [{} for _ in pending]  # [step] {network: {term: value}} ('total' first)
        for (i, name, term), value in zip(keys, values):
            steps[i].setdefault(name, {})[term] = value
        bad = self.first_nonfinite([[terms["total"] for terms in found.values()] for found in steps]) \
            if self.on_nonfinite == "stop" else None
        kept = len(pending) if bad is None else bad  # (the steps before a bad one are kept)
        rows = [{"epoch": epoch, "step": first_step + i, "time": round(stamp, 3), "samples_per_s": speed,
                 "data_wait": round(waited / elapsed, 4)} for i, (_, _, stamp) in enumerate(pending[:kept])]
        for row, found, (_, lrs, _) in zip(rows, steps, pending):
            for name, terms in found.items():
                history = self.networks[name].loss_history
                for term, value in terms.items():
                    history.setdefault(term, []).append(value)
                    row[f"{name}/{term}"] = value
                row[f"{name}/lr"] = lrs[name]
        self.run.log(rows)
        if bad is not None:
            net, terms = next((name, terms) for name, terms in steps[bad].items() if not np.isfinite(terms["total"]))
            epoch_step = self.batches_done - len(pending) + 1 + bad
            raise NonFiniteLoss("non-finite loss at " + self.where_nonfinite(first_step + bad, epoch_step, net, terms))
        shown = {f"{self.shown_name(name)}loss": f"{net.loss_history['total'][-1]:.4f}"
                 for name, net in self.networks.items() if net.loss_history.get("total")}
        shown |= {f"{self.shown_name(name)}{value}": f"{self.networks[name].loss_history[value][-1]:.4g}"
                  for name, values in self.losses.watched.items() for value in values}  # (a flow's watched values)
        bar.set_postfix({**shown, "data wait": f"{waited / elapsed:.0%}"}, refresh=False)

    # ---- checkpoints ----
    def state(self, early_stop):
        return {"model_state_dict": self.model.state_dict(), **checkpoint_entries(self.networks),
                "epoch": self.epoch, "step": self.step, "batches_done_in_epoch": self.batches_done,
                "early_stop": early_stop, "skipped_updates": self.skipped_updates,
                "validation_history": self.validation_history, "split": split_record(self.cfg, self.loader),
                "world_size": self.placement.world_size, "config": to_yaml(self.cfg), "best": self.best,
                "classes": self.classes,
                "architecture": self.model.architecture_text, "rng_state": rng_state()}

    @property
    def validation_history(self):
        """As checkpoints keep it: {"step": [the step of each validation], network: {term: values}}."""
        return {"step": self.validation_steps, **{name: net.validation_history for name, net in self.networks.items()}}

    def load_state(self, state, path):
        """Go on from a checkpoint's training state (its weights are loaded already). Its layout was
        checked (runs.check_checkpoint); what is inside an optimizer's, scheduler's or random
        generator's state is torch's to read, and what it raises means a damaged file."""
        try:
            self.restore(state)
        except UserError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            raise UserError(f"{path}: its training state does not load ({type(e).__name__}: {first_line(e)}); the "
                            "file is damaged or not this pipeline's: resume from an earlier checkpoint") from None

    def restore(self, state):
        saved_cfg = yaml.safe_load(state["config"])
        if not isinstance(saved_cfg, dict) or not all(isinstance(saved_cfg.get(k), dict) for k in ("training",
                                                                                                  "adversarial")):
            raise ValueError("the config it keeps is not a training config")
        check_resumable(state, saved_cfg, self.accumulate, self.placement.world_size, self.source)
        self.epoch, self.step, self.batches_done = state["epoch"], state["step"], state["batches_done_in_epoch"]
        steps_done = self.epoch * self.steps_per_epoch + self.batches_done
        for name, net in self.networks.items():
            note = net.load_state_dict(network_state(state, name), saved_cfg, steps_done, self.epoch)
            if note:
                self.notes.append(note)
        check_same_classes(state.get("classes"), self.classes, self.cfg["dataset"], "the checkpoint", self.source)
        self.skipped_updates = state.get("skipped_updates", 0)
        self.validation_steps = state.get("validation_history", {}).get("step", [])
        saved_best = state.get("best")  # the best so far, if it was judged as now
        if self.best and saved_best:
            now, then = (self.best["key"], self.best["mode"]), (saved_best["key"], saved_best["mode"])
            if now == then:
                self.best = dict(saved_best)
            else:
                self.notes.append(f"saving.keep_best: now {now[0]} ({now[1]}), was {then[0]} ({then[1]}): the best "
                                  "is judged afresh")
        set_rng_state(state["rng_state"])

    def share_buffers(self, parameters=False):
        """Rank 0's buffers (BatchNorm running statistics, a flow's own) to every process, and its
        weights with `parameters` (at the start). Gradients are averaged, so the weights agree,
        but each process updates buffers from its own shard: validation and checkpoints use one
        set, as DDP's broadcast_buffers does."""
        if self.placement.world_size > 1:
            for tensor in [*self.model.parameters(), *self.model.buffers()] if parameters else self.model.buffers():
                dist.broadcast(tensor.data, 0)

    def save(self, early_stop=False):
        """Every process calls this; rank 0 writes the checkpoint."""
        self.share_buffers()
        if not self.placement.is_main:
            return None
        return self.run.save(self.state(early_stop), self.epoch, early_stop)


class Losses:
    """Each network's loss terms on a batch, under its precision: the flow's own step (its
    `losses(network, batch, step)` method, docs/training.md) where it writes one, else the
    built-in step: the model's forward pass, the discriminator's scores and the config's loss
    function (loss.py)."""

    def __init__(self, model, cfg, device):
        self.model, self.source, self.device = model, cfg["config_path"], device
        self.adversarial = cfg["adversarial"]["enable_adversarial_training"]
        self.own_step = model.writes_own_step
        flow, loss_fn = type(model).__name__, cfg["loss"]["loss_fn"]
        if self.own_step:
            if loss_fn is not None:
                raise UserError(f"{self.source}: loss.loss_fn: the flow {flow} writes its own step (its losses "
                                "method), which gives every loss term; set loss_fn to null and its settings in "
                                "loss.loss_args")
            model.loss_args = flow_loss_args(model, cfg["loss"]["loss_args"], self.source)
            self.fn, self.args, self.wants_discriminator = None, {}, False
        else:
            if loss_fn is None:
                raise UserError(f"{self.source}: loss.loss_fn: required: the flow {flow} has no losses method of its "
                                "own, so the built-in step needs a loss function of loss.py (e.g. "
                                "weighted_reconstruction_loss, or example_gan_loss with adversarial training)")
            if cfg["networks"]:
                raise UserError(f"{self.source}: networks: the networks section is for a flow that writes its own "
                                f"step (a losses method), and {flow} has none; leave the section out")
            self.fn, self.args = loss_functions()[loss_fn], cfg["loss"]["loss_args"]
            check_training_setup(model, self.adversarial, self.fn, self.source)
            # A loss that asks for the discriminator (a penalty on its gradient) gets a callable.
            self.wants_discriminator = "discriminator" in inspect.signature(self.fn).parameters
        # Inference passes (validation, the dashboard) under the run's precision; updates under each network's.
        self.dtype = AUTOCAST[cfg["training"]["precision"]]
        self.channels_last = cfg["training"]["channels_last"]
        self.watched = {}  # {network: names of the values its flow logs beside its terms}

    @property
    def what(self):
        """What gives the loss terms, as messages name it."""
        return f"{type(self.model).__name__}.losses" if self.own_step else f"loss.loss_fn {self.fn.__name__}"

    def __call__(self, net, batch, step):
        """(total, terms) of network `net` on one (micro-)batch ({stream: tensor}) in the step
        `step` (a Step): the total is what trains it, the sum of its terms; the terms, for the
        logs, also hold the values a flow's losses returns to watch beside them."""
        if not self.own_step:
            terms = self.builtin(net, batch, step)
            return functools.reduce(operator.add, terms.values()), terms  # (sum() would add a 0 first)
        found = self.model.losses(net, batch, step)
        terms, watched = found if isinstance(found, tuple) else (found, None)
        total = functools.reduce(operator.add, terms.values())
        if not watched:
            return total, terms
        if net not in self.watched:
            self.watched[net] = list(watched)
        return total, terms | {name: torch.as_tensor(value, device=total.device).detach()
                               for name, value in watched.items()}

    def builtin(self, net, batch, step):
        """The built-in step's terms for `net`. With one micro-batch the generator's outputs are
        made once per generator state and shared by the updates until the generator's own update
        changes them (step["outputs"]); with several, each update makes its own, one micro-batch
        at a time, so that only one micro-batch's activations are held at once."""
        inputs, targets = self.model.split_batch(batch)
        outputs = step.get("outputs")
        if outputs is None:
            share = step.micro_batches == 1
            with torch.set_grad_enabled(share or net == "generator"):  # the discriminator's terms detach it
                outputs = run_model(self.model, inputs)
            if share:
                step["outputs"] = outputs
        if net == "generator" and step.training:
            step.pop("outputs", None)
        return self.terms(net, outputs, inputs, targets)

    def terms(self, net, outputs, inputs, targets):
        """The loss function's terms for `net`: in adversarial training with the discriminator's
        scores of the generated samples (detached for its own update) and, for the
        discriminator's, of the real ones."""
        fake_scores = real_scores = None
        extra = {}
        if self.adversarial:
            if net == "discriminator":
                outputs = outputs.detach()
                real_scores = self.model.discriminate(targets, inputs)
            fake_scores = self.model.discriminate(outputs, inputs)
            if self.wants_discriminator:
                extra["discriminator"] = lambda samples: self.model.discriminate(samples, inputs)
        terms = self.fn(net, outputs, targets, fake_scores, real_scores, **self.args, **extra)
        if not terms:
            raise UserError(f"{self.source}: loss.loss_fn {self.fn.__name__} returned no loss terms for the "
                            f"{net}; check loss.loss_args (all weights zero?)")
        return terms

    def to_device(self, batch):
        """The batch ({stream: tensor}) on this process's device; the model's inputs in channels_last
        memory format where training.channels_last asks for it."""
        batch = {name: x.to(self.device, non_blocking=True) for name, x in batch.items()}
        if self.channels_last:
            for name in self.model.input_keys:
                if batch[name].dim() == 4:
                    batch[name] = batch[name].contiguous(memory_format=torch.channels_last)
        return batch

    def forward(self, inputs):
        """The model's inference path (forward) on `inputs`, under the run's precision."""
        with self.autocast():
            return run_model(self.model, inputs)

    def autocast(self):
        return autocast(self.device.type, self.dtype)


def flow_loss_args(model, args, source):
    """loss.loss_args for a flow's own step: the flow's class attribute `loss_args` ({name: default})
    updated by the config's, each of the flow's names only (so that a typo is an error, not a
    default silently kept) and of its default's kind."""
    defaults, flow = dict(getattr(type(model), "loss_args", None) or {}), type(model).__name__
    for name, value in args.items():
        if name not in defaults:
            valid = ", ".join(defaults) or "none (the flow declares no loss_args)"
            raise UserError(f"{source}: loss.loss_args.{name}: not a setting of the flow {flow}'s loss_args"
                            f"{did_you_mean(name, list(defaults))}; valid: {valid}")
        default = defaults[name]
        number = isinstance(default, (int, float)) and not isinstance(default, bool)
        if default is not None and not (isinstance(value, type(default)) or number and isinstance(value, (int, float))
                                        and not isinstance(value, bool)):
            raise UserError(f"{source}: loss.loss_args.{name}: {value!r} is not of the kind of {flow}'s default, "
                            f"{default!r}")
    return defaults | args


def batch_size(batch):
    """The number of samples in a batch ({stream: tensor}, every stream as long)."""
    return len(next(iter(batch.values())))


class NonFiniteLoss(Exception):
    """A loss turned NaN or infinite (training.on_nonfinite_loss: stop)."""


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


def validation_means(losses, loader, networks, placement, paired, value_range, step_number=0, epoch=0):
    """({(network, term): mean over the held-out samples of every process}, {metric: value} of
    the model's outputs against their targets, metrics.py's, images' on the targets'
    `value_range` (dataset_base.ValueRange; none where it is not known)), in eval mode, each
    network's terms under its precision (`networks`: {name: Network}). No autograd, unless a
    loss term may need it (a loss function that penalises the discriminator's gradient, as
    WGAN-GP's; a flow's own step); and the random numbers the terms draw do not shift training's."""
    model = losses.model
    model.eval()
    sums, count, quality, kind = {}, 0, {}, None
    devices = [placement.device] if placement.device.type == "cuda" else []
    with torch.set_grad_enabled(losses.wants_discriminator or losses.own_step), torch.random.fork_rng(devices):
        for batch in loader:
            batch = losses.to_device(batch)
            inputs, targets = model.split_batch(batch)
            step = Step(step_number, epoch, training=False)
            outputs = None
            if not losses.own_step or targets is not None:
                outputs = step["outputs"] = losses.forward(inputs)  # (the built-in step's terms reuse them)
            for name, net in networks.items():
                with net.autocast():
                    total, terms = losses(name, batch, step)
                for term, value in {"total": total, **terms}.items():
                    sums[name, term] = sums.get((name, term), 0) + value.detach().float() * batch_size(batch)
            if outputs is not None:
                kind = metrics.kind_of(outputs.shape[1:], targets, paired)
                measured = metrics.names_of(kind, outputs.shape[1:], value_range)
                for metric, value in (metrics.batch_sums(kind, outputs, targets, value_range) if measured
                                      else {}).items():
                    quality[metric] = quality.get(metric, 0) + value
            count += batch_size(batch)
    model.train()
    totals = torch.stack([*sums.values(), *quality.values(), torch.tensor(float(count), device=placement.device)])
    if placement.world_size > 1:
        dist.all_reduce(totals)
    totals = totals.tolist()
    means = {key: value / totals[-1] for key, value in zip(sums, totals)}
    return means, metrics.finish(dict(zip(quality, totals[len(sums):-1])), value_range) if quality else {}


def check_resumable(state, saved_cfg, accumulate, world_size, source):
    """A checkpoint stopped part way through an epoch resumes only with the batches per step it
    had, and any checkpoint only with the number of processes that wrote it."""
    saved_k = saved_cfg["training"].get("grad_accumulation_steps", 1)
    if state["batches_done_in_epoch"] and saved_k != accumulate:
        raise UserError(f"{source}: training.grad_accumulation_steps: the checkpoint stopped part way through "
                        f"an epoch with {saved_k} batches per step, which says where to go on from; resume with "
                        f"--set training.grad_accumulation_steps={saved_k} (or from a checkpoint at an epoch's end)")
    saved_world = state.get("world_size") or len(state["rng_state"]["batch_transforms"])  # or an older file's
    if saved_world != world_size:
        raise UserError(f"{source}: model.model_checkpoint_filename: the checkpoint was written by "
                        f"{saved_world} process(es), this run has {world_size}; resume with "
                        f"--nproc_per_node={saved_world} (or start a new run from its weights)")


def split_record(cfg, loader):
    """How the run split its samples, for evaluate.py to find the held-out ones again."""
    data = cfg["dataset"]
    return {"n_samples": len(loader.dataset.streams[data["data_len_key"]]),
            "validation_fraction": data["validation_fraction"], "split_seed": data["split_seed"],
            "batch_size": cfg["training"]["batch_size"]}  # of the validation batches


def first_samples(dataset, n):
    """A batch of the dataset's first `n` samples (fewer if it has fewer), in its own order (not
    the shuffled one) and made as its batches are made, without drawing from the run's random
    numbers: the same samples at every epoch and in every run of a config."""
    return dataset.__getitems__(((0,), torch.arange(min(n, len(dataset)))))


def first_inputs(loader, model, n):
    """The model's inputs of the first `n` samples of the loader's dataset (see first_samples)."""
    return model.split_batch(first_samples(loader.dataset, n))[0]


# Layers whose output is bounded: a discriminator ending on one cannot give the raw scores that
# the GAN losses of loss.py take (bce_gan_loss applies the sigmoid itself).
BOUNDING = (torch.nn.Sigmoid, torch.nn.Hardsigmoid, torch.nn.Tanh, torch.nn.Hardtanh, torch.nn.Softsign,
            torch.nn.Softmax, torch.nn.Softmin, torch.nn.LogSoftmax, torch.nn.LogSigmoid)


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
    if adversarial and not getattr(loss_fn, "takes_probabilities", False) and not model.bounded_scores:
        check_raw_scores(model, loss_fn, source)


def check_raw_scores(model, loss_fn, source):
    """The discriminator does not squash its scores before a loss that squashes them itself: a
    DCGAN ported with its final Sigmoid and bce_gan_loss trains (exit 0) with the sigmoid applied
    twice, and its discriminator's loss stays near 1.09."""
    submodel, index, name, layer = model.last_layer("discriminator")
    if isinstance(layer, BOUNDING):
        kind = type(layer).__name__
        raise UserError(
            f"{model.architecture_path}: {submodel}.layers[{index}] ({name}, {kind}) bounds the discriminator's "
            f"scores, but loss.loss_fn {loss_fn.__name__} ({source}) takes raw scores (logits) and would squash "
            f"them again, so the discriminator would barely learn. Drop the {kind} layer (bce_gan_loss applies "
            "the sigmoid itself, in a numerically stable form), or use a loss that takes probabilities (a loss.py "
            "function marked `takes_probabilities = True`); if the bound is meant, set `bounded_scores = True` "
            f"in the flow class {type(model).__name__}")


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


# ---- where this process trains ----
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


def setup_placement(gpus, source):
    """The device from `training.gpus`; under torchrun, one process per GPU (or CPU process)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    where = f"{source}: training.gpus"
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    gpus = resolve_gpus(gpus, local_world_size)
    select_device(gpus, where)  # are there GPUs at all?
    if gpus and local_world_size != len(gpus):
        raise UserError(f"{where}: {len(gpus)} GPUs need one process each, but {local_world_size} "
                        f"{'was' if local_world_size == 1 else 'were'} started; run torchrun --standalone --nnodes=1 "
                        f"--nproc_per_node={len(gpus)} train.py -t {source}")
    device = select_device(gpus, where, local_rank)  # the GPU this process owns
    if gpus:
        torch.cuda.set_device(device)
    # Under torchrun a single process joins a process group too, so that --nproc_per_node=1
    # rehearses a multi-GPU run: NCCL, the gradient all-reduces and all.
    distributed = world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if distributed:
        dist.init_process_group("nccl" if gpus else "gloo", device_id=device if gpus else None)
    return Placement(device, rank, world_size, distributed)


def set_num_threads(num_threads, placement):
    """torch's CPU threads for this process: training.num_threads, or torch's default (one per
    core) shared out among the processes of a multi-process CPU run, which would otherwise each
    start one per core and slow one another down."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", placement.world_size))
    if num_threads is None and placement.device.type == "cpu" and local > 1:
        num_threads = max(1, torch.get_num_threads() // local)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    return torch.get_num_threads()


def seed_everything(seed):
    """Seed every RNG and ask cuDNN for its deterministic kernels, so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


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

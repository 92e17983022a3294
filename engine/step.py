"""A training step. `Losses` is its math: each network's loss terms on a batch, given by a flow
that writes its own step (its `losses(network, batch, step)` method, docs/training.md), or else by
the built-in GAN/supervised step, from the model's forward pass, the discriminator's scores and
the config's loss function (loss.py). `Stepper` is its order: which network updates when, and how
often. What one update does with its terms (backward, averaging, clipping, the optimizer, the
EMA) is the network's (network.py)."""
import functools
import inspect
import operator

import torch
from tqdm import tqdm

from engine import cuda_graphs
from engine.errors import UserError, did_you_mean
from engine.logbook import where_nonfinite
from engine.model_base import run_model
from engine.network import AUTOCAST, Step, autocast
from engine.registry import loss_functions


class Stepper:
    """One training step: each network's updates, in `order` (Network objects), as often and as
    seldom as its `updates` and `every` say, on a batch or on a step's micro-batches; as a CUDA
    graph with training.cuda_graphs. `at` is where the step stands: (steps done, epochs done,
    steps done in this epoch)."""

    def __init__(self, losses, order, placement, train, source):
        self.losses, self.order, self.placement = losses, order, placement
        self.on_nonfinite, self.skipped_updates = train["on_nonfinite_loss"], 0
        self.at = (0, 0, 0)
        self.graphed = cuda_graphs.graphed_step(train, placement, order, lambda batch: self.updates([batch], self.at),
                                                source)

    def __call__(self, batches, at):
        """Update the networks once on a batch, or on a list of micro-batches whose gradients are
        summed (training.grad_accumulation_steps). Returns ({network: its loss terms, averaged
        over the micro-batches}, {network: lr})."""
        self.at = at
        micro = [self.losses.to_device(b) for b in (batches if isinstance(batches, list) else [batches])]
        lrs = {net.name: net.lr for net in self.order}
        terms = self.graphed(micro[0]) if self.graphed is not None else self.updates(micro, at)
        for net in self.order:
            net.step_schedule(epoch_end=False)
        return terms, lrs

    def updates(self, micro, at, every_network=False):
        """Every update of one step on its micro-batches (what training.cuda_graphs records; with
        `every_network`, as the trial step runs it, also those of networks whose turn it is not):
        {network: its loss terms}. Each micro-batch has a `Step` that its updates share: what an
        earlier update made for it (the generator's samples) is there for the later ones."""
        steps = [Step(at[0], at[1] + 1, i, len(micro)) for i in range(len(micro))]
        terms = {}
        for net in self.order:
            if at[0] % net.every and not every_network:
                continue
            for _ in range(net.iterations):
                terms[net.name] = self.update(net, micro, steps, at)
        return terms

    def update(self, net, micro, steps, at):
        """One optimizer step of `net` on the micro-batches `micro` ({stream: tensor} each)."""
        def loss(i):
            return self.losses(net.name, micro[i], steps[i])

        terms, made = net.update(loss, [batch_size(batch) for batch in micro], self.on_nonfinite == "skip")
        if not made:
            self.skipped_updates += 1
            if self.placement.is_main:
                values = {k: v.item() for k, v in terms.items()}
                where = where_nonfinite(at[1] + 1, at[0] + 1, at[2] + 1, net.name, values)
                tqdm.write(f"skipped the {net.name} update at {where} (training.on_nonfinite_loss: skip)")
        return terms


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

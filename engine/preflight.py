"""Check that one training step can run, before a run writes anything.

Data that does not fit the model (real images of another size than the discriminator was built
for, a stream with the wrong number of channels, targets a loss cannot compare with the outputs)
would otherwise be found at step 1, after the run folder and an epoch-0 checkpoint are written,
as a bare torch error ("expected input[1, 64, 8, 8] to have 1 channels") that names no stream,
submodel or config key. cli.check_batches_fit_model checks only the generator's input stream
against the architecture's input_size; the real samples, the flow's wiring and the loss are
first used by the step itself.

So `check_step` runs the forward passes and loss terms of one step on a first batch, phase by
phase, and turns a failure into a UserError that says what was fed where. Then
`check_whole_step` runs the whole step as the Trainer does (backward, optimizer, schedules, EMA,
a validation pass) and names the config key of what fails there. Both leave no trace: every
piece of state they change is put back (ModelState, TrainingState), so a run with the checks
trains bit for bit as one without them.
"""
import collections
import contextlib
import copy
import functools
import inspect
import random
import sys
import types
import warnings

import numpy as np
import torch

from engine.errors import UserError, dtype_name, kwargs_text, user_frames
from engine.model_base import CUSTOM_INPUT_SIZE, INPUT_SIZE, as_tuple, map_inputs
from engine.runs import first_line

SAMPLES = 2  # enough for a BatchNorm in train mode, few enough to cost nothing


def check_step(losses, batch, where, networks=(), step=None):
    """Run one training step's forward passes and loss terms (no backward, no optimizer step)
    with `losses` (a step.Losses; for a flow's own step, of the network.Networks
    `networks` in update order, sharing the network.Step `step`) on the first samples of
    `batch` ({stream: tensor}, as the training loader makes them). A failure is a UserError
    starting with `where` (the training config's path) that names the phase, the data stream
    and its per-sample shape, the submodel and layer that failed with the shape it was given and
    the one it expects, and torch's own message. Returns what the step made: the outputs' per-sample shape and each
    network's loss term names, {"outputs": [..], "terms": {network: [term, ...]}}."""
    model = losses.model
    batch = losses.to_device({name: x[:SAMPLES] for name, x in batch.items()})
    inputs, targets = model.split_batch(batch)
    fed_inputs = (f"{input_streams(model)} (the generator's inputs, input_data.data_key of "
                  f"{model.architecture_path}), {input_samples(model, inputs)}")
    layers = LayerTrace(model)
    saved = ModelState([model]), RandomState(model)
    try:
        # As training runs: under autograd (a gradient penalty needs it) and in train mode (so that
        # a BatchNorm on a batch of one fails here as in step 1).
        with torch.enable_grad(), eagerly():
            model.train()
            phase = "the model's forward pass (its inference path)" if losses.own_step else \
                "the generator's forward pass"
            outputs = run_phase(layers, where, phase, fed_inputs, lambda: losses.forward(inputs))
            check_outputs(outputs, model, where)
            if losses.own_step:
                terms = flow_terms(model, networks, layers, batch, step, where)
            else:
                terms = builtin_terms(losses, layers, inputs, targets, outputs, where)
    finally:
        layers.remove()
        for state in saved:
            state.restore()
    return {"outputs": list(outputs.shape[1:]), "terms": {net: ["total", *found] for net, found in terms.items()}}


def builtin_terms(losses, layers, inputs, targets, outputs, where):
    """The built-in step's phases after the forward pass: the discriminator on real and generated
    samples, then each network's terms from loss.loss_fn, checked to be one number each."""
    model, flow = losses.model, type(losses.model).__name__
    networks = ["generator"]
    if losses.adversarial:
        networks.append("discriminator")
        fed_real = (f"dataset stream '{model.target_key}' (the discriminator's real samples, target_key of "
                    f"the flow {flow}), {samples(targets)}")
        fed_fake = f"the generator's outputs (from {input_streams(model)}), {samples(outputs)}"
        with losses.autocast():
            run_phase(layers, where, "the discriminator on the real samples", fed_real,
                      lambda: model.discriminate(targets, inputs))
            run_phase(layers, where, "the discriminator on the generated samples", fed_fake,
                      lambda: model.discriminate(outputs, inputs))
    fed_loss = f"loss.loss_fn {losses.fn.__name__}, given outputs: {samples(outputs)}; targets: "
    fed_loss += (f"dataset stream '{model.target_key}', {samples(targets)}" if targets is not None
                 else "none (the flow sets no target_key)")
    terms = {}
    for net in networks:  # the terms exactly as training computes them
        with losses.autocast():
            terms[net] = run_phase(layers, where, f"the {net}'s loss terms", fed_loss,
                                   lambda net=net: losses.terms(net, outputs, inputs, targets), in_network=False)
    for net, found in terms.items():
        for term, value in found.items():
            if not is_one_number(value):
                raise UserError(f"{where}: loss.loss_fn {losses.fn.__name__} with loss.loss_args {losses.args} gives "
                                f"the {net} a term {term!r} that is {kind_of_value(value)}; each term must be one "
                                "number (a 0-d float tensor): check loss.loss_args (a weight written as a list?)")
    return terms


def flow_terms(model, networks, layers, batch, step, where):
    """A flow's own step: each network's `losses(network, batch, step)` in update order, sharing
    one Step as training does; what each returns checked to be terms (and values to watch) that
    training can sum and log. {network: [term and watched names]}."""
    flow, terms = type(model), {}
    fed = "the batch's streams " + ", ".join(f"'{name}' ({samples(x)})" for name, x in batch.items())
    for net in networks:
        with net.autocast():
            found = run_phase(layers, where, f"{flow.__name__}.losses for the network {net.name!r}", fed,
                              lambda net=net: model.losses(net.name, batch, step))
        terms[net.name] = checked_flow_terms(found, net.name, flow, where)
    return terms


def checked_flow_terms(found, net, flow, where):
    """The names of the terms and watched values a flow's `losses` returned for `net`, or a
    UserError saying what it should return: {term: 0-d float tensor} (at least one), or a pair
    ({term: ...}, {watched name: 0-d tensor or number})."""
    said = (f"{where}: model.model_flow_path: {flow.__name__}.losses in {inspect.getfile(flow)}, for the network "
            f"{net!r}, returned")
    pair = isinstance(found, tuple) and len(found) == 2 and isinstance(found[1], dict)
    terms, watched = found if pair else (found, {})
    if not isinstance(terms, dict) or not terms:
        raise UserError(f"{said} {kind_of_value(terms)}; it must return its loss terms, a dict such as "
                        "{'adversarial': tensor, 'l1': tensor} (non-empty), or a pair (terms, values to watch)")
    for name, value in terms.items():
        if not isinstance(name, str) or name == "total":
            raise UserError(f"{said} a term named {name!r}; name each term with a text other than 'total' "
                            "(the sum of the terms)")
        if not is_one_number(value):
            raise UserError(f"{said} a term {name!r} that is {kind_of_value(value)}; each term must be one number "
                            "(a 0-d float tensor; .mean() a per-sample loss)")
    for name, value in watched.items():
        if not isinstance(name, str) or name == "total" or name in terms:
            raise UserError(f"{said} a value to watch named {name!r}; give it a text name of its own, not 'total' "
                            "nor a term's")
        if not (is_one_number(value) or isinstance(value, (int, float)) and not isinstance(value, bool)):
            raise UserError(f"{said} a value to watch {name!r} that is {kind_of_value(value)}; each must be one "
                            "number (a 0-d tensor or a Python number)")
    return [*terms, *watched]


def is_one_number(value):
    return isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point()


def kind_of_value(value):
    if isinstance(value, torch.Tensor):
        return f"a {dtype_name(value.dtype)} tensor of shape {list(value.shape)}"
    if isinstance(value, dict) and not value:
        return "an empty dict"
    return repr(value) if isinstance(value, (int, float, str, type(None))) else f"a {type(value).__name__}"


def check_outputs(outputs, model, where):
    """The flow's forward gives the model's outputs as a tensor (a forward that ends without
    `return` gives None, which would fail far from it)."""
    if not isinstance(outputs, torch.Tensor):
        flow = type(model)
        raise UserError(f"{where}: model.model_flow_path: {flow.__name__}.forward in {inspect.getfile(flow)} "
                        f"returned {type(outputs).__name__}; it must return the model's outputs, a torch.Tensor")


def run_phase(layers, where, phase, fed, step, in_network=True):
    """`step()`; if it fails, a UserError naming the phase, what it was fed (`fed`), the layer
    that failed, and torch's message."""
    layers.entered.clear()
    try:
        return step()
    except UserError:
        raise
    # Whatever else: torch's errors for data that does not fit (shapes, dtypes, arguments), and what
    # a flow, layer or loss of the user's raises (a KeyError for a submodel the architecture no
    # longer has, say).
    except Exception as e:
        if isinstance(e, torch.OutOfMemoryError):  # not a mistake in the data: show it as it is
            raise
        lines = [f"{where}: one training step cannot run on this data: {phase} failed", f"  data: {fed}"]
        if layers.entered:
            lines.append(f"  layer: {layers.describe(*layers.entered[-1])}")
        elif in_network:
            lines.append(f"  layer: none; it failed between layers, in the flow {type(layers.model).__name__} "
                         "(e.g. where a submodel's inputs are joined on dim 1)")
        lines.append(f"  {'torch' if isinstance(e, RuntimeError) else type(e).__name__}: {str(e).strip()}")
        frames = user_frames(e)
        if frames:  # where in the user's flow, layers or loss it happened
            lines.append(f"  in your code:{frames.replace(chr(10), chr(10) + '  ')}")
        raise UserError("\n".join(lines)) from e


def input_streams(model):
    """How a message names the model's inputs: "dataset stream 'x'", or "dataset streams 'noise'
    and 'labels'" for a model of several."""
    names = [f"'{key}'" for key in model.input_keys]
    return f"dataset stream{'s' * (len(names) > 1)} {' and '.join(names)}"


def input_samples(model, inputs):
    """samples() of the model's inputs (a tensor, or a tuple in input_keys order), each named by its
    stream when there are several."""
    if len(model.input_keys) == 1:
        return samples(inputs)
    return "; ".join(f"{key}: {samples(x)}" for key, x in zip(model.input_keys, as_tuple(inputs)))


def samples(x):
    return f"samples of shape {list(x.shape[1:])} ({dtype_name(x.dtype)})"


class LayerTrace:
    """Hooks on every layer of every submodel that keep `entered`, the layers a forward pass is
    inside: a layer is pushed when it starts and popped when it returns, so after a failure the
    last entry is the layer that failed (a layer that raises never pops)."""

    def __init__(self, model):
        self.model, self.entered, self.handles = model, [], []
        for component, submodels in model.model_components.items():
            for submodel, sub in submodels.items():
                for name, layer in sub.layers.items():
                    enter = functools.partial(self.enter, (component, submodel, name))
                    self.handles.append(layer.register_forward_pre_hook(enter))
                    self.handles.append(layer.register_forward_hook(self.leave))

    def enter(self, where, layer, args):
        self.entered.append((*where, layer, args))

    def leave(self, layer, args, output):
        self.entered.pop()

    def describe(self, component, submodel, name, layer, args):
        """'component c, submodel s, layer l (Conv2d), given samples of shape [..]; it expects ...'."""
        text = f"component {component}, submodel {submodel}, layer {name} ({layer_class(layer).__name__})"
        if args and torch.is_tensor(args[0]):
            text += f", given samples of shape {list(args[0].shape[1:])}"
        expected = expects(layer)
        if expected:
            text += f"; it expects {', '.join(expected)}"
        built = built_for(self.model).get(name)
        if built is not None:
            text += f"; the architecture built it for samples of shape {list(built)}"
        return text

    def remove(self):
        for handle in self.handles:
            handle.remove()


def expects(layer):
    """The input sizes the layer keeps ('in_channels=1', 'in_features=128', ...): the constructor
    arguments that model_base fills in from the input's shape, where the module stores them."""
    found = []
    for arg in INPUT_SIZE.get(layer_class(layer).__name__, CUSTOM_INPUT_SIZE):
        value = getattr(layer, arg, None)
        if isinstance(value, int):
            found.append(f"{arg}={value}")
        elif isinstance(value, tuple):  # LayerNorm's normalized_shape
            found.append(f"{arg}={list(value)}")
    return found


def layer_class(layer):
    """The layer's class as the architecture names it: a parametrized layer (spectral_norm, ...) is
    of a class torch makes for it, ParametrizedConv2d, whose base is the one named."""
    return type(layer).__bases__[0] if torch.nn.utils.parametrize.is_parametrized(layer) else type(layer)


def built_for(model):
    """{layer name: the per-sample input shape the architecture built it for}, read off the
    summary rows (a submodel's input row, then one row per layer, each with its output shape)."""
    shapes, previous = {}, None
    for row in model.rows:
        if row["type"] != "input":
            shapes[row["name"]] = previous
        previous = row["shape"]
    return shapes


def eagerly():
    """Compiled submodels (training.compile) run eagerly in the check: compiled code would hide the
    layers from the hooks, and would be compiled twice. Nothing is compiled unless torch._dynamo
    is loaded, and loading it takes a second, so a run that compiles nothing does not."""
    if "torch._dynamo" not in sys.modules:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")


def cuda_devices(model):
    return sorted({t.device.index for t in [*model.parameters(), *model.buffers()] if t.device.type == "cuda"})


# ---- the whole step ----------------------------------------------------------------------------
# check_step above tries the forward passes and loss terms phase by phase, to say which stream
# and layer did not fit. What only the rest of a step meets (a loss that does not depend on the
# weights it trains, optimizer or scheduler arguments that build but cannot step, an EMA, a
# validation pass in eval mode) would still fail after the run's files were written. So
# check_whole_step then runs the step itself, the Trainer's own code, and puts everything back.
def check_whole_step(trainer, batch, validation_batch, where):
    """One whole training step of `trainer` on `batch` ({stream: tensor}, as its loader makes
    them), as fit() runs it: every network's update(s) (forward, loss, backward with the run's
    precision, scaler and batches per step, clipping, the optimizer's step, the EMA), a per-step
    and an epoch-end schedule step, a validation pass on `validation_batch` (None without a
    split) and the dashboard's outputs in eval mode. Then every piece of state is put back
    (TrainingState), so that the run trains bit for bit as one without the trial. A failure is a
    UserError starting with `where` that names the config key it comes from and torch's reason."""
    saved = TrainingState(trainer)
    # the step's batches, as many as the run's steps have (an epoch's at most)
    micro = [trainer.losses.to_device(batch)] * min(trainer.accumulate, len(trainer.loader))
    for net in trainer.networks.values():
        if net.scaler is not None:  # fp16's first scale (2^16) overflows: the optimizer's step would be skipped
            net.scaler.load_state_dict(net.scaler.state_dict() | {"scale": 1.0})
    stepper = trainer.stepper
    on_nonfinite, stepper.on_nonfinite = stepper.on_nonfinite, "ignore"  # (the optimizer steps, whatever the loss)
    try:
        # (compiled submodels run eagerly: compiling for the trial's batch of two would make torch
        # recompile the run's steps for any batch size, with slower code)
        with named_stages(trainer), eagerly():
            # (eagerly, also with training.cuda_graphs: nothing is recorded yet; every network, also one
            # updated every k-th step only)
            terms = stepper.updates(micro, (trainer.step, trainer.epoch, trainer.batches_done), every_network=True)
            check_finite(trainer, terms, batch, on_nonfinite, where)
            validation = trainer.validation.means([validation_batch], trainer.step, trainer.epoch) \
                if validation_batch is not None else None
            for net in trainer.networks.values():
                net.step_schedule(epoch_end=False)
                net.step_schedule(epoch_end=True, plateau_loss=lambda net=net: plateau_value(net, terms, validation))
                step_through_schedule(trainer, net)
            trainer.sampler.generate(map_inputs(lambda x: x[:SAMPLES].cpu(), trainer.model.split_batch(micro[0])[0]))
            if trainer.sampler.fixed_batch is not None:  # (a flow's own sample picture, sample_rows)
                trainer.sampler.sample_outputs()
    except StageFailed as failure:
        raise UserError(failure.message(where, trainer)) from None
    except UserError:
        raise
    except Exception as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise
        raise UserError(f"{where}: one training step cannot run: {type(e).__name__}: {first_line(e)} (model.model_flow_"
                        f"path {type(trainer.model).__name__}, {trainer.losses.what})") from None
    finally:
        saved.restore()


SCHEDULE_STEPS = 200_000  # of a schedule stepped through in the trial: a second at most (5 us each)


def step_through_schedule(trainer, net):
    """Step `net`'s schedule through the rest of the run (its first SCHEDULE_STEPS steps): a
    schedule of its own length (OneCycleLR's total_steps) fails where it runs out, hours into a
    run. ReduceLROnPlateau follows a loss, and never runs out."""
    if isinstance(net.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return
    per_epoch = trainer.steps_per_epoch if net.every_step else 1
    done = trainer.epoch * per_epoch + (trainer.batches_done if net.every_step else 0) + 1  # (+ the trial's own)
    total = trainer.n_epochs * per_epoch
    with warnings.catch_warnings():  # (no optimizer steps between them: that is the point here)
        warnings.simplefilter("ignore")
        for step in range(done + 1, min(total, done + SCHEDULE_STEPS) + 1):
            try:
                net.scheduler.step()
            except Exception as e:
                failure = StageFailed("schedule", net, e)
                failure.at = f" at {'step' if net.every_step else 'epoch'} {step} of the run's {total}"
                raise failure from e


def plateau_value(net, terms, validation):
    """What ReduceLROnPlateau follows in the trial: the validation loss, else this step's."""
    return validation[0][net.name, "total"] if validation else terms[net.name]["total"].item()


def check_finite(trainer, terms, batch, on_nonfinite, where):
    """With on_nonfinite_loss: stop, a loss that is already NaN or infinite on the first samples
    would stop the run at its first log, after its files were written."""
    if on_nonfinite != "stop":
        return
    for name, found in terms.items():
        bad = {term: value.item() for term, value in found.items() if not torch.isfinite(value).all()}
        if not bad:
            continue
        losses = f"the {name}'s loss is not finite on the first samples, before any update " \
                 f"({', '.join(f'{t}={v}' for t, v in bad.items())})"
        streams = [f"dataset.{s}" for s, x in batch.items() if x.is_floating_point() and not torch.isfinite(x).all()]
        if streams:
            raise UserError(f"{where}: {', '.join(streams)}: {losses}: the first samples hold NaN or infinite values")
        raise UserError(f"{where}: loss.loss_fn: {losses}: the data are finite; look in "
                        f"{trainer.losses.what} and the flow for a log or a division of zero "
                        "(training.on_nonfinite_loss: skip or ignore trains on regardless)")


class StageFailed(Exception):
    """A stage of the trial step failed: `stage` says which (backward, step, schedule or ema),
    `net` of which network (a network.Network), `error` with what."""

    def __init__(self, stage, net, error):
        super().__init__(stage)
        self.stage, self.net, self.error = stage, net, error
        self.at = ""  # where in the run, if not at its first step

    def message(self, where, trainer):
        net, reason = self.net, first_line(self.error)
        s = net.settings
        if self.stage == "backward":
            model = trainer.model
            return (f"{where}: loss.loss_fn, model.model_flow_path: the {net.name}'s loss from "
                    f"{trainer.losses.what} cannot be backpropagated through {type(model).__name__} "
                    f"({model.architecture_path}) to its weights (an in-place operation, inplace: true?): {reason}")
        if self.stage == "step":
            key = ", ".join(config_key(trainer, net, k) for k in ("optimizer", "optimizer_args") if s[k])
            scaled = " with training.precision fp16's gradient scaler" if net.scaler is not None else ""
            return (f"{where}: {key}: {s['optimizer']}(lr={s['learning_rate']:g}"
                    f"{', ' + kwargs_text(s['optimizer_args']) if s['optimizer_args'] else ''}) cannot update the "
                    f"{net.name}'s weights{scaled}: {reason}")
        if self.stage == "schedule":
            key = ", ".join(config_key(trainer, net, k) for k in ("scheduler", "scheduler_args") if s[k])
            schedule = f"{s['scheduler']}({kwargs_text(s['scheduler_args'])})"
            return f"{where}: {key}: the {net.name}'s {schedule} cannot step{self.at}: {reason}"
        return f"{where}: {net.section}.ema_decay: the moving average of the {net.name}'s weights cannot update: " \
            f"{reason}"


def config_key(trainer, net, key):
    """The key a network's setting comes from: the discriminator's adversarial.<key> (or a network's
    networks.<name>.<key>), which copies training.<key> when left null."""
    if net.section != "training" and net.settings[key] == trainer.cfg["training"][key]:
        return f"training.{key} ({net.section}.{key} copies it)"
    return f"{net.section}.{key}"


@contextlib.contextmanager
def named_stages(trainer):
    """Each network's backward pass, optimizer step, schedule step and EMA update, wrapped for
    the trial so that a failure says which of them failed (StageFailed): the trial runs the
    training code itself, so that what it tries is what training runs."""
    wrapped = []

    def name(owner, method, stage, net, check=None):
        original = getattr(owner, method)

        def named(*args, **kwargs):
            if check is not None:
                check(*args)
            try:
                return original(*args, **kwargs)
            except (UserError, StageFailed, torch.OutOfMemoryError):
                raise
            except Exception as e:
                raise StageFailed(stage, net, e) from e

        wrapped.append((owner, method))
        setattr(owner, method, named)  # (an instance attribute: deleting it brings back the class's method)

    try:
        for net in trainer.networks.values():
            name(net, "backward", "backward", net, check=functools.partial(check_loss_trains, trainer, net))
            name(net, "step", "step", net, check=functools.partial(check_gradients_reached, trainer, net))
            name(net, "step_schedule", "schedule", net)
            if net.ema is not None:
                name(net.ema, "update_parameters", "ema", net)
        yield
    finally:
        for owner, method in wrapped:
            delattr(owner, method)


def check_loss_trains(trainer, net, loss):
    """A loss that does not depend on the weights of the network it trains (a reconstruction loss
    given to a discriminator) cannot be backpropagated: say so in those words, not torch's."""
    if loss.requires_grad:
        return
    if trainer.losses.own_step:
        raise UserError(f"{trainer.source}: model.model_flow_path: the {net.name}'s terms from {trainer.losses.what} "
                        f"do not depend on the weights of {', '.join(net.components)} ({net.section}), so they cannot "
                        f"train it; return terms computed through its components (not under torch.no_grad, nor "
                        "detached)")
    fn = trainer.losses.fn
    hint, scores = "", inspect.signature(fn).parameters.get("fake_scores")
    if net.name == "discriminator" and (scores is None or scores.default is not scores.empty):
        hint = (f"; {fn.__name__} takes no discriminator scores: with adversarial.enable_adversarial_training true "
                "use a GAN loss (one with fake_scores, e.g. example_gan_loss), or set it to false")
    raise UserError(f"{trainer.source}: loss.loss_fn: the {net.name}'s loss from {fn.__name__} does not depend on "
                    f"the {net.name}'s weights, so it cannot train on it{hint}")


def check_gradients_reached(trainer, net):
    """Before the optimizer's step: the loss reached some of the network's weights. A loss that
    depends on weights, but only other networks' (a generator's term scored on fakes kept detached
    in `step`), backpropagates without error and would train nothing, silently."""
    if any(p.grad is not None for p in net.params):
        return
    raise UserError(f"{trainer.source}: model.model_flow_path: the {net.name}'s terms from {trainer.losses.what} reach "
                    f"none of its weights ({', '.join(net.components)}, {net.section}), so it would never change: "
                    "compute them through its components, not from values kept detached (in step, after .detach() "
                    "or under torch.no_grad)")


class TrainingState:
    """Everything a training step can change, copied, to put back after the trial step: the
    model's (ModelState, with the EMA's copy of the weights), the Trainer's and each Network's
    attributes, each optimizer's state and groups, each schedule's and fp16 scaler's state, the
    gradients and the random number generators."""

    def __init__(self, trainer):
        nets = list(trainer.networks.values())
        self.model = ModelState([trainer.model, *(net.ema for net in nets if net.ema is not None)])
        objects = [trainer, trainer.stepper, trainer.validation, *nets, *(net.optimizer for net in nets),
                   *(net.scheduler for net in nets),
                   *(net.scaler for net in nets if net.scaler is not None)]
        self.attributes = [(obj, copied(vars(obj))) for obj in objects]
        self.grads = [(p, p.grad) for p in trainer.model.parameters()]
        self.random = RandomState(trainer.model)

    @torch.no_grad()
    def restore(self):
        self.model.restore()
        for obj, saved in self.attributes:
            put_back(vars(obj), saved)
        for p, grad in self.grads:
            p.grad = grad
        self.random.restore()


class ModelState:
    """What running `models` (nn.Modules) can change, copied: their weights and buffers (BatchNorm's
    running statistics, non-persistent ones too), put back in place so that DDP's, the optimizers'
    and compiled code's references stay valid; and the attributes of every module in them: train
    or eval mode, and whatever a flow or a layer keeps (counters, tensors, lists, dicts, tuples
    and deques of them, numpy arrays, torch.Generators, and objects of its own such as an image
    pool, whose attributes are copied the same way)."""

    def __init__(self, models):
        self.models = models
        self.weights = [{k: TensorCopy(v) for k, v in tensors_of(model).items()} for model in models]
        # One memo for all (a flow's attributes may hold what another module's hold), over values
        # that live as long as it does: it is keyed by id(), which a value dropped would pass on.
        modules = [m for model in models for m in model.modules()]
        attributes, memo = [own_attributes(m) for m in modules], {}
        self.attributes = [(m, copied(a, memo, into_objects=True)) for m, a in zip(modules, attributes)]

    @torch.no_grad()
    def restore(self):
        for model, saved in zip(self.models, self.weights):
            now = tensors_of(model)
            for name, copy_ in saved.items():
                if name in now:
                    restored(now[name], copy_, into_place=True)
        for module, saved in self.attributes:
            put_back(vars(module), saved, keep=MODULE_INTERNALS)


def tensors_of(model):
    """{name: tensor} of a model's parameters and buffers."""
    return dict(model.named_parameters()) | dict(model.named_buffers())


class RandomState:
    """torch's (CPU and the model's GPUs), Python's and numpy's random number generators."""

    def __init__(self, model):
        self.devices = cuda_devices(model)
        self.states = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self.devices], random.getstate(),
                       np.random.get_state())

    def restore(self):
        torch_state, cuda_states, python_state, numpy_state = self.states
        torch.set_rng_state(torch_state)
        for device, state in zip(self.devices, cuda_states):
            torch.cuda.set_rng_state(state, device)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


MODULE_INTERNALS = frozenset(vars(torch.nn.Module())) - {"training"}  # parameters, buffers, submodules, hooks
MISSING = object()


def own_attributes(module):
    """A module's attributes without torch's internals (its weights go through tensors_of)."""
    return {k: v for k, v in vars(module).items() if k not in MODULE_INTERNALS}


def put_back(attributes, saved, keep=()):
    """An object's attributes (`vars(obj)`) as `saved` (copied) has them: what was added since is
    removed, except the names in `keep`."""
    for key in [k for k in attributes if k not in saved and k not in keep]:
        del attributes[key]
    for key, value in saved.items():
        attributes[key] = restored(attributes.get(key, MISSING), value)


# ---- copies of values, put back in place ----
class TensorCopy:
    """A tensor's values, kept in the CPU's memory (a GPU that holds a model, its optimizer's
    state and its EMA may have no room for copies of them all), and the device it came from."""

    def __init__(self, tensor):
        self.tensor, self.device = tensor.detach().to("cpu", copy=True), tensor.device


class GeneratorState:
    def __init__(self, generator):
        self.generator, self.state = generator, generator.get_state()


class ObjectCopy:
    """An object of a flow's own (an image pool): the object, and its attributes copied."""

    def __init__(self, obj, attributes):
        self.obj, self.attributes = obj, attributes


def copied(value, memo=None, into_objects=False):
    """A copy of `value` to put back later (`restored`): tensors (TensorCopy) and numpy arrays
    copied, dicts, lists, deques, tuples and sets copied through, a torch.Generator's state kept;
    with `into_objects`, other objects' attributes copied too (ObjectCopy), but for torch's
    (modules, optimizers) and code. Anything else (numbers, text, parameters, whose values
    ModelState keeps) as it is. What `value` holds twice is copied once (`memo`, as
    copy.deepcopy keeps one), so that shared and self-holding values copy as they are."""
    memo = {} if memo is None else memo
    if id(value) in memo:
        return memo[id(value)]
    if isinstance(value, torch.nn.Parameter):
        return value
    if torch.is_tensor(value):
        new = TensorCopy(value)
    elif isinstance(value, np.ndarray):
        new = value.copy()
    elif isinstance(value, torch.Generator):
        new = GeneratorState(value)
    elif isinstance(value, (dict, list, collections.deque)):
        new = memo[id(value)] = copy.copy(value)  # (first: what it holds may hold it; a defaultdict keeps its factory)
        if isinstance(value, dict):
            new.update((k, copied(v, memo, into_objects)) for k, v in value.items())
        else:
            new.clear()
            new.extend(copied(v, memo, into_objects) for v in value)
    elif isinstance(value, (tuple, set, frozenset)):
        items = [copied(v, memo, into_objects) for v in value]
        new = value._make(items) if hasattr(value, "_fields") else type(value)(items)  # (a namedtuple by _make)
    elif into_objects and is_own_object(value):
        new = memo[id(value)] = ObjectCopy(value, None)
        new.attributes = copied(vars(value), memo, into_objects)
    else:
        return value
    memo[id(value)] = new
    return new


def is_own_object(value):
    """An object a flow made of a class of its own (or Python's), with attributes to copy: not
    torch's (modules, optimizers), and not code (classes, functions, modules)."""
    return hasattr(value, "__dict__") and not isinstance(value, (type, types.ModuleType, types.FunctionType,
                                                                types.MethodType, functools.partial)) \
        and not type(value).__module__.split(".")[0] == "torch"


def restored(now, saved, done=None, into_place=False):
    """The value to keep where `now` is, as `saved` (copied) holds it: tensors and arrays of the
    same kind copied into in place (`into_place`: a tensor of another kind too, through .data),
    dicts, lists, deques and objects refilled in place (others may hold them too), tuples and sets
    made anew, else `saved` (what is put back once is not again: `done`)."""
    done = {} if done is None else done
    if id(saved) in done:
        return done[id(saved)]
    if isinstance(saved, TensorCopy):
        values = saved.tensor
        if torch.is_tensor(now) and (now.shape, now.dtype, now.device) == (values.shape, values.dtype, saved.device):
            return now.copy_(values)
        if into_place:  # (a weight the trial reshaped: its object stays the one the optimizer holds)
            now.data = values.to(saved.device, copy=True)
            return now
        return values.to(saved.device, copy=True)
    if isinstance(saved, np.ndarray):
        if isinstance(now, np.ndarray) and (now.shape, now.dtype) == (saved.shape, saved.dtype):
            np.copyto(now, saved)
            return now
        return saved.copy()
    if isinstance(saved, GeneratorState):
        saved.generator.set_state(saved.state)
        return saved.generator
    if isinstance(saved, ObjectCopy):
        done[id(saved)] = saved.obj
        put_back(vars(saved.obj), saved.attributes)
        return saved.obj
    if isinstance(saved, (dict, list, collections.deque)):
        if type(now) is not type(saved):  # (the trial replaced it, or it was not there)
            now = copy.copy(saved)
            now.clear()
        done[id(saved)] = now
        if isinstance(saved, dict):
            for key in [k for k in now if k not in saved]:
                del now[key]
            for key, value in saved.items():
                now[key] = restored(now.get(key, MISSING), value, done)
        else:
            items = [restored(now[i] if i < len(now) else MISSING, v, done) for i, v in enumerate(saved)]
            now.clear()
            now.extend(items)
        return now
    if isinstance(saved, (tuple, set, frozenset)):
        items = [restored(MISSING, v, done) for v in saved]
        return saved._make(items) if hasattr(saved, "_fields") else type(saved)(items)
    return saved

"""One trained network and everything that changes as it trains: its optimizer and learning-rate
schedule, fp16 gradient scaler, gradient clipping, its moving average (EMA) and its loss history.

A network is a name and the architecture's components it trains (`network_specs`): by default the
generator (`training.*`) and, in adversarial training, the discriminator (`adversarial.*`); or
any networks the training config's `networks` section lists for a flow's own step, each with its
own settings. The Trainer (loop.py) and its Stepper (step.py) say what each loss is and when each network updates;
a Network turns that loss into one optimizer step: zero the gradients, run backward over the
micro-batches under its precision, average the gradients over the processes (one all-reduce),
clip, step (or skip a non-finite update) and update the EMA. `state_dict()` /
`load_state_dict()` are what a checkpoint keeps of it; `checkpoint_entries` and `network_state`
lay them out in the checkpoint's keys.
"""
import contextlib
import inspect
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from engine.errors import UserError, did_you_mean, kwargs_text
from engine.registry import optimizers, schedulers

# The settings that shape a network's learning-rate schedule (compared when resuming).
SCHEDULE_KEYS = ["learning_rate", "scheduler", "scheduler_args", "scheduler_interval", "learning_rate_step",
                 "learning_rate_gamma"]
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # training.precision -> autocast's dtype


def autocast(device_type, dtype, cache_enabled=True):
    """torch.autocast to `dtype` (AUTOCAST's), or for fp32 (None) no context at all: even a
    disabled torch.autocast costs some microseconds, three times a step."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, cache_enabled=cache_enabled)


@dataclass
class NetworkSpec:
    """A network to train: its `name`, the key path of its settings (`training`, `adversarial`,
    `networks.<name>`), the model components it trains, and its settings (optimizer and
    schedule keys, precision, grad_clip_norm, ema_decay, updates per step, every)."""
    name: str
    section: str
    components: list
    settings: dict


def network_specs(cfg, model):
    """The networks of a run: the `networks` section's, or the built-in pair (the generator first)."""
    source = cfg["config_path"]
    if cfg["networks"]:
        for name, s in cfg["networks"].items():
            for i, component in enumerate(s["components"]):
                if component not in model.adv_types:
                    raise UserError(f"{source}: networks.{name}.components[{i}]: {component!r} is not a component of "
                                    f"{model.architecture_path}{did_you_mean(component, list(model.adv_types))}; "
                                    f"components: {', '.join(model.adv_types)}")
        return [NetworkSpec(name, f"networks.{name}", s["components"], s) for name, s in cfg["networks"].items()]
    train, adv = cfg["training"], cfg["adversarial"]
    adversarial = adv["enable_adversarial_training"]
    of_type = {kind: [c for c, t in model.adv_types.items() if t == kind] for kind in ("generator", "discriminator")}
    shared = {"precision": train["precision"], "every": 1}
    specs = [NetworkSpec("generator", "training", of_type["generator"], train | shared | {
        "updates": adv["n_gen_iterations"] if adversarial else 1})]
    if adversarial:
        specs.append(NetworkSpec("discriminator", "adversarial", of_type["discriminator"], adv | shared | {
            "updates": adv["n_disc_iterations"], "ema_decay": None}))
    return specs


def update_order(cfg, names):
    """The order the networks `names` update in within a step: the networks section's, or the
    built-in pair's as adversarial.train_disc_first says."""
    if not cfg["networks"] and cfg["adversarial"]["train_disc_first"]:
        return sorted(names, key=lambda name: name != "discriminator")
    return list(names)


class Step(dict):
    """What the updates of one training step share on one micro-batch: a dict the step's loss
    terms may leave values in for later updates of the same step (the generator's samples, for
    the discriminator's update to reuse detached), fresh at every step. `number`: the run's step
    (0 first), `epoch`: the epoch it belongs to (1 first), `micro_batch` of `micro_batches`
    (training.grad_accumulation_steps), `training`: False in a validation pass."""

    def __init__(self, number, epoch, micro_batch=0, micro_batches=1, training=True):
        super().__init__()
        self.number, self.epoch, self.micro_batch, self.micro_batches = number, epoch, micro_batch, micro_batches
        self.training = training


class Network:
    """One network of `model` (a NetworkSpec), and the state of training it. `module` holds its
    components of the model as one module, sharing their weights: what its optimizer trains and
    the EMA averages."""

    def __init__(self, spec, model, cfg, placement, steps_per_epoch):
        train = cfg["training"]
        self.name, self.section, self.components = spec.name, spec.section, spec.components
        self.module = module = model.components_named(spec.components)
        self.architecture_path = model.architecture_path
        self.settings = s = spec.settings  # validated values (null keys copy training's)
        self.source = cfg["config_path"]
        self.where = f"{self.source}: {self.section}"
        self.params = list(module.parameters())
        self.world_size, self.distributed = placement.world_size, placement.distributed
        self.steps_per_epoch, self.n_epochs = steps_per_epoch, train["n_epochs"]
        self.optimizer = make_optimizer(self.params, s, placement.device, self.where, train["cuda_graphs"])
        self.scheduler = make_scheduler(self.optimizer, s, steps_per_epoch, self.n_epochs, self.where)
        self.every_step = s["scheduler_interval"] == "step"
        # The settings a resume compares with the checkpoint's to decide whether the schedule carries on.
        self.schedule_settings = {f"{self.section}.{k}": s[k] for k in SCHEDULE_KEYS}
        if fills_total_length(s):  # the schedule's length is the run's
            self.schedule_settings["training.n_epochs"] = self.n_epochs
        if self.every_step:  # it counts optimizer steps, which batches per step decide
            self.schedule_settings["training.grad_accumulation_steps"] = train["grad_accumulation_steps"]
        self.iterations, self.every, self.clip = s["updates"], s["every"], s["grad_clip_norm"]
        # Mixed precision: its loss terms under autocast, the weights in fp32; fp16 with a scaler that
        # keeps small gradients from flushing to zero (bf16 has fp32's range: none needed).
        self.dtype, self.device_type = AUTOCAST[s["precision"]], placement.device.type
        self.autocast_cache = not train["cuda_graphs"]  # (inside a CUDA graph the casts are recorded)
        self.scaler = torch.amp.GradScaler(placement.device.type) if s["precision"] == "fp16" else None
        self.ema = None if s["ema_decay"] is None else AveragedModel(
            module, multi_avg_fn=get_ema_multi_avg_fn(s["ema_decay"]), use_buffers=True)
        self.grads_checked = False  # (under DDP: every process's gradients are of the same parameters)
        self.loss_history = {}  # term -> one value per update
        self.validation_history = {}  # term -> one value per validated epoch

    @property
    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def autocast(self):
        """The precision context of its loss terms."""
        return autocast(self.device_type, self.dtype, self.autocast_cache)

    # ---- one update ----
    def update(self, loss, sizes, skip_nonfinite):
        """One optimizer step on the gradients of the micro-batches: `loss(i)` gives the (total,
        terms) of micro-batch i, and `sizes` their sample counts; each counts for its share of
        the samples, so that they step as one batch of all of them would. Under DDP the gradients
        are then averaged over the processes. Returns the loss terms (detached, float, averaged
        over the micro-batches, 'total' first, still on the device) and whether the update was
        made: with `skip_nonfinite`, False when a loss was non-finite (on any process), and the
        gradients were dropped. Only that check reads a value back from the device (one sync per
        update); without it the step never waits for the device."""
        self.optimizer.zero_grad(set_to_none=True)
        n_samples, last = sum(sizes), len(sizes) - 1
        sums, bad = {}, None
        for i, size in enumerate(sizes):
            weight = size / n_samples  # a short last batch of the epoch counts for its samples
            with self.autocast():
                total, terms = loss(i)
            self.backward(total * weight if last else total)
            for name, value in {"total": total, **terms}.items():  # (float: autocast may give half precision)
                value = value.detach().float()
                if last:
                    value = value * weight
                sums[name] = sums[name] + value if name in sums else value
            if skip_nonfinite:
                finite = torch.isfinite(total.detach())
                bad = ~finite if bad is None else bad | ~finite
        if self.distributed:  # (also as torchrun's only process: a rehearsal of a multi-GPU run)
            average_gradients(self)
        if bad is not None and self.world_size > 1:  # a NaN on any process skips the step on all
            bad = bad.float()
            dist.all_reduce(bad)
        if bad is not None and bad.item():  # one host sync per update (on_nonfinite_loss: skip only)
            self.optimizer.zero_grad(set_to_none=True)
            return sums, False
        if self.step() and self.ema is not None:  # (not after a step that fp16's scaler skipped)
            self.ema.update_parameters(self.module)
        return sums, True

    def backward(self, loss):
        # inputs=: the generator's loss runs the discriminator, whose gradients it does not need
        (self.scaler.scale(loss) if self.scaler else loss).backward(inputs=self.params)

    def step(self):
        """Clip the (unscaled) gradients if asked, then step. An fp16 scaler skips a step whose
        gradients overflowed, and lowers its scale; returned is whether the weights changed."""
        if self.clip:
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if not self.scaler:
            self.optimizer.step()
            return True
        scale = self.scaler.get_scale()  # (a device sync, as scaler.step's check of the gradients is)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale  # update() lowers the scale exactly when it skipped the step

    def step_schedule(self, epoch_end, plateau_loss=None):
        """Advance the schedule: after every step (`epoch_end` False) or every epoch, as its
        scheduler_interval says. ReduceLROnPlateau follows `plateau_loss()`."""
        if self.every_step == epoch_end:
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(plateau_loss())
        else:
            self.scheduler.step()

    # ---- checkpoints ----
    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "ema": self.ema.module.state_dict() if self.ema is not None else None,  # keyed as self.module
                "ema_updates": int(self.ema.n_averaged) if self.ema is not None else 0,
                "loss_history": self.loss_history, "validation_history": self.validation_history}

    def load_state_dict(self, state, saved_cfg, steps_done, epochs_done):
        """Restore what `state` (see network_state) holds. Unchanged settings resume exactly.
        Changed ones win over the checkpoint's config `saved_cfg`: new optimizer_args apply to the
        restored optimizer, and a changed learning rate or schedule is rebuilt and advanced to this
        point of the run (`steps_done` optimizer steps, `epochs_done` epochs). A part the state
        lacks (a run switched to fp16 or to an EMA) starts afresh. Returns what changed, for the
        user, or None."""
        note = load_schedule(self, state, saved_cfg, steps_done, epochs_done) if state["optimizer"] else None
        if self.ema is not None and state["ema"]:
            self.ema.module.load_state_dict(state["ema"])
            self.ema.n_averaged.fill_(state["ema_updates"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.loss_history = state["loss_history"] or {}
        self.validation_history = state["validation_history"] or {}
        return note

def describe(net):
    """One line of train.py's start-up header: what this network trains with, as resolved
    (a key the config left out shows the value it got, e.g. one copied from training)."""
    s, args = net.settings, kwargs_text(net.settings["optimizer_args"])
    schedule = {k: v for k, v in net.scheduler.state_dict().items()
                if k in ("step_size", "gamma", "T_max", "eta_min", "total_steps", "max_lr", "factor", "patience")}
    n_params = sum(p.numel() for p in net.params)
    fused = ", fused=True" if net.optimizer.defaults.get("fused") and "fused" not in s["optimizer_args"] else ""
    optimizer = f"{s['optimizer']}(lr={s['learning_rate']:g}{', ' + args if args else ''}{fused})"
    every = f" every {net.every} steps" if net.every > 1 else " per step"
    trains = f" of {', '.join(net.components)}" if net.section.startswith("networks.") else ""
    return (f"{net.name} ({net.section}.*): {optimizer}, {s['scheduler']}({kwargs_text(schedule)}) per "
            f"{s['scheduler_interval']}, clip {net.clip if net.clip else 'none'}, {net.iterations} update(s)"
            f"{every}, {n_params:,} parameters{trains}{', EMA of its weights' if net.ema is not None else ''}")


# ---- DDP ----
def average_gradients(net):
    """Average this network's gradients over the processes: one all-reduce of them all, laid
    end to end, whatever forward passes the loss ran (as StyleGAN3's training loop does), so
    a flow's step needs no DDP wrapper. Each is divided by the process count first, as DDP
    does, and then summed. A parameter no loss reached keeps no gradient on any process."""
    grads = [p.grad for p in net.params if p.grad is not None]
    if not net.grads_checked:
        check_same_gradients(net, len(grads))
    for dtype in {g.dtype for g in grads}:  # (one flat tensor per dtype)
        group = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in group]).div_(net.world_size)
        dist.all_reduce(flat)
        for g, averaged in zip(group, flat.split([g.numel() for g in group])):
            g.copy_(averaged.view_as(g))

def check_same_gradients(net, count):
    """Every process has gradients for the same parameters: a flow whose forward passes depend on
    the process's data (a branch taken on some processes only) would pair one process's gradient
    with another's parameter. Checked at the network's first update."""
    counts = torch.tensor([count, -count], device=net.params[0].device if net.params else "cpu")
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    if counts[0] != -counts[1]:
        raise UserError(f"{net.source}: model.model_flow_path: under DDP every process must reach the same "
                        f"parameters of the {net.name} in its loss, but one reached {int(-counts[1])} and another "
                        f"{int(counts[0])}; take the same forward passes on every process")
    net.grads_checked = True


def load_schedule(net, state, saved_cfg, steps_done, epochs_done):
    """The optimizer and schedule of a checkpoint's network state, or, where the settings changed,
    the optimizer afresh or the schedule rebuilt and advanced (see Network.load_state_dict)."""
    saved = section_of(saved_cfg, net.section)
    if net.settings["optimizer"] != saved.get("optimizer"):
        return (f"{net.section}.optimizer changed ({saved.get('optimizer')} -> {net.settings['optimizer']}): the "
                f"{net.name}'s optimizer starts afresh")
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in net.optimizer.param_groups]
    built = [{k: group[k] for k in IMPLEMENTATION if k in group} for group in fresh]
    net.optimizer.load_state_dict(state["optimizer"])
    for group, implementation in zip(net.optimizer.param_groups, built):
        # load_state_dict copies the saved groups' settings, including how the update ran
        # (fused on the GPU that saved it, say): keep this run's, and the config's arguments.
        group.update(implementation | net.settings["optimizer_args"])
    place_step_counts(net.optimizer)
    check_loaded_state(net.optimizer, fresh)
    before = {path: read_key(saved_cfg, path) for path in net.schedule_settings}
    changed = [path for path, value in net.schedule_settings.items() if value != before[path]]
    if not changed and isinstance(state["scheduler"], dict):
        net.scheduler.load_state_dict(state["scheduler"])
        return None
    for group in net.optimizer.param_groups:
        group["lr"] = group["initial_lr"] = net.settings["learning_rate"]
    net.scheduler = make_scheduler(net.optimizer, net.settings, net.steps_per_epoch, net.n_epochs, net.where)
    done = steps_done if net.every_step else epochs_done
    with warnings.catch_warnings():  # stepping a schedule without optimizer steps is the point here
        warnings.simplefilter("ignore")
        if not isinstance(net.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            for _ in range(done):
                net.scheduler.step()
    why = f"{', '.join(changed)} changed" if changed else "the checkpoint holds no schedule state"
    return (f"{why}: the {net.name}'s {net.settings['scheduler']} schedule is rebuilt "
            f"and advanced {done} {'steps' if net.every_step else 'epochs'} (learning rate now {net.lr:.4g})")


def step_epoch_schedules(networks, validation, steps_per_epoch, placement):
    """Advance the per-epoch schedules of `networks` ({name: Network}) at an epoch's end.
    ReduceLROnPlateau follows the network's validation loss (`validation`: {name: {term: mean}})
    where there is one, else its mean training loss over the epoch."""
    for name, net in networks.items():
        net.step_schedule(epoch_end=True, plateau_loss=lambda name=name, net=net: validation[name]["total"]
                          if validation else epoch_mean_loss(net, steps_per_epoch, placement))


def epoch_mean_loss(net, steps_per_epoch, placement):
    """The mean total loss of `net` over the epoch just trained, over all DDP processes: what
    ReduceLROnPlateau follows where there is no validation loss."""
    history = net.loss_history["total"][-max(1, steps_per_epoch // net.every):]
    mean = torch.tensor(float(np.mean(history)), device=placement.device)
    if placement.world_size > 1:
        dist.all_reduce(mean)
        mean /= placement.world_size
    return mean.item()


def section_of(cfg, path):
    """A saved config's section at 'training', 'adversarial' or 'networks.<name>' ({} where an
    older config lacks it)."""
    for part in path.split("."):
        cfg = cfg.get(part) or {} if isinstance(cfg, dict) else {}
    return cfg


def read_key(cfg, path):
    """A saved config's value at '<section>.key' (an older config may lack the key)."""
    section, key = path.rsplit(".", 1)
    return section_of(cfg, section).get(key, 1 if key == "grad_accumulation_steps" else None)


def checkpoint_entries(networks):
    """The networks' part of a checkpoint ({name: Network}): each network's state under its name
    in `networks`, and, for older readers, the keys checkpoints have always had: the generator's
    (or the first network's) optimizer as optimizer_state_dict, the discriminator's as
    disc_optimizer_state_dict (None without one), and so on. (The same tensors under two keys
    are stored once.)"""
    states = {name: net.state_dict() for name, net in networks.items()}
    first = states.get("generator") or next(iter(states.values()))
    generator, discriminator = states.get("generator", {}), states.get("discriminator", {})
    return {"networks": {name: {"components": net.components, **{k: v for k, v in states[name].items()
                                                                 if k not in HISTORIES}}
                         for name, net in networks.items()},
            "optimizer_state_dict": first["optimizer"], "scheduler_state_dict": first["scheduler"],
            "disc_optimizer_state_dict": discriminator.get("optimizer"),
            "disc_scheduler_state_dict": discriminator.get("scheduler"),
            "scaler_state_dicts": {name: s["scaler"] for name, s in states.items() if s["scaler"] is not None},
            "ema_state_dict": generator.get("ema"), "ema_updates": generator.get("ema_updates", 0),
            "loss_history": {name: s["loss_history"] for name, s in states.items()}}


HISTORIES = ("loss_history", "validation_history")  # (kept per network under their own keys, as always)


def network_state(checkpoint, name):
    """One network's state_dict out of a checkpoint (what checkpoint_entries wrote, or an older
    checkpoint's keys); a part the checkpoint lacks is None."""
    histories = {"loss_history": checkpoint["loss_history"].get(name),
                 "validation_history": (checkpoint.get("validation_history") or {}).get(name)}
    saved = (checkpoint.get("networks") or {}).get(name)
    if saved is not None:
        return {k: saved.get(k) for k in ("optimizer", "scheduler", "scaler", "ema")} | {
            "ema_updates": saved.get("ema_updates", 0)} | histories
    if name not in ("generator", "discriminator"):  # (a network the checkpoint did not train)
        return dict.fromkeys(("optimizer", "scheduler", "scaler", "ema")) | {"ema_updates": 0} | histories
    prefix = "disc_" if name == "discriminator" else ""
    generator = name == "generator"
    return {"optimizer": checkpoint.get(f"{prefix}optimizer_state_dict"),
            "scheduler": checkpoint.get(f"{prefix}scheduler_state_dict"),
            "scaler": checkpoint.get("scaler_state_dicts", {}).get(name),
            "ema": checkpoint.get("ema_state_dict") if generator else None,
            "ema_updates": checkpoint.get("ema_updates", 0) if generator else 0} | histories


# An optimizer's settings that say how its update runs rather than what it computes.
IMPLEMENTATION = ["fused", "foreach", "capturable"]


def make_optimizer(params, s, device, where, capturable=False):
    """The optimizer of one network from its config section (`training` or `adversarial`). On a
    GPU it is fused where torch has a fused kernel for it (Adam, AdamW, SGD, Adagrad): one kernel
    launch updates every parameter, where the default (foreach) launches several per group of
    tensors, which at small and medium model sizes is much of a step's time. optimizer_args that
    set fused or foreach (e.g. {fused: false}) choose instead. `capturable`: its steps may be
    recorded in a CUDA graph (training.cuda_graphs), where the optimizer has that setting."""
    name, args = s["optimizer"], dict(s["optimizer_args"])
    cls = optimizers()[name]
    if capturable and "capturable" in inspect.signature(cls).parameters:
        args.setdefault("capturable", True)
    if device.type == "cuda" and not {"fused", "foreach"} & set(args) and "fused" in inspect.signature(cls).parameters:
        try:
            return cls(params, lr=s["learning_rate"], fused=True, **args)
        except (RuntimeError, TypeError, ValueError):
            pass  # (e.g. a parameter dtype the kernel lacks): the default implementation, as if not asked
    try:
        return cls(params, lr=s["learning_rate"], **args)
    except (TypeError, ValueError, IndexError, KeyError, RuntimeError) as e:  # (betas: [0.5] is an IndexError)
        raise UserError(f"{where}.optimizer_args: {name}(lr={s['learning_rate']}, **{args}) failed: {e}") from None


def check_loaded_state(optimizer, fresh):
    """Raise a ValueError naming what a step of `optimizer` would fail on in the state it was
    loaded with (a setting of its groups as built, `fresh`, missing or of another kind; a
    parameter's state without a buffer the update reads): a damaged file, or one saved with other
    optimizer_args (amsgrad: true keeps one more buffer). Else the first step fails, after the run began."""
    name = type(optimizer).__name__
    for i, (group, built) in enumerate(zip(optimizer.param_groups, fresh)):
        for key, value in built.items():
            if key not in group:
                raise ValueError(f"{name}'s param_groups[{i}] has no {key}")
            if kind_of(value) and kind_of(group[key]) != kind_of(value):
                raise ValueError(f"{name}'s param_groups[{i}].{key} is {group[key]!r}, where {value!r} belongs")
    expected = {}  # by the parameter's number of dims (Adafactor keeps other buffers for a matrix)
    for p, state in optimizer.state.items():
        if p.dim() not in expected:
            expected[p.dim()] = state_keys(optimizer, p.dim())
        missing = sorted(expected[p.dim()] - set(state)) if expected[p.dim()] and state else []
        if missing:
            raise ValueError(f"the {name} state of a parameter of shape {list(p.shape)} has no {', '.join(missing)} "
                             "(saved with other optimizer_args?)")


def kind_of(value):
    """What kind of setting `value` is, for comparing a loaded one with the default (None: any)."""
    if isinstance(value, bool):
        return "flag"
    if isinstance(value, (int, float)) or torch.is_tensor(value) and value.dim() == 0:
        return "number"
    return "list" if isinstance(value, (tuple, list)) else "text" if isinstance(value, str) else None


def state_keys(optimizer, dims):
    """The buffers the state of a parameter of `dims` dimensions holds after one step of
    `optimizer`'s class and settings, found by stepping a copy on a throwaway parameter (None
    where that cannot be done)."""
    cls = type(optimizer)
    accepted = inspect.signature(cls).parameters
    args = {k: v for k, v in optimizer.defaults.items() if k in accepted and k not in IMPLEMENTATION}
    p = torch.nn.Parameter(torch.zeros((2,) * dims))
    p.grad = torch.ones((2,) * dims)
    try:
        probe = cls([p], **args)
        probe.step(lambda: torch.zeros(()))  # (a closure, for the optimizers that need one)
    except Exception:
        return None
    return set(probe.state[p])


def place_step_counts(optimizer):
    """Put each parameter's step count where this optimizer's implementation keeps it: beside the
    parameter for fused and capturable updates, on the CPU otherwise. load_state_dict places it by
    the saved optimizer's implementation, which a resumed run may have switched."""
    for group in optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(p.device if on_device else "cpu", torch.float32)


def make_scheduler(optimizer, s, steps_per_epoch, n_epochs, where):
    """The learning-rate schedule of one network. StepLR takes the seed's learning_rate_step and
    learning_rate_gamma; a schedule with a total length (OneCycleLR) gets the run's, in steps or
    epochs as scheduler_interval says, unless its args give one."""
    name, args = s["scheduler"], dict(s["scheduler_args"])
    if name == "StepLR":
        args |= {"step_size": s["learning_rate_step"], "gamma": s["learning_rate_gamma"]}
    if fills_total_length(s):
        args["total_steps"] = n_epochs * (steps_per_epoch if s["scheduler_interval"] == "step" else 1)
    try:
        return schedulers()[name](optimizer, **args)
    except (TypeError, ValueError, IndexError, KeyError, RuntimeError) as e:
        raise UserError(f"{where}.scheduler_args: {name}({kwargs_text(args)}) failed: {e}") from None


def fills_total_length(s):
    """Whether make_scheduler gives this schedule the run's length (which then depends on n_epochs)."""
    return "total_steps" in inspect.signature(schedulers()[s["scheduler"]]).parameters and \
        s["scheduler_args"].get("total_steps") is None and s["scheduler_args"].get("epochs") is None

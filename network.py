"""One trained network (the generator, or the discriminator of a GAN) and everything that
changes as it trains: its optimizer and learning-rate schedule, fp16 gradient scaler, gradient
clipping, DDP wrapper, the generator's moving average (EMA) and its loss history.

The Trainer (train_base.py) holds one `Network` per trained network and says what each loss
is; a Network knows how to turn that loss into one optimizer step: zero the gradients, run
backward over the micro-batches (with DDP reducing them once, on the last), clip, step (or
skip a non-finite update) and update the EMA. `state_dict()` / `load_state_dict()` are what a
checkpoint keeps of it; `checkpoint_entries` and `network_state` lay them out in the
checkpoint's keys.
"""
import contextlib
import inspect
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from errors import UserError, kwargs_text
from registry import optimizers, schedulers

# The config section that sets each network's optimizer and schedule.
SECTION = {"generator": "training", "discriminator": "adversarial"}
# The settings that shape a network's learning-rate schedule (compared when resuming).
SCHEDULE_KEYS = ["learning_rate", "scheduler", "scheduler_args", "scheduler_interval", "learning_rate_step",
                 "learning_rate_gamma"]


class Network:
    """The network `name` (generator or discriminator) of `model`, and the state of training it,
    set up from the validated config `cfg`. `module` holds its components of the model as one
    module, sharing their weights: what its optimizer trains, DDP wraps and the EMA averages."""

    def __init__(self, name, model, cfg, placement, steps_per_epoch):
        train, adv = cfg["training"], cfg["adversarial"]
        self.name, self.section = name, SECTION[name]
        self.module = module = model.components_of(name)
        self.architecture_path = model.architecture_path
        self.settings = cfg[self.section]  # the section's validated values (null adversarial keys copy training's)
        self.source = cfg["config_path"]
        self.where = f"{self.source}: {self.section}"
        self.params = list(module.parameters())
        self.world_size = placement.world_size
        self.steps_per_epoch, self.n_epochs = steps_per_epoch, train["n_epochs"]
        self.optimizer = make_optimizer(self.params, self.settings, placement.device, self.where, train["cuda_graphs"])
        self.scheduler = make_scheduler(self.optimizer, self.settings, steps_per_epoch, self.n_epochs, self.where)
        self.every_step = self.settings["scheduler_interval"] == "step"
        # The settings a resume compares with the checkpoint's to decide whether the schedule carries on.
        self.schedule_settings = {f"{self.section}.{k}": self.settings[k] for k in SCHEDULE_KEYS}
        if fills_total_length(self.settings):  # the schedule's length is the run's
            self.schedule_settings["training.n_epochs"] = self.n_epochs
        if self.every_step:  # it counts optimizer steps, which batches per step decide
            self.schedule_settings["training.grad_accumulation_steps"] = train["grad_accumulation_steps"]
        adversarial = adv["enable_adversarial_training"]
        self.iterations = adv["n_gen_iterations" if name == "generator" else "n_disc_iterations"] if adversarial else 1
        self.clip = (train if name == "generator" else adv)["grad_clip_norm"]
        # fp16: a scaler keeps small gradients from flushing to zero (bf16 has fp32's range: none needed).
        self.scaler = torch.amp.GradScaler(placement.device.type) if train["precision"] == "fp16" else None
        decay = train["ema_decay"] if name == "generator" else None
        self.ema = None if decay is None else AveragedModel(
            module, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.ddp = None  # set by wrap_for_ddp
        self.unused_checked = False
        self.loss_history = {}  # term -> one value per step
        self.validation_history = {}  # term -> one value per validated epoch

    @property
    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def describe(self):
        """One line of train.py's start-up header: what this network trains with, as resolved
        (a key the config left out shows the value it got, e.g. one copied from training)."""
        s, args = self.settings, kwargs_text(self.settings["optimizer_args"])
        schedule = {k: v for k, v in self.scheduler.state_dict().items()
                    if k in ("step_size", "gamma", "T_max", "eta_min", "total_steps", "max_lr", "factor", "patience")}
        n_params = sum(p.numel() for p in self.params)
        fused = ", fused=True" if self.optimizer.defaults.get("fused") and "fused" not in s["optimizer_args"] else ""
        optimizer = f"{s['optimizer']}(lr={s['learning_rate']:g}{', ' + args if args else ''}{fused})"
        return (f"{self.name} ({self.section}.*): {optimizer}, {s['scheduler']}({kwargs_text(schedule)}) per "
                f"{s['scheduler_interval']}, clip "
                f"{self.clip if self.clip else 'none'}, {self.iterations} update(s) per batch, {n_params:,} parameters"
                f"{', EMA of its weights' if self.ema is not None else ''}")

    # ---- one update ----
    def update(self, loss, sizes, skip_nonfinite):
        """One optimizer step on the gradients of the micro-batches: `loss(i)` gives the (total,
        terms) of micro-batch i, and `sizes` their sample counts; each counts for its share of
        the samples, so that they step as one batch of all of them would. Under DDP the gradients
        are averaged over the processes during the last micro-batch's backward pass. Returns the
        loss terms (detached, float, averaged over the micro-batches, 'total' first, still on the
        device) and whether the update was made: with `skip_nonfinite`, False when a loss was
        non-finite (on any process), and the gradients were dropped. Only that check reads a
        value back from the device (one sync per update); without it the step never waits for
        the device."""
        self.optimizer.zero_grad(set_to_none=True)
        n_samples, last = sum(sizes), len(sizes) - 1
        sums, bad = {}, None
        for i, size in enumerate(sizes):
            weight = size / n_samples  # a short last batch of the epoch counts for its samples
            # DDP all-reduces once per step: not after the micro-batches before the last.
            with self.ddp.no_sync() if self.ddp is not None and i < last else contextlib.nullcontext():
                total, terms = self.ddp(loss, i) if self.ddp is not None else loss(i)
                self.backward(total * weight if last else total)
            for name, value in {"total": total, **terms}.items():  # (float: autocast may give half precision)
                value = value.detach().float()
                if last:
                    value = value * weight
                sums[name] = sums[name] + value if name in sums else value
            if skip_nonfinite:
                finite = torch.isfinite(total.detach())
                bad = ~finite if bad is None else bad | ~finite
        if self.ddp is not None and not self.unused_checked:  # (a NaN loss leaves gradients too)
            self.check_every_parameter_trained()
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

    # ---- DDP ----
    def wrap_for_ddp(self):
        self.ddp = wrap_for_ddp(NetworkLoss(self.module))

    def check_every_parameter_trained(self):
        """Under DDP each of the network's parameters must get a gradient in every update: DDP
        reduces them in buckets and would fail at the next step, with a message naming neither
        the parameters nor the file to fix. Checked after the network's first update."""
        unused = [name for name, p in self.module.named_parameters() if p.requires_grad and p.grad is None]
        if unused:
            shown = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
            method = "forward" if self.name == "generator" else "discriminate"
            raise UserError(f"{self.source}: model.model_flow_path: under DDP every parameter of the {self.name} "
                            f"must take part in its loss, but {shown} got no gradient; call each of the {self.name}'s "
                            f"submodels in the flow's {method}, or drop unused ones from {self.architecture_path}")
        self.unused_checked = True

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
        note = self.load_schedule(state, saved_cfg, steps_done, epochs_done) if state["optimizer"] else None
        if self.ema is not None and state["ema"]:
            self.ema.module.load_state_dict(state["ema"])
            self.ema.n_averaged.fill_(state["ema_updates"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.loss_history = state["loss_history"] or {}
        self.validation_history = state["validation_history"] or {}
        return note

    def load_schedule(self, state, saved_cfg, steps_done, epochs_done):
        saved = saved_cfg[self.section]
        if self.settings["optimizer"] != saved["optimizer"]:
            return (f"{self.section}.optimizer changed ({saved['optimizer']} -> {self.settings['optimizer']}): the "
                    f"{self.name}'s optimizer starts afresh")
        fresh = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        built = [{k: group[k] for k in IMPLEMENTATION if k in group} for group in fresh]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, implementation in zip(self.optimizer.param_groups, built):
            # load_state_dict copies the saved groups' settings, including how the update ran
            # (fused on the GPU that saved it, say): keep this run's, and the config's arguments.
            group.update(implementation | self.settings["optimizer_args"])
        place_step_counts(self.optimizer)
        check_loaded_state(self.optimizer, fresh)
        before = {path: read_key(saved_cfg, path) for path in self.schedule_settings}
        changed = [path for path, value in self.schedule_settings.items() if value != before[path]]
        if not changed and isinstance(state["scheduler"], dict):
            self.scheduler.load_state_dict(state["scheduler"])
            return None
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] = self.settings["learning_rate"]
        self.scheduler = make_scheduler(self.optimizer, self.settings, self.steps_per_epoch, self.n_epochs, self.where)
        done = steps_done if self.every_step else epochs_done
        with warnings.catch_warnings():  # stepping a schedule without optimizer steps is the point here
            warnings.simplefilter("ignore")
            if not isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                for _ in range(done):
                    self.scheduler.step()
        why = f"{', '.join(changed)} changed" if changed else "the checkpoint holds no schedule state"
        return (f"{why}: the {self.name}'s {self.settings['scheduler']} schedule is rebuilt "
                f"and advanced {done} {'steps' if self.every_step else 'epochs'} (learning rate now {self.lr:.4g})")


def read_key(cfg, path):
    """A saved config's value at 'section.key' (an older config may lack the key)."""
    section, key = path.split(".")
    return cfg[section].get(key, 1 if key == "grad_accumulation_steps" else None)


def checkpoint_entries(networks):
    """The networks' part of a checkpoint ({name: Network}), under the keys checkpoints have
    always had: the generator's optimizer as optimizer_state_dict, the discriminator's as
    disc_optimizer_state_dict (None without one), and so on."""
    states = {name: net.state_dict() for name, net in networks.items()}
    generator, discriminator = states["generator"], states.get("discriminator", {})
    return {"optimizer_state_dict": generator["optimizer"], "scheduler_state_dict": generator["scheduler"],
            "disc_optimizer_state_dict": discriminator.get("optimizer"),
            "disc_scheduler_state_dict": discriminator.get("scheduler"),
            "scaler_state_dicts": {name: s["scaler"] for name, s in states.items() if s["scaler"] is not None},
            "ema_state_dict": generator["ema"], "ema_updates": generator["ema_updates"],
            "loss_history": {name: s["loss_history"] for name, s in states.items()}}


def network_state(checkpoint, name):
    """One network's state_dict out of a checkpoint (what checkpoint_entries wrote); a part the
    checkpoint lacks is None."""
    prefix = "disc_" if name == "discriminator" else ""
    generator = name == "generator"
    return {"optimizer": checkpoint.get(f"{prefix}optimizer_state_dict"),
            "scheduler": checkpoint.get(f"{prefix}scheduler_state_dict"),
            "scaler": checkpoint.get("scaler_state_dicts", {}).get(name),
            "ema": checkpoint.get("ema_state_dict") if generator else None,
            "ema_updates": checkpoint.get("ema_updates", 0) if generator else 0,
            "loss_history": checkpoint["loss_history"].get(name),
            "validation_history": checkpoint.get("validation_history", {}).get(name)}


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
    """DDP over `module` (a network's NetworkLoss). Buffers are not synchronised at every forward
    pass: Trainer.share_buffers hands rank 0's to all before a validation pass or a save, where
    running statistics are read. (Each process's EMA averages its own buffers; rank 0's EMA is
    saved.)"""
    parameters = inspect.signature(DistributedDataParallel).parameters
    # torch 2.13 renamed broadcast_buffers (which now warns) to forward_sync_buffers
    keyword = "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"
    return DistributedDataParallel(module, **{keyword: False})

"""What a checkpoint holds of a training run beyond its weights, and going on from it: the loop's
place (epoch, step, batches done), every network's state (network.py), the validation history,
the best so far (saving.keep_best), the classes and the random generators. `torch.save` of
`training_state` is the checkpoint; `restore` puts a loaded one back into a Trainer."""
import operator

import numpy as np
import yaml

from dataset_base import check_same_classes
from engine.config import to_yaml
from engine.errors import UserError
from engine.network import checkpoint_entries, network_state
from engine.placement import rng_state, set_rng_state
from engine.runs import BEST, first_line


def training_state(trainer, early_stop):
    """The checkpoint of `trainer` now (`early_stop`: written by Ctrl-C or SIGTERM, part way)."""
    return {"model_state_dict": trainer.model.state_dict(), **checkpoint_entries(trainer.networks),
            "epoch": trainer.epoch, "step": trainer.step, "batches_done_in_epoch": trainer.batches_done,
            "early_stop": early_stop, "skipped_updates": trainer.stepper.skipped_updates,
            "validation_history": trainer.validation.history, "split": split_record(trainer.cfg, trainer.loader),
            "world_size": trainer.placement.world_size, "config": to_yaml(trainer.cfg), "best": trainer.best,
            "classes": trainer.classes, "architecture": trainer.model.architecture_text, "rng_state": rng_state()}


def restore(trainer, state, path):
    """Go on from a checkpoint's training state (its weights are loaded already). Its layout was
    checked (runs.check_checkpoint); what is inside an optimizer's, scheduler's or random
    generator's state is torch's to read, and what it raises means a damaged file."""
    try:
        restore_state(trainer, state)
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        raise UserError(f"{path}: its training state does not load ({type(e).__name__}: {first_line(e)}); the "
                        "file is damaged or not this pipeline's: resume from an earlier checkpoint") from None


def restore_state(trainer, state):
    saved_cfg = yaml.safe_load(state["config"])
    if not isinstance(saved_cfg, dict) or not all(isinstance(saved_cfg.get(k), dict) for k in ("training",
                                                                                              "adversarial")):
        raise ValueError("the config it keeps is not a training config")
    check_resumable(state, saved_cfg, trainer.accumulate, trainer.placement.world_size, trainer.source)
    trainer.epoch, trainer.step, trainer.batches_done = state["epoch"], state["step"], state["batches_done_in_epoch"]
    steps_done = trainer.epoch * trainer.steps_per_epoch + trainer.batches_done
    for name, net in trainer.networks.items():
        note = net.load_state_dict(network_state(state, name), saved_cfg, steps_done, trainer.epoch)
        if note:
            trainer.notes.append(note)
    check_same_classes(state.get("classes"), trainer.classes, trainer.cfg["dataset"], "the checkpoint",
                       trainer.source)
    trainer.stepper.skipped_updates = state.get("skipped_updates", 0)
    trainer.validation.steps = state.get("validation_history", {}).get("step", [])
    saved_best = state.get("best")  # the best so far, if it was judged as now
    if trainer.best and saved_best:
        now, then = (trainer.best["key"], trainer.best["mode"]), (saved_best["key"], saved_best["mode"])
        if now == then:
            trainer.best = dict(saved_best)
        else:
            trainer.notes.append(f"saving.keep_best: now {now[0]} ({now[1]}), was {then[0]} ({then[1]}): the best "
                                 "is judged afresh")
    set_rng_state(state["rng_state"])


def improves(best, values, epoch):
    """Whether saving.keep_best's key, among an epoch's `values` ({metrics.jsonl key: value}),
    beats the best so far (`best`: {key, mode, value, epoch}, None without keep_best); if so,
    `best` now holds it."""
    value = values.get(best["key"]) if best else None
    if value is None or not np.isfinite(value):
        return False
    better = operator.lt if best["mode"] == "min" else operator.gt
    if best["value"] is not None and not better(value, best["value"]):
        return False
    best |= {"value": value, "epoch": epoch}
    return True


def keep_if_best(trainer, values, bar):
    """Save the best checkpoint when saving.keep_best's key beats the best so far (rank 0 writes it)."""
    if improves(trainer.best, values, trainer.epoch) and trainer.placement.is_main:
        path = trainer.run.save_best(training_state(trainer, early_stop=False))
        bar.write(f"epoch {trainer.epoch}: best {trainer.best['key']} so far ({trainer.best['value']:.6g}): "
                  f"saved {path.name}")


def best_line(best, run):
    """The best checkpoint's line at the end of training ('' without one)."""
    if not best or best["epoch"] is None:
        return ""
    return (f"\nbest checkpoint: {run.folder / BEST.format(prefix=run.prefix)} (epoch {best['epoch']}, {best['key']} "
            f"{best['value']:.6g})")


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



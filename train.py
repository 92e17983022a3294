"""Train a model from a training config (plain or adversarial, CPU, one GPU, or DDP).

    python train.py -t configs/example_model/example_training_cfg.yaml
    torchrun --standalone --nnodes=1 --nproc_per_node=2 train.py -t configs/example_model/example_multigpu_training_cfg.yaml
"""  # noqa: E501  (the commands as the README gives them)
import argparse
from pathlib import Path

from engine.cli import add_training_cfg, answer_early, make_parser


def parse_args(argv):
    parser = make_parser(__doc__.splitlines()[0], "python train.py -t configs/example_model/example_training_cfg.yaml")
    add_training_cfg(parser)
    sweep = parser.add_argument_group("sweeps (docs/runs.md)")
    sweep.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                       help="train one run per value (YAML; repeat for a grid over several keys), e.g. --sweep "
                            "training.learning_rate=1e-4,5e-4 --sweep training.seed=0,1,2; with --sweep-trials, "
                            "also KEY=loguniform(LOW,HIGH), uniform(LOW,HIGH), randint(LOW,HIGH) or choice(V1,V2)")
    sweep.add_argument("--sweep-trials", type=positive, metavar="K",
                       help="draw K configurations of the drawn keys (each crossed with the listed values)")
    sweep.add_argument("--sweep-seed", type=int, default=0, metavar="S", help="seed of the draws (default 0)")
    sweep.add_argument("--jobs", type=positive, default=1, metavar="N",
                       help="train up to N of a sweep's runs at once, as separate processes (default 1)")
    parser.add_argument("--run-folder", metavar="DIR", help="train into this run folder: resume its newest "
                        "checkpoint, or start there (how a sweep starts its runs)")
    args = parser.parse_args(argv)
    if not args.sweep and (args.sweep_trials or args.jobs != 1):
        parser.error("--sweep-trials and --jobs go with --sweep")
    if args.sweep and args.run_folder:
        parser.error("--run-folder is one run's; a sweep gives each run its own")
    return args


def positive(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return int(text)


answer_early(__name__, parse_args)  # --help in a fraction of a second: before torch is imported

import torch
import torch.distributed as dist

from dataset import EpochBatches, FixedBatches, build_dataset, loading_settings, make_loader, on_device
from dataset_base import load_streams, split_indices, value_range
from engine import metrics
from engine.cli import check_batches_fit_model, check_data_fits_model
from engine.config import config_changes, load_training_config
from engine.errors import UserError, did_you_mean, run_main
from engine.loop import Trainer
from engine.model_base import build_model
from engine.network import Step, describe
from engine.placement import seed_everything, set_num_threads, setup_placement
from engine.preflight import check_step, check_whole_step
from engine.runs import (
    BEST,
    Run,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    newest_checkpoint,
    run_folders,
    saved_config,
)
from engine.sample_metrics import prepare
from engine.sampling import first_samples
from engine.sweep import run_sweep


def main(argv):
    args = parse_args(argv)
    if args.sweep:
        run_sweep(args.training_cfg, args.overrides, args.sweep, args.sweep_trials, args.sweep_seed, args.jobs,
                  check=lambda cfg: train(cfg, setup_placement(cfg["training"]["gpus"], args.training_cfg),
                                          args.training_cfg, check_only=True),
                  script=str(Path(__file__).resolve()))
        return
    cfg = load_training_config(args.training_cfg, args.overrides)
    placement = setup_placement(cfg["training"]["gpus"], args.training_cfg)
    set_num_threads(cfg["training"]["num_threads"], placement)
    try:
        train(cfg, placement, args.training_cfg, args.run_folder)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(cfg, placement, source, run_folder=None, check_only=False):
    """Train `cfg` (into `run_folder` when given); with `check_only`, stop once every check and
    the trial step have passed, before anything is written."""
    seed = cfg["training"]["seed"]
    seed_everything(seed)
    model = build_model(cfg["model"])
    loader, validation_loader = make_loaders(cfg, model, placement, source)
    path = folder_checkpoint(run_folder) or resume_path(cfg, source, quiet=check_only or run_folder is not None)
    resume = load_checkpoint(path, resume=True) if path else None
    if resume:
        load_weights(model, resume, path)
    if run_folder is not None:
        run = Run.of(cfg, Path(run_folder))
    else:
        run = Run.of(cfg, path.parent) if path and holds_run(cfg, path.parent) else Run.new(cfg)
    samples = sample_metrics(cfg, model, loader, validation_loader, placement, source)
    trainer = Trainer(cfg, model, loader, placement, resume, validation_loader, run, samples, resume_path=path)
    if trainer.finished:
        budget = f"epoch {trainer.epoch} (training.n_epochs: {trainer.n_epochs})"
        if trainer.budget.out_of_steps(trainer.step):
            budget = f"step {trainer.step} (training.max_steps: {trainer.budget.max_steps})"
        print(f"{path} is already at {budget}; nothing to do")
        return
    # The first samples through one step, phase by phase (naming the stream and layer that does
    # not fit), as many as the smallest batch of an epoch holds, up to two (enough for a BatchNorm).
    first = first_samples(loader.dataset, trial_size(loader))
    made = said_of_one_sample(trainer.loader, first, lambda: check_step(
        trainer.losses, first, source, trainer.update_order, Step(trainer.step, trainer.epoch + 1)))
    kind = metrics.kind_of(made["outputs"], model.split_batch(first)[1], trainer.validation.paired)
    made["metrics"] = metrics.names_of(kind, made["outputs"], trainer.validation.value_range)
    check_step_gives(made, samples, trainer.best, trainer.validation.quality_network, source)
    check_classes_fit(made, trainer.classes, model, source)
    # Then the whole step, as training runs it, and everything it changed put back.
    held_out = first_samples(validation_loader.dataset, 2) if validation_loader is not None else None
    said_of_one_sample(trainer.loader, first, lambda: check_whole_step(trainer, first, held_out, source))
    # Everything is checked; only now is anything written.
    if check_only:
        return
    if placement.is_main:
        if run.folder is None:
            run.claim()
        print(header(trainer, loader, validation_loader, run, path, placement))
        if kind == "images" and trainer.validation.value_range is not None:
            print(validation_range_line(trainer.validation.value_range, made["metrics"], model.target_key))
        if resume:
            changes = config_changes(saved_config(resume, cfg), cfg)
            print(f"config changes since {path.name}:" + "".join(f"\n  {c}" for c in changes) if changes else
                  f"same config as {path.name}")
            for note in trainer.notes:
                print(note)
    trainer.fit()


def sample_metrics(cfg, model, loader, validation_loader, placement, source):
    """The sample_metrics section ready to measure (None when off), its feature extractor loaded:
    the generator's inputs and the real samples of the first n_samples held-out samples (or
    training samples, without their training-only transforms)."""
    section, where = cfg["sample_metrics"], f"{source}: sample_metrics"
    if section["every_epochs"] is None:
        return None
    data = validation_loader.dataset if validation_loader is not None else \
        build_dataset(loader.dataset.streams, cfg["dataset"], loader.dataset.indices, False, f"{source}: dataset")
    inputs, real = model.split_batch(first_samples(data, section["n_samples"]))
    return prepare(section["metrics"], section, real, where, placement.device, inputs,
                   value_range(cfg["dataset"], model.target_key, real) if real is not None else None)


def trial_size(loader):
    """The trial step's batch size: the smallest batch an epoch makes (its last may be short), at
    most two samples."""
    batches = loader.batch_sampler
    last = batches.num_samples % batches.batch_size or batches.batch_size
    return min(2, last)


def said_of_one_sample(loader, first, check):
    """`check()` (a trial on the samples `first`); when they are one because the epoch's last
    batch holds one, its failure says so (a BatchNorm cannot train on one sample, nor can a loss
    on batch statistics)."""
    try:
        return check()
    except UserError as e:
        batches, n = loader.batch_sampler, len(next(iter(first.values())))
        if n > 1 or batches.batch_size == 1:
            raise
        raise UserError(f"{e}\n  (one sample, as the last batch of every epoch holds: {batches.num_samples} training "
                        f"samples per process at training.batch_size {batches.batch_size}; a batch_size that divides "
                        f"them, or one sample fewer or more, avoids it)") from None


def check_step_gives(made, samples, best, quality_network, source):
    """What the trial step made (preflight.check_step) is what the sample metrics and
    saving.keep_best need: outputs shaped like the real samples, the loss term named (the
    outputs' metrics are logged beside `quality_network`'s terms)."""
    if samples is not None and made["outputs"] != list(samples.real.shape[1:]):
        raise UserError(f"{source}: sample_metrics: the generator's outputs are {made['outputs']} per sample, the "
                        f"real samples {list(samples.real.shape[1:])}; sample metrics compare the two")
    if best and best["key"].startswith("validation/"):
        _, network, term = best["key"].split("/")
        terms = made["terms"].get(network, []) + (made["metrics"] if network == quality_network else [])
        if term not in terms:
            raise UserError(f"{source}: saving.keep_best: {best['key']}: no such term{did_you_mean(term, terms)}; "
                            f"the {network}'s validation logs {', '.join(terms)}")


def check_classes_fit(made, classes, model, source):
    """A classifier scores at least as many classes as its class folders hold."""
    names = classes.get(model.target_key)
    if names and len(made["outputs"]) == 1 and made["outputs"][0] < len(names):
        raise UserError(f"{source}: the model gives {made['outputs'][0]} class scores per sample, but "
                        f"dataset.{model.target_key} has {len(names)} classes ({', '.join(names)}); set the last "
                        f"layer's out_features to {len(names)} in {model.architecture_path}")


def header(trainer, loader, validation_loader, run, path, placement):
    """What will run, before it runs: the networks' settings, the data and the run's folder."""
    if path is None:
        start = "a new run, from scratch"
    elif path.parent == run.folder:
        start = f"resuming {path.name}"
    else:  # see holds_run
        start = f"a new run, from {path} (a checkpoint of another save_folder_name)"
    lines = [trainer.model.summary(), f"run folder: {run.folder}", f"  {start}"]
    lines += [f"  {describe(net)}" for net in trainer.networks.values()]
    train = trainer.cfg["training"]
    lines.append(f"  precision {train['precision']}, batch {train['batch_size']} x {trainer.accumulate} batch(es) "
                 f"per step x {placement.world_size} process(es), {trainer.steps_per_epoch} steps per epoch, "
                 f"{trainer.n_epochs} epochs, device {placement.device}{' (DDP)' if placement.distributed else ''}"
                 + (f", {torch.get_num_threads()} CPU thread(s)" if placement.device.type == "cpu" else ""))
    held_out = f", {len(validation_loader.dataset)} held out for validation" if validation_loader else ""
    device = getattr(next(iter(loader.dataset.streams.values())), "device", torch.device("cpu"))
    on_gpu = f"; on {device}, batches cut there (dataset.on_device)" if device.type == "cuda" else ""
    lines.append(f"  data: {len(loader.dataset)} training samples{held_out}{on_gpu}; streams:")
    lines += [f"    {name}: {len(stream)} x {list(stream.shape[1:])} {str(stream.dtype).removeprefix('torch.')}"
              for name, stream in loader.dataset.streams.items()]
    logging = trainer.cfg["logging"]
    lines.append(f"  logging: metrics.jsonl every {train['log_interval']} steps; TensorBoard "
                 f"{'on (tensorboard --logdir ' + str(run.folder.parent) + ')' if trainer.tensorboard else 'off'}; "
                 f"samples every {logging['image_every']} epoch(s)")
    if trainer.samples is not None:
        lines.append(f"  sample metrics: {', '.join(trainer.samples.metrics)} of {len(trainer.samples.real)} samples "
                     f"every {trainer.sample_every} epoch(s), {trainer.samples.features.name}")
    if trainer.best:
        lines.append(f"  best checkpoint by {trainer.best['key']} ({trainer.best['mode']}): "
                     f"{run.folder / BEST.format(prefix=run.prefix)}")
    return "\n".join(lines)


def validation_range_line(value_range, names, stream):
    """What validation's PSNR and SSIM measure against: the target stream's range and how it is
    known (outputs clamped to it), or why they are left out."""
    if not names:
        return f"  validation psnr, ssim: left out, the range of {stream} is {value_range.how}"
    return (f"  validation {', '.join(names)}: {stream} on [{value_range.low:g}, {value_range.high:g}], "
            f"{value_range.how}; outputs clamped to it")


def holds_run(cfg, folder):
    """Whether `folder` is one of the runs of cfg's save_folder_name: a resume continues in its
    checkpoint's run; one from another save_folder_name's checkpoint starts a new run of this one
    (from that checkpoint), so that two configs never write into one run."""
    return folder.resolve() in {f.resolve() for f in run_folders(cfg)}


def make_loaders(cfg, model, placement, source):
    """The training loader, and the validation loader (None without a split), checked against the model."""
    data, seed, batch_size = cfg["dataset"], cfg["training"]["seed"], cfg["training"]["batch_size"]
    where = f"{source}: dataset"
    streams = load_streams(data, seed, source)
    check_data_fits_model(streams, model, cfg["adversarial"]["enable_adversarial_training"], source)
    train_indices, validation_indices = split_indices(len(streams[data["data_len_key"]]), data["validation_fraction"],
                                                      data["split_seed"], where)
    training = build_dataset(streams, data, train_indices, True, where)
    validation = None if validation_indices is None else build_dataset(streams, data, validation_indices, False, where)
    check_batches_fit_model({"training": training, "validation": validation}, model, source)
    if validation is not None and len(validation) < placement.world_size:
        raise UserError(f"{where}.validation_fraction: {len(validation)} validation samples for "
                        f"{placement.world_size} processes; every process needs at least one")
    world, rank = placement.world_size, placement.rank
    if on_device(data, [d for d in (training, validation) if d is not None], placement.device, where):
        loading, device = {}, placement.device  # batches cut on the GPU, in this process
    else:
        loading, device = loading_settings(data, training, placement.device.type == "cuda", world, where), None
    loader = make_loader(training, EpochBatches(len(training), batch_size, seed, True, world, rank, device), **loading)
    if validation is None:
        return loader, None
    return loader, make_loader(validation, FixedBatches(len(validation), batch_size, data["split_seed"], world, rank,
                                                        device), **loading)


def folder_checkpoint(run_folder):
    """The newest checkpoint of --run-folder, or None (a folder without one starts there)."""
    if run_folder is None:
        return None
    if Path(run_folder).exists() and not Path(run_folder).is_dir():
        raise UserError(f"--run-folder {run_folder}: a file, not a folder")
    found = list_checkpoints(run_folder) if Path(run_folder).is_dir() else []
    return found[-1] if found else None


def resume_path(cfg, source, quiet=False):
    """The checkpoint to resume from, if any. `latest` with no checkpoint yet starts a new run,
    so one command both starts a (preemptible) job and resumes it; `quiet` (a check, or a run
    folder of its own): and says nothing, as `latest` of another run is never this run's."""
    spec = cfg["model"]["model_checkpoint_filename"]
    if spec == "latest" and (quiet or newest_checkpoint(cfg) is None):
        if not quiet:
            print("model.model_checkpoint_filename: latest, but there is no checkpoint yet: starting a new run")
        return None
    return find_checkpoint(cfg, spec, f"{source}: model.model_checkpoint_filename")


if __name__ == "__main__":
    run_main(main)

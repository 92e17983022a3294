"""Train a model from a training config (plain or adversarial, CPU, one GPU, or DDP).

    python train.py -t configs/example_model/example_training_cfg.yaml
    torchrun --standalone --nnodes=1 --nproc_per_node=2 train.py -t configs/example_model/example_multigpu_training_cfg.yaml
"""
import torch.distributed as dist
import yaml

from checkpoint import atomic_write, list_checkpoints, load_checkpoint, resolve_checkpoint, timestamp
from cli import add_training_cfg, check_data_fits_model, load_weights, make_parser
from config import checkpoint_dir, config_changes, load_training_config, to_yaml
from dataset import build_dataset, make_loader
from dataset_base import load_streams
from errors import run_main
from model_base import build_model
from train_base import Trainer, seed_everything, setup_placement


def main(argv):
    parser = make_parser(__doc__.splitlines()[0], "python train.py -t configs/example_model/example_training_cfg.yaml")
    add_training_cfg(parser)
    args = parser.parse_args(argv)
    cfg = load_training_config(args.training_cfg, args.overrides)
    placement = setup_placement(cfg["training"]["gpus"], args.training_cfg)
    try:
        train(cfg, placement, args.training_cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(cfg, placement, source):
    seed = cfg["training"]["seed"]
    seed_everything(seed)
    model = build_model(cfg["model"])
    streams = load_streams(cfg["dataset"], seed, source)
    check_data_fits_model(streams, model, source)
    # Each process draws its own batch-transform randomness (noise, flips) under DDP.
    dataset = build_dataset(streams, cfg["dataset"], seed + placement.rank)
    loader = make_loader(dataset, cfg["training"]["batch_size"], seed, num_replicas=placement.world_size,
                         rank=placement.rank)
    path = resume_path(cfg, source)
    resume = load_checkpoint(path) if path else None
    if resume:
        load_weights(model, resume, path)
    trainer = Trainer(cfg, model, loader, placement, resume)
    if trainer.finished:
        print(f"{path} is already at epoch {trainer.epoch} (training.n_epochs: {trainer.n_epochs}); nothing to do")
        return
    # Everything is checked; only now is anything written.
    if placement.is_main:
        print(model.summary())
        if resume:
            changes = config_changes(yaml.safe_load(resume["config"]), cfg)
            print(f"config changes since {path.name}:" + "".join(f"\n  {c}" for c in changes) if changes else
                  f"same config as {path.name}")
            for note in trainer.notes:
                print(note)
        print(f"{'resuming from ' + str(path) if path else 'training from scratch'}; "
              f"{len(dataset)} samples, {len(loader)} steps per epoch, device {placement.device}"
              f"{f' x {placement.world_size} processes' if placement.world_size > 1 else ''}")
        snapshot = to_yaml(cfg).encode()
        atomic_write(trainer.folder / f"training_cfg_{timestamp()}.yaml", lambda f: f.write(snapshot))
    trainer.fit()


def resume_path(cfg, source):
    """The checkpoint to resume from, if any. `latest` in a run with no checkpoints yet starts it,
    so one command both starts a (preemptible) job and resumes it."""
    spec = cfg["model"]["model_checkpoint_filename"]
    folder = checkpoint_dir(cfg)
    if spec == "latest" and not list_checkpoints(folder):
        print(f"model.model_checkpoint_filename: latest, but {folder} has no checkpoint yet: starting from scratch")
        return None
    return resolve_checkpoint(spec, folder, f"{source}: model.model_checkpoint_filename")


if __name__ == "__main__":
    run_main(main)

"""Train a model from a training config (plain or adversarial, CPU, one GPU, or DDP).

    python train.py -t configs/example_model/example_training_cfg.yaml
    torchrun --standalone --nnodes=1 --nproc_per_node=2 train.py -t configs/example_model/example_multigpu_training_cfg.yaml
"""
import torch.distributed as dist

from checkpoint import atomic_write, load_checkpoint, resolve_checkpoint, timestamp
from cli import add_training_cfg, check_data_fits_model, load_weights, make_parser
from config import checkpoint_dir, load_training_config, to_yaml
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
    train = cfg["training"]
    placement = setup_placement(train["gpus"], args.training_cfg)
    seed_everything(train["seed"])
    model = build_model(cfg["model"])
    streams = load_streams(cfg["dataset"], train["seed"], args.training_cfg)
    check_data_fits_model(streams, model, args.training_cfg)
    # Each process draws its own batch-transform randomness (noise, flips) under DDP.
    dataset = build_dataset(streams, cfg["dataset"], train["seed"] + placement.rank)
    loader = make_loader(dataset, train["batch_size"], train["seed"], num_replicas=placement.world_size,
                         rank=placement.rank)
    resume = None
    path = resolve_checkpoint(cfg["model"]["model_checkpoint_filename"], checkpoint_dir(cfg),
                              f"{args.training_cfg}: model.model_checkpoint_filename")
    if path is not None:
        resume = load_checkpoint(path)
        load_weights(model, resume, path)
    trainer = Trainer(cfg, model, loader, placement, resume)
    if trainer.finished:
        print(f"{path} is already at epoch {trainer.epoch} (training.n_epochs: {trainer.n_epochs}); nothing to do")
        return
    # Everything is checked; only now is anything written.
    if placement.is_main:
        print(model.summary())
        print(f"{'resuming from ' + str(path) if path else 'training from scratch'}; "
              f"{len(dataset)} samples, {len(loader)} steps per epoch, device {placement.device}"
              f"{f' x {placement.world_size} processes' if placement.world_size > 1 else ''}")
        snapshot = to_yaml(cfg).encode()
        atomic_write(trainer.folder / f"training_cfg_{timestamp()}.yaml", lambda f: f.write(snapshot))
    try:
        trainer.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)

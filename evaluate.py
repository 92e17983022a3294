"""Evaluate a trained model: run its inference path on the data, save a picture and metrics.

    python evaluate.py -t configs/example_model/example_training_cfg.yaml -e configs/example_model/example_evaluation_cfg.yaml

Writes results/<model>/<save_folder_name>/<checkpoint>_samples.png (outputs next to the data:
generated beside real samples for a GAN; input, output and target for paired data) and
<checkpoint>_metrics.json, and prints the metrics.
"""
import json
import math

import matplotlib
import torch
from torchvision.utils import make_grid
from tqdm import tqdm

from checkpoint import atomic_write
from cli import add_training_cfg, check_data_fits_model, load_trained_run, make_parser, split_overrides
from config import EVALUATION, load_config, results_dir
from dataset_base import load_streams
from errors import run_main
from train_base import select_device

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def main(argv):
    parser = make_parser(__doc__.splitlines()[0], "python evaluate.py -t configs/example_model/example_training_cfg.yaml "
                         "-e configs/example_model/example_evaluation_cfg.yaml")
    add_training_cfg(parser)
    parser.add_argument("-e", "--evaluation_cfg", required=True, metavar="YAML", help="the evaluation config")
    args = parser.parse_args(argv)
    eval_sets, train_sets = split_overrides(args.overrides, "evaluation")
    ev = load_config(args.evaluation_cfg, EVALUATION, eval_sets, "evaluation config")["evaluation"]
    cfg, model, path, _ = load_trained_run(args.training_cfg, ev["model_checkpoint_filename"],
                                           f"{args.evaluation_cfg}: evaluation.model_checkpoint_filename", train_sets)
    device = select_device(ev["gpus"], f"{args.evaluation_cfg}: evaluation.gpus")
    streams = load_streams(cfg["dataset"], cfg["training"]["seed"], args.training_cfg)
    check_data_fits_model(streams, model, args.training_cfg)
    inputs, targets = model.split_batch({k: v[:ev["n_samples"]] for k, v in streams.items()})
    model = model.to(device).eval()
    outputs = run_batched(model, inputs, ev["batch_size"], device)
    # Targets belong to inputs one by one when the flow says so, or when there is no GAN.
    adversarial = cfg["adversarial"]["enable_adversarial_training"]
    paired = model.paired_targets or not adversarial
    metrics = compute_metrics(model, inputs, outputs, targets, device, paired, adversarial)
    metrics["checkpoint"] = str(path)
    out_dir = results_dir(cfg)
    text = json.dumps(metrics, indent=2).encode()
    atomic_write(out_dir / f"{path.stem}_metrics.json", lambda f: f.write(text))
    print(json.dumps(metrics, indent=2))
    if outputs.dim() == 4 and outputs.shape[1] in (1, 3):
        image = out_dir / f"{path.stem}_samples.png"
        save_sample_grid(inputs if paired else None, outputs, targets, image, ev["grid_nrow"], title=path.name)
        print(f"saved {image}")


@torch.no_grad()
def run_batched(model, inputs, batch_size, device):
    starts = range(0, len(inputs), batch_size)
    return torch.cat([model(inputs[i:i + batch_size].to(device)).cpu()
                      for i in tqdm(starts, desc="evaluating", unit="batch", leave=False, disable=len(starts) < 4)])


@torch.no_grad()
def compute_metrics(model, inputs, outputs, targets, device, paired, adversarial):
    """Output statistics; with targets, how close outputs are to them (pairwise for paired data,
    by nearest neighbours for a GAN); with a trained discriminator, its mean score for real and
    for generated samples."""
    metrics = {"n_samples": len(outputs), "output_mean": outputs.mean().item(), "output_std": outputs.std().item(),
               "output_min": outputs.min().item(), "output_max": outputs.max().item()}
    if targets is None or targets.shape[1:] != outputs.shape[1:]:
        return metrics
    targets = targets.float()
    if paired:
        metrics |= pairwise_metrics(outputs, targets)
        if inputs.shape == targets.shape:  # what the model improves on (e.g. the noisy images themselves)
            metrics |= {f"input_{k}": v for k, v in pairwise_metrics(inputs.float(), targets).items()}
    else:
        # Mean distance from each output to its nearest target (are outputs like the data?) and from
        # each target to its nearest output (is all of the data covered, or did a GAN collapse?).
        # The mean distance from each target to its nearest other target is the level to compare with.
        flat_out, flat_tgt = outputs.flatten(1), targets.flatten(1)
        distances = torch.cdist(flat_out, flat_tgt)
        among = torch.cdist(flat_tgt, flat_tgt).fill_diagonal_(float("inf"))
        metrics |= {"output_to_nearest_target": distances.min(1).values.mean().item(),
                    "target_to_nearest_output": distances.min(0).values.mean().item(),
                    "target_to_nearest_other_target": among.min(1).values.mean().item()}
    if adversarial:
        real = model.discriminate(targets.to(device), inputs.to(device)).mean().item()
        fake = model.discriminate(outputs.to(device), inputs.to(device)).mean().item()
        metrics |= {"discriminator_score_real": real, "discriminator_score_generated": fake}
    return metrics


def pairwise_metrics(outputs, targets):
    """Mean absolute and squared error, and PSNR in dB with the targets' value range as the peak
    (max - min over the evaluated targets, e.g. 2 for data in [-1, 1])."""
    mse = torch.mean((outputs - targets) ** 2).item()
    peak = (targets.max() - targets.min()).item()
    psnr = 10 * math.log10(peak ** 2 / mse) if mse > 0 and peak > 0 else float("inf")
    return {"l1": torch.mean((outputs - targets).abs()).item(), "mse": mse, "psnr_db": psnr}


def save_sample_grid(inputs, outputs, targets, path, nrow, title):
    """Outputs beside the data on one shared colour scale: input, output and target for paired
    data (inputs given), generated beside real samples otherwise."""
    comparable = targets is not None and targets.shape[1:] == outputs.shape[1:]
    if inputs is not None and inputs.shape[1:] == outputs.shape[1:]:
        panels = [("input", inputs), ("output", outputs)] + ([("target", targets.float())] if comparable else [])
    else:
        panels = [("generated", outputs)] + ([("data", targets[:len(outputs)].float())] if comparable else [])
    low = min(p.min().item() for _, p in panels)
    high = max(p.max().item() for _, p in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5.4), squeeze=False)
    for ax, (name, images) in zip(axes[0], panels):
        grid = make_grid(images, nrow=nrow, padding=2, normalize=True, value_range=(low, high), pad_value=0.5)
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


if __name__ == "__main__":
    run_main(main)

"""Evaluate a trained model: run its inference path on the data, save a picture and metrics.

    python evaluate.py -t configs/example_model/example_training_cfg.yaml -e configs/example_model/example_evaluation_cfg.yaml

Writes to the results folder of the checkpoint's run, results/<model>/<save_folder_name>/run_<N>/,
files named <checkpoint>_<split>_<hash>_<kind>: <split> the samples evaluated (validation,
training or all) and <hash> 8 hex digits of the settings that shape the outputs (the resolved
evaluation section, the training config's dataset section and training.seed), so that evaluating
with other settings adds files and never replaces different ones; the same settings replace their
own. The files: <...>_metrics.json (with the evaluation settings under "evaluation"; with
evaluation.sample_metrics, a generator's FID, KID and precision/recall, see sample_metrics.py),
<...>_samples.png (outputs next to the data: generated beside real samples for a GAN; input,
output and target for paired data; inputs titled with their predicted and true class for a
classifier) and, for a classifier, <...>_confusion.png. Prints the metrics and the files' paths.
"""  # noqa: E501  (the command as the README gives it)
from engine.cli import add_training_cfg, answer_early, make_parser


def parse_args(argv):
    parser = make_parser(__doc__.splitlines()[0],
                         "python evaluate.py -t configs/example_model/example_training_cfg.yaml "
                         "-e configs/example_model/example_evaluation_cfg.yaml")
    add_training_cfg(parser)
    parser.add_argument("-e", "--evaluation_cfg", required=True, metavar="YAML", help="the evaluation config")
    return parser.parse_args(argv)


answer_early(__name__, parse_args)  # --help in a fraction of a second: before torch is imported

import hashlib
import json
import math
import textwrap

import matplotlib
import torch
from tqdm import tqdm

from dataset import FixedBatches, build_dataset
from dataset_base import check_same_classes, load_streams, split_indices, stream_classes, value_range
from engine.cli import (
    check_batches_fit_model,
    check_data_fits_model,
    select_device,
    split_overrides,
    targets_are_paired,
)
from engine.config import EVALUATION, load_config
from engine.dashboard import PAD, grid_columns, image_grid, scale_note, to_unit_range
from engine.errors import UserError, run_main
from engine.metrics import batch_sums, finish, ssim_window
from engine.model_base import as_tuple, batch_size_of, index_inputs, inputs_to, run_model
from engine.preflight import check_outputs
from engine.runs import Run, load_trained_run
from engine.sample_metrics import prepare

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def main(argv):
    args = parse_args(argv)
    eval_sets, train_sets = split_overrides(args.overrides, "evaluation")
    ev = load_config(args.evaluation_cfg, EVALUATION, eval_sets, "evaluation config")["evaluation"]
    where = f"{args.evaluation_cfg}: evaluation.model_checkpoint_filename"
    cfg, model, path, state = load_trained_run(args.training_cfg, ev["model_checkpoint_filename"], where, train_sets,
                                               use_ema=ev["use_ema"])
    device = select_device(ev["gpus"], f"{args.evaluation_cfg}: evaluation.gpus")
    adversarial = cfg["adversarial"]["enable_adversarial_training"]
    check_same_classes(state.get("classes"), stream_classes(cfg["dataset"], args.training_cfg), cfg["dataset"],
                       f"the checkpoint {path.name}", args.training_cfg)  # (before reading every file)
    streams = load_streams(cfg["dataset"], cfg["training"]["seed"], args.training_cfg)
    check_data_fits_model(streams, model, adversarial, args.training_cfg)
    data, split, batches = evaluation_data(streams, cfg["dataset"], state, ev["data_split"], args.training_cfg,
                                           f"{args.evaluation_cfg}: evaluation.data_split")
    check_batches_fit_model({split: data}, model, args.training_cfg)
    inputs, targets = model.split_batch(first_samples(data, ev["n_samples"], batches))
    shown_inputs = shown_input(inputs)  # the input the pictures show
    shown_key = next((k for k, x in zip(model.input_keys, as_tuple(inputs)) if x is shown_inputs), None)
    # the range PSNR, SSIM, Inception's features and the pictures use: the target stream's
    target_range = value_range(cfg["dataset"], model.target_key, targets) if targets is not None else None
    samples = None if not ev["sample_metrics"] else \
        prepare(ev["sample_metrics"], ev, targets, f"{args.evaluation_cfg}: evaluation", device,
                value_range=target_range)  # before generating
    model = model.to(device).eval()
    outputs = run_batched(model, inputs, ev["batch_size"], device, args.training_cfg)
    paired = targets_are_paired(model, adversarial)
    names = class_names(state, model, outputs.shape[-1])
    notes = []  # one line for each figure left out or null, and why
    metrics = compute_metrics(model, inputs, outputs, targets, device, paired, adversarial, names, target_range, notes)
    if samples is not None:
        metrics |= samples(outputs, f"{args.evaluation_cfg}: evaluation.sample_metrics")
        metrics["feature_extractor"] = samples.features.name
    if is_classification(outputs, targets):
        title = f"{path.name}\n{split} accuracy {metrics['accuracy']:.3f} ({len(targets)} samples)"
        figures = {"confusion": confusion_matrix(metrics["confusion_matrix"], names, title)} | \
            labelled_pictures(shown_inputs, outputs.argmax(1), targets, names, ev["grid_nrow"], path.name,
                              value_range(cfg["dataset"], shown_key, shown_inputs), notes)
    else:
        shown = ev["grid_nrow"] ** 2  # (thousands of samples for FID would make an unreadable grid)
        shown_range = target_range if comparable(outputs, targets) else value_range(cfg["dataset"], None, outputs)
        beside = shown_inputs[:shown] if paired and shown_inputs is not None else None
        figures = sample_pictures(beside, outputs[:shown], None if targets is None else targets[:shown],
                                  ev["grid_nrow"], path.name, shown_range, notes)
    if callable(getattr(model, "sample_rows", None)):  # the flow's own picture: one row each (a class, A->B, ...)
        batch = first_samples(data, ev["grid_nrow"], batches)
        figures["rows"] = rows_figure(sample_rows(model, batch, device), path.name, target_range)
    settings = resolved_settings(ev, path, split)
    digest = settings_hash(settings, cfg)
    metrics |= {"notes": notes} if notes else {}
    metrics |= {"checkpoint": str(path), "epoch": state.get("epoch"), "data_split": split, "settings_hash": digest,
                "evaluation": settings}
    run, out = Run.of(cfg, path.parent), f"{path.stem}_{split}_{digest}"  # this checkpoint, split and settings
    text = json.dumps(strict(metrics), indent=2, allow_nan=False)  # (JSON has no Infinity or NaN)
    print(text)
    for note in notes:
        print(f"note: {note}")
    print(f"saved {run.write_result(f'{out}_metrics.json', lambda f: f.write(text.encode()))}")
    for kind, fig in figures.items():
        save_figure(run, f"{out}_{kind}.png", fig)


def resolved_settings(ev, path, split):
    """The evaluation section as it was applied: the checkpoint by its file name (not `latest`)
    and the split evaluated (not null), so that two ways of naming the same settings agree."""
    return {**ev, "model_checkpoint_filename": path.name, "data_split": split}


def settings_hash(settings, cfg):
    """8 hex digits of SHA-256 over the canonical JSON (sorted keys) of what shapes the outputs
    besides the checkpoint: the resolved evaluation settings, the dataset section, and the seed
    that generated data streams are drawn with."""
    shaping = {"evaluation": settings, "dataset": cfg["dataset"], "seed": cfg["training"]["seed"]}
    text = json.dumps(shaping, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def save_figure(run, name, fig):
    print(f"saved {run.save_figure(name, fig)}")
    plt.close(fig)


def evaluation_data(streams, dataset_cfg, state, split, source, where):
    """(the dataset of the samples to evaluate, with the transforms marked in_evaluation; the
    split's name; the batches to make it in). By default the samples the checkpoint's run held
    out, split as that run split them (its `split` record), made in the batches its validation
    used, so that evaluate.py sees the inputs the validation loss saw."""
    n = len(streams[dataset_cfg["data_len_key"]])
    # a checkpoint from before validation splits held nothing out
    run = state.get("split") or {"n_samples": n, "validation_fraction": 0.0, "split_seed": 0, "batch_size": 64}
    split = split or ("validation" if run["validation_fraction"] else "all")
    if split == "validation" and not run["validation_fraction"]:
        raise UserError(f"{where}: validation, but the run held no samples out (its dataset.validation_fraction "
                        "was 0); use training or all")
    if split != "all" and run["n_samples"] != n:
        raise UserError(f"{where}: {split}, but the run split {run['n_samples']} samples and {source}: dataset now "
                        f"gives {n}, so its held-out samples cannot be told apart; use all, or the run's data")
    training, validation = split_indices(n, run["validation_fraction"], run["split_seed"], f"{source}: dataset")
    indices = {"training": training, "validation": validation, "all": torch.arange(n)}[split]
    batches = FixedBatches(len(indices), run["batch_size"], run["split_seed"])
    return build_dataset(streams, dataset_cfg, indices, False, f"{source}: dataset"), split, batches


def shown_input(inputs):
    """The input the pictures show beside the outputs, and input_* metrics compare with the
    targets: a model's one input; of several, the first float one of more than one value a
    sample (an image, a signal; a class label or a single number is no picture), else None."""
    if not isinstance(inputs, (tuple, list)):
        return inputs
    return next((x for x in inputs if x.is_floating_point() and x.dim() >= 2), None)


def first_samples(data, n, batches):
    """The dataset's first n samples as one batch."""
    made, count = [], 0
    for item in batches:
        if count >= n:
            break
        made.append(data.__getitems__(item))
        count += len(item[1])
    return {name: torch.cat([b[name] for b in made])[:n] for name in made[0]}


@torch.no_grad()
def run_batched(model, inputs, batch_size, device, where):
    starts = range(0, batch_size_of(inputs), batch_size)
    outputs = []
    for i in tqdm(starts, desc="evaluating", unit="batch", leave=False, disable=len(starts) < 4):
        outputs.append(run_model(model, inputs_to(index_inputs(inputs, slice(i, i + batch_size)), device)))
        check_outputs(outputs[-1], model, where)
        outputs[-1] = outputs[-1].cpu()
    return torch.cat(outputs)


@torch.no_grad()
def compute_metrics(model, inputs, outputs, targets, device, paired, adversarial, names, target_range, notes):
    """Output statistics; with targets, how close outputs are to them (pairwise for paired data,
    on the targets' range `target_range`, dataset_base.value_range's, which they say; by nearest
    neighbours for a GAN), and for paired data how close the input the pictures show
    (shown_input's) is, where it has their shape; with a trained discriminator that gives one
    score a sample, its mean score for real and for generated samples. What is left out gets a
    line in `notes`."""
    metrics = {"n_samples": len(outputs), "output_mean": outputs.mean().item(), "output_std": outputs.std().item(),
               "output_min": outputs.min().item(), "output_max": outputs.max().item()}
    if is_classification(outputs, targets):  # class scores [N, C] against class labels [N]
        return metrics | classification_metrics(outputs, targets, names)
    if not comparable(outputs, targets):
        return metrics
    targets = targets.float()
    metrics |= {"value_range": [target_range.low, target_range.high] if target_range.known else None,
                "value_range_how": target_range.how}
    if not target_range.declared:
        notes.append(f"the range of the targets is {target_range.how}")
    if paired:
        if target_range.known:  # what PSNR and SSIM clamp
            low, high = target_range.low, target_range.high
            metrics["outputs_clamped"] = ((outputs < low) | (outputs > high)).float().mean().item()
        metrics |= pairwise_metrics(outputs, targets, target_range)
        shown = shown_input(inputs)  # what the model improves on (e.g. the noisy images themselves)
        if shown is not None and shown.shape == targets.shape:
            metrics |= {f"input_{k}": v for k, v in pairwise_metrics(shown.float(), targets, target_range,
                                                                     clamp=False).items()}
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
        metrics |= discriminator_scores(model, inputs, outputs, targets, device, notes)
    return metrics


def comparable(outputs, targets):
    """Whether outputs and targets are samples of one shape (images against images, say)."""
    return targets is not None and targets.shape[1:] == outputs.shape[1:]


def pairwise_metrics(outputs, targets, target_range, clamp=True):
    """Mean absolute and squared error of the outputs as they are; PSNR in dB and, for images,
    SSIM (metrics.py, as validation computes them) of the outputs clamped to the targets'
    `target_range` (a dataset_base.ValueRange, whose width is the peak: 2 for [-1, 1]), or as they
    are with `clamp` False (the inputs, which are data, not a model's answer). A PSNR or SSIM
    that cannot be had is None, with the reason beside it (<key>_reason)."""
    result = {"l1": torch.mean((outputs - targets).abs()).item(), "mse": torch.mean((outputs - targets) ** 2).item()}
    has_ssim = outputs.dim() == 4 and ssim_window(outputs.shape) > 0
    if not target_range.known:
        why = f"the range of the targets is {target_range.how}"
        return result | {"psnr_db": None, "psnr_db_reason": why} | \
            ({"ssim": None, "ssim_reason": why} if has_ssim else {})
    sums = batch_sums("images", outputs, targets, target_range, clamp)
    quality = finish({k: v.item() for k, v in sums.items()}, target_range)
    result["psnr_db"] = quality["psnr"]
    if math.isinf(result["psnr_db"]):
        result |= {"psnr_db": None, "psnr_db_reason": "identical to the targets: PSNR is infinite"}
    return result | ({"ssim": quality["ssim"]} if "ssim" in quality else {})


def discriminator_scores(model, inputs, outputs, targets, device, notes):
    """The discriminator's mean score for real and for generated samples, where it gives one score
    a sample ([N], [N, 1], or a DCGAN's [N, 1, 1, 1]); else none, and a line in `notes` saying
    why: the mean of a map of scores per sample (a PatchGAN's) is no sample's score."""
    real = model.discriminate(targets.to(device), inputs_to(inputs, device))
    fake = model.discriminate(outputs.to(device), inputs_to(inputs, device))
    if not all(isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == len(targets) and x[0].numel() == 1
               for x in (real, fake)):
        shape = list(real.shape[1:]) if isinstance(real, torch.Tensor) else type(real).__name__
        notes.append(f"no discriminator_score_real or _generated: the discriminator gives {shape} scores per sample "
                     "(a PatchGAN's map?), not one, and their mean is no sample's score")
        return {}
    return {"discriminator_score_real": real.mean().item(), "discriminator_score_generated": fake.mean().item()}


def strict(metrics):
    """`metrics` as strict JSON holds them: a number that is not finite (an output of NaN) as
    null, with the reason beside it (<key>_reason), in every mapping."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[key], out[f"{key}_reason"] = None, f"not a finite number ({value})"
        else:
            out[key] = strict(value) if isinstance(value, dict) else value
    return out


def is_classification(outputs, targets):
    """Whether the outputs are class scores (logits, [N, C]) and the targets integer class labels
    ([N]), as for a classifier trained with cross_entropy_loss."""
    return (targets is not None and outputs.dim() == 2 and targets.dim() == 1 and len(targets) == len(outputs)
            and not targets.is_floating_point() and not targets.is_complex() and targets.dtype != torch.bool)


def class_names(state, model, n_classes):
    """The names of the classes the targets index: the class folders the checkpoint's run read
    its target stream from (class_folders), else the flow's `class_names`, if either has one
    name per class; else the class indices as text."""
    names = (state.get("classes") or {}).get(model.target_key) or getattr(model, "class_names", None)
    if names is not None and len(names) == n_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(n_classes)]


def classification_metrics(outputs, targets, names):
    """Accuracy (the share of samples whose highest score is their label's), the same per class
    (null for a class with no samples here), how many samples each class has, and the confusion
    matrix: row = true class, column = predicted class, each entry a count of samples."""
    n_classes = outputs.shape[1]
    targets = targets.long()
    if targets.min() < 0 or targets.max() >= n_classes:
        raise UserError(f"the targets are class labels from {targets.min().item()} to {targets.max().item()}, but "
                        f"the model gives {n_classes} class scores per sample (labels must be 0 to {n_classes - 1})")
    predicted = outputs.argmax(1)
    confusion = torch.bincount(targets * n_classes + predicted, minlength=n_classes ** 2).view(n_classes, n_classes)
    counts, hits = confusion.sum(1).tolist(), confusion.diagonal().tolist()
    return {"accuracy": (predicted == targets).double().mean().item(), "n_classes": n_classes,
            "accuracy_per_class": {name: hit / count if count else None
                                   for name, hit, count in zip(names, hits, counts)},
            "class_counts": dict(zip(names, counts)),
            "confusion_matrix": confusion.tolist()}


def confusion_matrix(confusion, names, title):
    """The confusion matrix as a heat map: rows are true classes, columns predicted ones; each
    cell shows its count, coloured by its share of the row (so that classes of different sizes
    compare). The figure grows with the classes and their names' length, so that labels and
    counts stay apart."""
    counts = torch.tensor(confusion, dtype=torch.float64)
    shares = counts / counts.sum(1, keepdim=True).clamp(min=1)
    n, longest = len(names), max(len(name) for name in names)
    cell = max(0.7, 0.12 * len(str(int(counts.max().item()))))  # room for the widest count
    label = 0.065 * longest  # inches a (rotated) tick label takes beside the matrix
    fig, ax = plt.subplots(figsize=(1.5 + label + cell * n + 1.3, 1.3 + label + cell * n), layout="constrained")
    shown = ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    for row in range(n):
        for col in range(n):
            ax.text(col, row, f"{int(counts[row, col])}", ha="center", va="center", fontsize=9,
                    color="white" if shares[row, col] > 0.5 else "black")
    ax.set_xticks(range(n), names, rotation=90)  # upright: long names side by side, never on one another
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(shown, ax=ax, shrink=0.8, label="share of the true class")
    ax.set_title(title, fontsize=9)
    return fig


def labelled_pictures(inputs, predicted, targets, names, nrow, title, shown_range, notes):
    """{"samples": labelled_inputs' figure} for inputs that are images of 1 or 3 channels; else
    (None: no input to show, see shown_input) nothing, and a line in `notes` saying why (the
    confusion matrix is the picture then)."""
    if inputs is not None and inputs.dim() == 4 and inputs.shape[1] in (1, 3):
        return {"samples": labelled_inputs(inputs, predicted, targets, names, nrow, title, shown_range)}
    what = "none of the inputs is" if inputs is None else f"the inputs are {list(inputs.shape[1:])} per sample, not"
    notes.append(f"no samples picture: {what} images of 1 or 3 channels to title with their class; the confusion "
                 "matrix shows the classes")
    return {}


def labelled_inputs(inputs, predicted, targets, names, nrow, title, shown_range=None):
    """Up to nrow x nrow input images, about as many a row as rows, each titled with its predicted
    class, the misclassified ones first, in red and with their true class under; all on one colour
    scale (the input stream's range `shown_range`, clipped, or where it is not known their min..max;
    None: guessed from them), which the figure's title states."""
    order = torch.cat([torch.nonzero(predicted != targets).flatten(), torch.nonzero(predicted == targets).flatten()])
    order = order[:nrow * nrow]
    shown = inputs[order].float()
    shown_range = shown_range or value_range(None, None, shown)
    how = f"range {shown_range.how}"
    bounds = (shown_range.low, shown_range.high) if shown_range.known else None
    images = to_unit_range(shown, bounds)
    columns = grid_columns(len(order), nrow)
    rows = math.ceil(len(order) / columns)
    width = max(1.0, 0.065 * max(len(name) for name in names) + 0.45)  # a title as wide as "true: <name>"
    how = wrapped(how, width * columns + 0.2)
    extra = LINE * (how.count("\n") + 1)  # the range's lines, under the title's three
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns + 0.2, 1.45 * rows + 0.7 + extra), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, i in zip(axes.flat, images, order.tolist()):
        wrong = predicted[i] != targets[i]
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():  # a frame, so that an image's bright edge does not melt into the page
            spine.set_color(PAD)
        if image.shape[0] == 1:
            ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
        label = f"{names[predicted[i]]}\ntrue: {names[targets[i]]}" if wrong else names[predicted[i]]
        ax.set_title(label, fontsize=7, color="red" if wrong else "black")
    fig.suptitle(f"{title}\npredicted class; mistakes first, in red, with the true class\n"
                 f"inputs {scale_note(shown, bounds)}\n{how}", fontsize=9)
    return fig


MAX_CHANNELS = 8  # channels a picture shows of images of other than 1 or 3 channels, or of signals
MAX_SIGNALS = 16  # samples a picture of signals shows


def sample_pictures(inputs, outputs, targets, nrow, title, shown_range, notes):
    """{"samples": a figure} of outputs that are not class scores: images [N, C, H, W] (sample_grid)
    or signals [N, L] or [N, C, L] (signal_plot), beside their inputs (`inputs` given: paired
    data) and targets; of any other outputs nothing, and a line in `notes` saying why."""
    if outputs.dim() == 4:
        return {"samples": sample_grid(inputs, outputs, targets, nrow, title, shown_range)}
    if outputs.dim() in (2, 3) and outputs.shape[-1] > 1:
        return {"samples": signal_plot(inputs, outputs, targets, nrow, title)}
    what = "one value" if outputs.dim() == 1 or outputs[0].numel() == 1 else f"{list(outputs.shape[1:])}"
    notes.append(f"no samples picture: the outputs are {what} per sample, neither images [C, H, W] nor signals [L] "
                 "or [C, L]; the output statistics above describe them")
    return {}


@torch.no_grad()
def sample_rows(model, batch, device):
    """{row name: images on the CPU} of the flow's sample_rows(batch) (a dict of streams), in eval
    mode, without autograd."""
    rows = model.sample_rows({name: x.to(device) for name, x in batch.items()})
    return {name: images.float().cpu() for name, images in rows.items()}


def rows_figure(rows, title, shown_range=None):
    """The rows a flow's sample_rows gives ({name: images [N, 1|3, H, W]}), one a row, each named
    at its left; on `shown_range` (the target stream's), else the range the images snap to."""
    images = torch.cat(list(rows.values()))
    shown_range = shown_range or value_range(None, None, images)
    bounds = (shown_range.low, shown_range.high) if shown_range.known else None
    columns = len(images) // len(rows)
    grid = image_grid(to_unit_range(images, bounds), columns)
    width, height = grid_figure_size(grid.shape[1:], 1)
    fig, ax = plt.subplots(figsize=(width + 1.0, height + 2 * LINE), layout="constrained")
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    row_height = grid.shape[1] / len(rows)
    ax.set_yticks([row_height * (i + 0.5) for i in range(len(rows))], list(rows), fontsize=9)
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(f"{title}\n{scale_note(images, bounds)}", fontsize=9)
    return fig


def sample_grid(inputs, outputs, targets, nrow, title, shown_range=None):
    """Outputs beside the data: input, output and target for paired data (inputs given), generated
    beside real samples otherwise; about as many images a row as rows, at most `nrow`. Every
    panel is shown on `shown_range` (the target stream's, dataset_base.value_range) and clipped
    to it, so that inputs far outside it (noisy ones) do not wash the others out; where it is not
    known, each panel is stretched from its own min..max (None: guessed from the targets, else
    the outputs). Each panel's title says which, the figure's how the range is known. Images of
    other than 1 or 3 channels are shown a sample a row (`nrow` of them), a channel a column in
    grey (MAX_CHANNELS at most)."""
    comparable = targets is not None and targets.shape[1:] == outputs.shape[1:]
    if inputs is not None and inputs.shape[1:] == outputs.shape[1:]:
        panels = [("input", inputs), ("output", outputs)] + ([("target", targets.float())] if comparable else [])
    else:
        panels = [("generated", outputs)] + ([("data", targets[:len(outputs)].float())] if comparable else [])
    shown_range = shown_range or value_range(None, None, targets.float() if comparable else outputs)
    how = f"range {shown_range.how}"
    bounds = (shown_range.low, shown_range.high) if shown_range.known else None
    columns, channels = grid_columns(len(outputs), nrow), outputs.shape[1]
    if channels not in (1, 3):
        columns = min(channels, MAX_CHANNELS)
        panels = [(name, images[:nrow, :columns].reshape(-1, 1, *images.shape[2:])) for name, images in panels]
        how += (f"\na sample a row; channel{'s' * (columns > 1)} 0-{columns - 1} of {channels} a column each, grey"
                if columns > 1 else f"\na sample a row; channel 0 of {channels}, grey")
    grids = [image_grid(to_unit_range(images, bounds), columns) for _, images in panels]
    width, height = grid_figure_size(grids[0].shape[1:], len(panels))
    how = wrapped(how, width)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, height + LINE * (how.count("\n") + 1)), squeeze=False,
                             layout="constrained")  # (the range's lines under the title)
    for ax, (name, images), grid in zip(axes[0], panels, grids):
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(f"{name}\n{scale_note(images, bounds)}", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{title}\n{how}", fontsize=9)
    fig.get_layout_engine().set(h_pad=0.08)  # (the default leaves the suptitle touching the panel titles)
    return fig


LINE = 0.16  # inches a line of text at font size 9 takes


def wrapped(text, width):
    """`text` in lines that fit a figure `width` inches wide at font size 9 (12 characters an inch)."""
    return "\n".join(textwrap.fill(line, max(24, int(width * 12))) for line in text.splitlines())


def signal_plot(inputs, outputs, targets, nrow, title):
    """Outputs that are signals ([N, L] or [N, C, L]) as a line plot a sample (MAX_SIGNALS at
    most, about as many a row as rows, at most `nrow`): the output solid, its target dashed and
    its input faint where they have its shape; channels in colours (MAX_CHANNELS at most).
    Without inputs (a GAN's samples, which pair with no target) the dashed line is a real sample."""
    def lines(x):
        return None if x is None or x.shape[1:] != outputs.shape[1:] else x.float().reshape(len(x), -1, x.shape[-1])

    shown = min(len(outputs), MAX_SIGNALS, nrow * nrow)
    columns = grid_columns(shown, nrow)
    rows = math.ceil(shown / columns)
    target = "target" if inputs is not None else "a real sample"
    series = [("input", lines(inputs), {"alpha": 0.35, "linewidth": 0.8}),
              ("output", lines(outputs), {"linewidth": 1.2}),
              (target, lines(targets), {"linestyle": "--", "linewidth": 1.0})]
    series = [(name, x, style) for name, x, style in series if x is not None]
    channels = lines(outputs).shape[1]
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns + 0.3, 1.8 * rows + 0.9), squeeze=False,
                             sharex=True, sharey=True, layout="constrained")
    for ax in axes.flat[shown:]:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:shown]):
        for _, x, style in series:
            for c in range(min(channels, MAX_CHANNELS)):
                ax.plot(x[i, c].numpy(), color=f"C{c}", **style)
        ax.set_title(f"sample {i}", fontsize=8)
        ax.tick_params(labelsize=7)
    legend = [plt.Line2D([], [], color="black", **style, label=name) for name, _, style in series]
    legend += [plt.Line2D([], [], color=f"C{c}", label=f"channel {c}") for c in range(min(channels, MAX_CHANNELS))] * \
        (channels > 1)
    fig.legend(handles=legend, loc="outside lower center", ncols=min(len(legend), 6), fontsize=8, frameon=False)
    more = f"; channels 0-{MAX_CHANNELS - 1} of {channels}" if channels > MAX_CHANNELS else ""
    fig.suptitle(f"{title}\n{shown} of {len(outputs)} samples, values against position{more}", fontsize=9)
    return fig


def grid_figure_size(grid_shape, n_panels):
    """(width, height) in inches at dpi 100 for `n_panels` grids of `grid_shape` (height, width in
    pixels) side by side under two-line titles: each grid at a whole-number zoom (every image
    pixel the same size) that makes it at least 320 pixels wide, so the figure's aspect follows
    the grid's."""
    height, width = grid_shape
    zoom = max(1, math.ceil(320 / width))
    return n_panels * (zoom * width / 100 + 0.15) + 0.1, zoom * height / 100 + 0.75


if __name__ == "__main__":
    run_main(main)

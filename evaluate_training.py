"""Plot how runs trained: loss terms per network, smoothed, and learning rates, for one or more
runs or checkpoints in one figure.

    python evaluate_training.py -te configs/example_model/example_training_evaluation_cfg.yaml

Writes results/<model>/<save_folder_name>/training_losses.png (of the first run listed) and
prints, per run and loss term, the steps, the final and the best moving-average value.
"""
import matplotlib
import numpy as np

from cli import add_overrides, make_parser, split_overrides
from config import TRAINING_EVALUATION, load_config, load_training_config, resolve_path
from errors import UserError, run_main
from runs import Run, list_checkpoints, load_checkpoint, saved_config

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def main(argv):
    parser = make_parser(__doc__.splitlines()[0],
                         "python evaluate_training.py -te configs/example_model/example_training_evaluation_cfg.yaml")
    parser.add_argument("-te", "--training_evaluation_cfg", required=True, metavar="YAML",
                        help="the training-evaluation config (which runs and checkpoints, smoothing window)")
    add_overrides(parser)
    args = parser.parse_args(argv)
    own_sets, train_sets = split_overrides(args.overrides, "training_evaluation")
    te = load_config(args.training_evaluation_cfg, TRAINING_EVALUATION, own_sets,
                     "training-evaluation config")["training_evaluation"]
    where = f"{args.training_evaluation_cfg}: training_evaluation"
    cfgs = [load_training_config(resolve_path(p), train_sets) for p in as_list(te["training_cfg_path"])]
    specs = as_list(te["model_checkpoint_filename"])
    runs = [read_run(cfg, path) for cfg in cfgs
            for path in checkpoints_of(cfg, specs, f"{where}.model_checkpoint_filename")]
    if not any(terms for run in runs for terms in run["losses"].values() if terms):
        raise UserError(f"{where}.model_checkpoint_filename: the checkpoint(s) hold no loss history (saved before the "
                        "first step?); pick a later one, e.g. latest")
    window = te["loss_average_window"]
    print_table(runs, window)
    fig = plot(runs, window)
    print(f"saved {Run.of(cfgs[0]).save_figure('training_losses.png', fig)}")
    plt.close(fig)


def as_list(value):
    return value if isinstance(value, list) else [value]


def checkpoints_of(cfg, specs, where):
    """The checkpoints that `specs` name in the run's folder: latest, file names, paths or globs."""
    run, found = Run.of(cfg), []
    for spec in specs:
        if not isinstance(spec, str):
            raise UserError(f"{where}: {spec!r} is not a checkpoint name, latest or a glob")
        if any(c in spec for c in "*?["):
            matches = [p for p in list_checkpoints(run.folder) if p.match(spec)]
            if not matches:
                raise UserError(f"{where}: {spec!r} matches no checkpoint in {run.folder}")
            found += matches
        else:
            found.append(run.resolve(spec, where))
    return list(dict.fromkeys(found))


def read_run(cfg, path):
    """A checkpoint's loss history per network, and the learning rates from metrics.jsonl (the
    steps up to the checkpoint), labelled with the run's folder and learning rate."""
    state = load_checkpoint(path)
    if not isinstance(state, dict) or "loss_history" not in state:
        raise UserError(f"{path}: not a checkpoint of this pipeline (no loss_history)")
    saved = saved_config(state, cfg)
    name = f"{saved['saving']['save_folder_name']} (lr {saved['training']['learning_rate']:g})"
    rows = [r for r in Run.of(cfg, folder=path.parent).metrics() if r["step"] <= state.get("step", 0)]
    lr_keys = {key for r in rows for key in r if key.endswith("/lr")}
    lrs = {key.split("/")[0]: [r[key] for r in rows if key in r] for key in sorted(lr_keys)}
    return {"run": name, "label": f"{name}, {path.stem}", "path": path, "epoch": state.get("epoch"),
            "losses": state["loss_history"], "validation": state.get("validation_history") or {"step": []}, "lrs": lrs}


def moving_average(values, window):
    """Mean of each run of `window` consecutive values; a series shorter than the window gives
    the mean of all of it (one point)."""
    values = np.asarray(values, dtype=float)
    window = min(window, len(values))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def shown_terms(terms):
    """The loss terms worth showing: 'total' only when it sums several terms."""
    return {k: v for k, v in terms.items() if k != "total" or len(terms) > 2}


def print_table(runs, window):
    print(f"{'checkpoint':<48} {'network':<14} {'term':<16} {'values':>6} {'final':>10} {'best':>10} {'epoch':>6}  "
          f"run   (training terms: one value per step, moving averages over {window}; val: one per epoch)")
    for run in runs:
        for net, terms in run["losses"].items():
            rows = [(term, len(values), moving_average(values, window)) for term, values in shown_terms(terms).items()]
            rows += [(f"val/{term}", len(values), np.asarray(values, dtype=float))
                     for term, values in shown_terms(run["validation"].get(net, {})).items()]
            for term, steps, values in rows:
                print(f"{run['path'].name:<48} {net:<14} {term:<16} {steps:>6} {values[-1]:>10.4f} "
                      f"{np.nanmin(values):>10.4f} {run['epoch']:>6}  {run['run']}")


def plot(runs, window):
    """One panel per network's losses, and one for the learning rates when metrics.jsonl has them."""
    networks = list(dict.fromkeys(net for run in runs for net in run["losses"]))
    with_lr = any(run["lrs"] for run in runs)
    n = len(networks) + with_lr
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.5), squeeze=False)
    for ax, net in zip(axes[0], networks):
        for run in runs:
            for term, values in shown_terms(run["losses"].get(net, {})).items():
                smooth = moving_average(values, window)
                steps = np.arange(len(values) - len(smooth) + 1, len(values) + 1)
                ax.plot(steps, smooth, label=term if len(runs) == 1 else f"{run['label']}: {term}", linewidth=1.2)
            validation = run["validation"]
            for term, values in shown_terms(validation.get(net, {})).items():
                label = f"validation {term}" if len(runs) == 1 else f"{run['label']}: validation {term}"
                ax.plot(validation["step"], values, "o--", label=label, linewidth=1, markersize=4)
        log_scale_if_wide(ax)
        ax.set(title=f"{net} loss (moving average, {window} steps)", xlabel="step", ylabel="loss")
    if with_lr:
        ax = axes[0][-1]
        for run in runs:
            for net, lrs in run["lrs"].items():
                ax.plot(np.arange(1, len(lrs) + 1), lrs, label=net if len(runs) == 1 else f"{run['label']}: {net}")
        log_scale_if_wide(ax)
        ax.set(title="learning rate", xlabel="step", ylabel="learning rate")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(", ".join(run["path"].name for run in runs), fontsize="small")
    fig.tight_layout()
    return fig


def log_scale_if_wide(ax):
    """A log y axis for positive curves spanning more than two orders of magnitude."""
    ys = [line.get_ydata() for line in ax.get_lines()]
    low = min((np.nanmin(y) for y in ys), default=0)
    if ys and low > 0 and max(np.nanmax(y) for y in ys) > 100 * low:
        ax.set_yscale("log")


if __name__ == "__main__":
    run_main(main)

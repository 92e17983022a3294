"""Plot how a run trained: the loss terms of its checkpoints, smoothed, one panel per network.

    python evaluate_training.py -te configs/example_model/example_training_evaluation_cfg.yaml

Writes results/<model>/<save_folder_name>/training_losses.png and prints, per loss term, the
final and the best moving-average value.
"""
import matplotlib
import numpy as np

from checkpoint import atomic_write, load_checkpoint, resolve_checkpoint
from cli import add_overrides, make_parser, split_overrides
from config import TRAINING_EVALUATION, checkpoint_dir, load_config, load_training_config, resolve_path, results_dir
from errors import UserError, run_main

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def main(argv):
    parser = make_parser(__doc__.splitlines()[0],
                         "python evaluate_training.py -te configs/example_model/example_training_evaluation_cfg.yaml")
    parser.add_argument("-te", "--training_evaluation_cfg", required=True, metavar="YAML",
                        help="the training-evaluation config (which run and checkpoints, smoothing window)")
    add_overrides(parser)
    args = parser.parse_args(argv)
    own_sets, train_sets = split_overrides(args.overrides, "training_evaluation")
    te = load_config(args.training_evaluation_cfg, TRAINING_EVALUATION, own_sets,
                     "training-evaluation config")["training_evaluation"]
    cfg = load_training_config(resolve_path(te["training_cfg_path"]), train_sets)
    specs = te["model_checkpoint_filename"]
    specs = specs if isinstance(specs, list) else [specs]
    where = f"{args.training_evaluation_cfg}: training_evaluation.model_checkpoint_filename"
    runs = [(path, load_checkpoint(path)["loss_history"])
            for path in (resolve_checkpoint(spec, checkpoint_dir(cfg), where) for spec in specs)]
    if not any(terms for _, history in runs for terms in history.values() if terms):
        raise UserError(f"{where}: the checkpoint(s) hold no loss history (saved before the first step?); "
                        "pick a later one, e.g. latest")
    window = te["loss_average_window"]
    print_table(runs, window)
    out = results_dir(cfg) / "training_losses.png"
    plot(runs, window, out)
    print(f"saved {out}")


def moving_average(values, window):
    """Mean of each run of `window` consecutive values (the whole series if it is shorter)."""
    values = np.asarray(values, dtype=float)
    window = min(window, len(values))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def shown_terms(terms):
    """The loss terms worth showing: 'total' only when it sums several terms."""
    return {k: v for k, v in terms.items() if k != "total" or len(terms) > 2}


def print_table(runs, window):
    print(f"{'checkpoint':<48} {'network':<14} {'term':<10} {'steps':>6} "
          f"{'final':>10} {'best':>10}   (moving average over {window} steps)")
    for path, history in runs:
        for net, terms in history.items():
            for term, values in shown_terms(terms).items():
                smooth = moving_average(values, window)
                print(f"{path.name:<48} {net:<14} {term:<10} {len(values):>6} {smooth[-1]:>10.4f} {smooth.min():>10.4f}")


def plot(runs, window, out):
    networks = list(dict.fromkeys(net for _, history in runs for net in history))
    fig, axes = plt.subplots(1, len(networks), figsize=(6 * len(networks), 4.5), squeeze=False)
    for ax, net in zip(axes[0], networks):
        for path, history in runs:
            for term, values in shown_terms(history.get(net, {})).items():
                smooth = moving_average(values, window)
                steps = np.arange(len(values) - len(smooth) + 1, len(values) + 1)
                label = term if len(runs) == 1 else f"{path.stem}: {term}"
                ax.plot(steps, smooth, label=label, linewidth=1.2)
        lines = [line.get_ydata() for line in ax.get_lines()]
        if lines and min(y.min() for y in lines) > 0 and max(y.max() for y in lines) > 100 * min(y.min() for y in lines):
            ax.set_yscale("log")  # terms spanning orders of magnitude
        ax.set(title=f"{net} loss (moving average, {window} steps)", xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(", ".join(path.name for path, _ in runs), fontsize="small")
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


if __name__ == "__main__":
    run_main(main)

"""Plot how runs trained, and say how they differ: loss terms per network (every step, and
smoothed), validation losses and metrics, and learning rates where they change, of one or more
runs in one figure, and a table of each run's final and best values beside the config keys whose
values differ between the runs.

    python evaluate_training.py -te configs/example_model/example_training_evaluation_cfg.yaml

Curves come from each run's metrics.jsonl, every logged step (or, with
training_evaluation.model_checkpoint_filename, up to the chosen checkpoints; a run without a
metrics file plots from its checkpoint's loss_history). Writes, for one run, into its results
folder results/<model>/<save_folder_name>/run_<N>/: training_losses.png, training_summary.md and
training_summary.csv; for several runs, compare_<runs>.png/.md/.csv under the first config's
results/<model>/<save_folder_name>/. Prints the table.
"""
from engine.cli import add_overrides, answer_early, make_parser


def parse_args(argv):
    parser = make_parser(__doc__.splitlines()[0],
                         "python evaluate_training.py -te configs/example_model/example_training_evaluation_cfg.yaml")
    parser.add_argument("-te", "--training_evaluation_cfg", metavar="YAML",
                        help="the training-evaluation config (which runs and checkpoints, smoothing window)")
    parser.add_argument("--sweep", metavar="DIR", help="a sweep's folder (train.py --sweep prints it): draw its "
                        "runs, one colour per configuration, and rank the configurations (instead of -te)")
    parser.add_argument("--rank-by", metavar="KEY", help="with --sweep: the metrics.jsonl key to rank by, e.g. "
                        "sample/fid (default: saving.keep_best's, else the first validation loss, else FID)")
    add_overrides(parser)
    args = parser.parse_args(argv)
    if (args.training_evaluation_cfg is None) == (args.sweep is None):
        parser.error("give -te YAML (runs a config names) or --sweep DIR (a sweep's runs), one of them")
    if args.rank_by and not args.sweep:
        parser.error("--rank-by ranks a sweep's configurations: it goes with --sweep")
    return args


answer_early(__name__, parse_args)  # --help in a fraction of a second: before torch is imported

import csv
import hashlib
import io
import math
import re
from collections import Counter
from pathlib import Path

import matplotlib
import numpy as np
import yaml

from engine.cli import split_overrides
from engine.config import (
    HIGHER_IS_BETTER,
    TRAINING_EVALUATION,
    flat_config,
    load_config,
    load_training_config,
    resolve_path,
    results_dir,
)
from engine.errors import UserError, run_main, shown
from engine.runs import (
    BOOKKEEPING,
    Run,
    is_count,
    list_checkpoints,
    load_checkpoint,
    looking_in,
    read_metrics,
    results_of,
    run_config,
    saved_config,
    select_runs,
)
from engine.sweep import SEED_KEY, STATE, rank_key, ranked_table, read_state, resolve_sweep, sweep_runs
from engine.sweep import csv_text as sweep_csv
from engine.sweep import markdown as sweep_markdown

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

MAX_STEP = 2 ** 62  # steps a run may log (a larger one is a damaged file, beyond numpy's integers)
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the largest loss a run logs
STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3)))  # one per loss term in a panel
# The panel of each sample metric (sample_metrics): (title, y label); kid_std is in the table only.
SAMPLE_PANELS = {"fid": ("FID of generated samples (lower is better)", "FID"),
                 "kid_mean": ("KID of generated samples (lower is better)", "KID"),
                 "precision": ("precision and recall (higher is better)", "share of samples"),
                 "recall": ("precision and recall (higher is better)", "share of samples")}
# The panel of each validation metric of the outputs against their targets (metrics.py), kept
# apart from the losses: they are no loss, and higher is better.
METRIC_PANELS = {"psnr": ("validation PSNR (higher is better)", "PSNR (dB)"),
                 "ssim": ("validation SSIM (higher is better)", "SSIM"),
                 "accuracy": ("validation accuracy (higher is better)", "share of samples"),
                 "top5_accuracy": ("validation accuracy (higher is better)", "share of samples")}


def main(argv):
    args = parse_args(argv)
    if args.sweep:
        return evaluate_sweep(args)
    own_sets, train_sets = split_overrides(args.overrides, "training_evaluation")
    te = load_config(args.training_evaluation_cfg, TRAINING_EVALUATION, own_sets,
                     "training-evaluation config")["training_evaluation"]
    where = f"{args.training_evaluation_cfg}: training_evaluation"
    cfgs = [load_training_config(resolve_path(p), train_sets) for p in as_list(te["training_cfg_path"])]
    runs = gather_runs(cfgs, te, where)
    if not any(run["curves"] for run in runs):
        raise UserError(f"{where}.runs: the runs picked have logged no step yet (a run stopped before its first "
                        "step?); train further, or pick other runs")
    label_runs(runs)
    window = te["loss_average_window"]
    table = summary_table(runs, window)
    print(markdown(table))
    if len(runs) == 1:  # into the run's own results folder
        writer, files = Run(runs[0]["results"], runs[0]["results"]), ("training_losses.png", "training_summary")
    else:
        stem = comparison_name(runs)
        writer, files = Run(results_dir(cfgs[0]), results_dir(cfgs[0])), (f"{stem}.png", stem)
    fig = plot(runs, window)
    print(f"saved {writer.save_figure(files[0], fig)}")
    plt.close(fig)
    md, rows = markdown(table).encode(), csv_text(table).encode()
    print(f"saved {writer.write_result(files[1] + '.md', lambda f: f.write(md))}")
    print(f"saved {writer.write_result(files[1] + '.csv', lambda f: f.write(rows))}")


def evaluate_sweep(args):
    """--sweep: the runs of a sweep drawn (a colour per configuration, its seeds alike) and its
    configurations ranked, into results/<model>/<save_folder_name>/sweep_<N>/."""
    folder = resolve_sweep(args.sweep, Path.cwd(), "--sweep")
    state = read_state(folder)
    spec, where = state["spec"], f"{folder / STATE}"
    done = [run for run in state["runs"] if run["state"] == "done"]
    if not done:
        raise UserError(f"{where}: no run of the sweep is done yet ({len(state['runs'])} runs); train them with the "
                        "command that made it")
    runs = []
    for run in done:
        cfg = load_training_config(spec["training_cfg"], [*spec["overrides"], *args.overrides, *run["overrides"]])
        runs.append(read_run(cfg, Path(run["folder"]), where) | {"group": " ".join(
            item for item in run["overrides"] if not item.startswith(f"{SEED_KEY}="))})
    label_runs(runs)
    keys = {k for run in runs for k in run["curves"]}
    if args.rank_by is not None and args.rank_by not in keys:
        raise UserError(f"--rank-by {shown(args.rank_by)}: no run of {folder} logs it; keys: {', '.join(sorted(keys))}")
    base = load_training_config(spec["training_cfg"], spec["overrides"])
    table = ranked_table(sweep_runs(state), args.rank_by or rank_key(base))
    print(sweep_markdown(table))
    writer = Run(results_dir(base) / folder.name, results_dir(base) / folder.name)
    fig = plot(runs, TRAINING_EVALUATION["training_evaluation"]["loss_average_window"].default)
    print(f"saved {writer.save_figure(folder.name + '.png', fig)}")
    plt.close(fig)
    md, rows = sweep_markdown(table).encode(), sweep_csv(table).encode()
    print(f"saved {writer.write_result(folder.name + '.md', lambda f: f.write(md))}")
    print(f"saved {writer.write_result(folder.name + '.csv', lambda f: f.write(rows))}")


def gather_runs(cfgs, te, where):
    """The curves to draw: each picked run of each training config, whole (model_checkpoint_filename
    null) or up to the checkpoints named; a checkpoint given as a path is read wherever it lies."""
    specs = te["model_checkpoint_filename"]
    specs = None if specs is None else as_list(specs)
    with looking_in(f"{where}.model_checkpoint_filename"):  # (a folder it cannot look through)
        paths = [p for p in map(checkpoint_path, specs or []) if p is not None]
        names = [s for s in specs or [] if checkpoint_path(s) is None]
        runs = [read_run(cfgs[0], path.parent, where, path) for path in paths]
    if specs is not None and not names:
        return runs
    for cfg in cfgs:
        for folder in select_runs(cfg, te["runs"], f"{where}.runs"):
            with looking_in(f"{where}.runs"):
                if specs is None:
                    runs.append(read_run(cfg, folder, where))
                else:
                    runs += [read_run(cfg, folder, where, path)
                             for path in checkpoints_of(folder, names, f"{where}.model_checkpoint_filename")]
    return runs


def as_list(value):
    return value if isinstance(value, list) else [value]


def checkpoint_path(spec):
    """The file `spec` names as a path (from here or from the repository), or None."""
    if not isinstance(spec, str) or not spec.endswith(".pth"):
        return None
    return next((p for p in (Path(spec), resolve_path(spec)) if p.is_file()), None)


def checkpoints_of(folder, specs, where):
    """The checkpoints that `specs` name in one run's folder: latest, best, file names or globs."""
    found, have = [], list_checkpoints(folder)
    for spec in specs:
        if not isinstance(spec, str):
            raise UserError(f"{where}: {shown(spec)} is not a checkpoint name, latest, best or a glob")
        if spec == "latest":
            matches = have[-1:]
        elif spec == "best":  # saving.keep_best's <prefix>_best.pth
            matches = sorted(Path(folder).glob("*_best.pth"))
        elif any(c in spec for c in "*?["):
            matches = [p for p in have if p.match(spec)]
        else:
            matches = [p for p in have if p.name == spec]
        if not matches:
            listing = ", ".join(p.name for p in have[-5:]) or "none"
            raise UserError(f"{where}: {shown(spec)} matches no checkpoint in {folder} (it holds: {listing})")
        found += matches
    return list(dict.fromkeys(found))


def read_run(cfg, folder, where, checkpoint=None):
    """One run's curves {metrics.jsonl key: (steps, values)} (up to `checkpoint`'s step when one is
    given), its config (the snapshot in its folder, where it has one) and where its results go."""
    rows, state = read_metrics(folder / "metrics.jsonl"), None
    if checkpoint is not None or not rows:
        checkpoint = checkpoint or (list_checkpoints(folder) or [None])[-1]
        if checkpoint is None:
            raise UserError(f"{where}.runs: {folder} holds neither metrics.jsonl nor a checkpoint")
        state = load_checkpoint(checkpoint)
        if not isinstance(state, dict) or "loss_history" not in state:
            raise UserError(f"{checkpoint}: not a checkpoint of this pipeline (no loss_history)")
        rows = [r for r in rows if r["step"] <= state.get("step", 0)] or history_rows(state)
    run_cfg = run_config(folder) or (saved_config(state, cfg) if state else cfg)
    return {"folder": folder, "checkpoint": checkpoint, "epoch": state.get("epoch") if state else None,
            "config": flat_config(run_cfg) | {"config file": cfg["config_path"]}, "curves": curves(rows),
            "adversarial": bool(run_cfg.get("adversarial", {}).get("enable_adversarial_training")),
            "roles": roles(run_cfg, state),
            "results": results_of(cfg, folder), "save_folder_name": cfg["saving"]["save_folder_name"],
            "last_step": max((r["step"] for r in rows), default=0)}


def roles(run_cfg, state):
    """What each network key of metrics.jsonl is, as the panels name it: a GAN's are its generator
    and discriminator; a run without a discriminator trains one network, logged as "generator/..."
    (the keys are fixed), and named by its component in the architecture (`classifier` for the
    shape classifier), else "model". The architecture is the checkpoint's where one was read,
    else the file the run's config names."""
    if isinstance(run_cfg.get("networks"), dict) and run_cfg["networks"]:  # (a flow's own step's networks)
        return {name: name for name in run_cfg["networks"]}
    if run_cfg.get("adversarial", {}).get("enable_adversarial_training"):
        return {"generator": "generator", "discriminator": "discriminator"}
    text = state.get("architecture") if isinstance(state, dict) else None
    return {"generator": generator_component(text or architecture_file(run_cfg)) or "model"}


def architecture_file(run_cfg):
    """The text of the architecture YAML the run's config names, or None."""
    try:
        return resolve_path(run_cfg["model"]["architecture_cfg_path"]).read_text()
    except (KeyError, TypeError, OSError):
        return None


def generator_component(text):
    """The name of the one component with adv_type generator (the default) in an architecture's
    text, or None (no text, not YAML, or several such components)."""
    try:
        components = yaml.safe_load(text).get("model_components") if text else None
    except (yaml.YAMLError, AttributeError):
        return None
    if not isinstance(components, dict):
        return None
    names = [name for name, comp in components.items()
             if not isinstance(comp, dict) or comp.get("adv_type", "generator") == "generator"]
    return names[0] if len(names) == 1 else None


def history_rows(state):
    """metrics.jsonl-like rows from a checkpoint's loss_history (one value per step) and
    validation_history, for runs from before metrics files."""
    rows = {}
    for net, terms in state["loss_history"].items():
        for term, values in terms.items():
            for step, value in enumerate(values, 1):
                rows.setdefault(step, {"step": step})[f"{net}/{term}"] = value
    validation = state.get("validation_history") or {}
    for net, terms in validation.items():
        if net != "step":
            for term, values in terms.items():
                for step, value in zip(validation["step"], values):
                    rows.setdefault(step, {"step": step})[f"validation/{net}/{term}"] = value
    return [rows[step] for step in sorted(rows)]


def curves(rows):
    """{key: (steps, values)} for every metric in the rows; a null (a non-finite value) as NaN,
    which leaves a gap in the curve. A row whose step no run reaches is left out."""
    found = {}
    for row in rows:
        if not is_count(row["step"]) or row["step"] >= MAX_STEP:
            continue
        for key, value in row.items():
            if key not in BOOKKEEPING and (value is None or isinstance(value, (int, float))):
                found.setdefault(key, ([], []))
                found[key][0].append(row["step"])
                found[key][1].append(plotted(value))
    return {key: (np.asarray(steps), np.asarray(values)) for key, (steps, values) in found.items()}


def plotted(value):
    """A logged value as a curve holds it: null (a value that was not finite) as NaN, and one beyond
    float32's range, which no run logs (a file edited or damaged), as infinite: matplotlib cannot
    scale an axis out to float64's end."""
    if value is None:
        return math.nan
    try:
        value = float(value)
    except OverflowError:  # an integer beyond any float
        return math.inf if value > 0 else -math.inf
    return value if math.isnan(value) or abs(value) <= FLOAT32_MAX else math.copysign(math.inf, value)


def label_runs(runs):
    """A short unique label per run: its run folder (run_2), with the save_folder_name where the
    runs come from several, and the checkpoint's epoch where curves stop at checkpoints."""
    several = len({run["save_folder_name"] for run in runs}) > 1
    for run in runs:
        label = f"{run['save_folder_name']}/{run['folder'].name}" if several else run["folder"].name
        run["label"] = label + (f" @ epoch {run['epoch']}" if run["checkpoint"] is not None and run["epoch"] is not None
                                else "")
    labels = [run["label"] for run in runs]
    for i, run in enumerate(runs):  # the same folder through two configs: number them
        if labels.count(run["label"]) > 1:
            run["label"] += f" ({i + 1})"


def comparison_name(runs):
    """compare_<labels>, or, where that would be long, compare_<N>runs_<hash of the labels>."""
    labels = [re.sub(r"[^A-Za-z0-9_.-]+", "-", run["label"]).strip("-") for run in runs]
    name = "compare_" + "_".join(labels)
    if len(name) <= 80:
        return name
    return f"compare_{len(runs)}runs_{hashlib.sha256(' '.join(labels).encode()).hexdigest()[:8]}"


def moving_average(values, window):
    """Mean of each run of `window` consecutive values; a series shorter than the window gives
    the mean of all of it (one point)."""
    values = np.asarray(values, dtype=float)
    window = min(window, len(values))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def smoothed(key, steps, values, window):
    """(steps, values) as plotted and tabled: training terms as moving averages ending at each
    step; validation and sample metrics (one value per epoch) and learning rates as they are."""
    if key.startswith(("validation/", "sample/")) or key.endswith("/lr") or len(values) == 0:
        return steps, values
    smooth = moving_average(values, window)
    return steps[len(steps) - len(smooth):], smooth


def has_direction(key, run):
    """Whether the lowest value is the best one: validation and sample metrics, and the losses of
    a run without a discriminator. (In a GAN the lowest adversarial loss is often the untrained
    model's.)"""
    return key.startswith(("validation/", "sample/")) or not run["adversarial"]


def loss_keys(runs):
    """The loss terms (and metrics) of the runs in order of appearance: 'total' only where it sums
    several terms."""
    keys = list(dict.fromkeys(k for run in runs for k in run["curves"] if not k.endswith("/lr")))
    # per network (and validation of it): total + terms; a validation metric (PSNR, accuracy) is no term
    terms_of = Counter(k.rsplit("/", 1)[0] for k in keys if not (k.startswith("validation/") and
                                                                  k.rsplit("/", 1)[-1] in METRIC_PANELS))
    # (a total of one term repeats it; a total logged alone is all there is of its network)
    return [k for k in keys if not k.endswith("/total") or terms_of[k.rsplit("/", 1)[0]] != 2]


def summary_table(runs, window):
    """[(row name, [value per run])]: the config keys whose values differ between the runs, the
    steps logged, then each loss term's final (and, where lower is better, best) smoothed value."""
    keys = list(dict.fromkeys(k for run in runs for k in run["config"]))
    table = [(f"config: {k}", [run["config"].get(k, "-") for run in runs]) for k in keys
             if len({repr(run["config"].get(k, "-")) for run in runs}) > 1]
    table.append(("steps", [run["last_step"] for run in runs]))
    for key in loss_keys(runs):
        finals, bests = [], []
        for run in runs:
            _, values = smoothed(key, *run["curves"].get(key, (np.array([]), np.array([]))), window)
            finite = values[np.isfinite(values)]
            finals.append(f"{values[-1]:.4g}" if len(values) else "-")
            if len(finite) and has_direction(key, run) and not key.endswith("_std"):
                bests.append(f"{finite.max() if key.rsplit('/', 1)[-1] in HIGHER_IS_BETTER else finite.min():.4g}")
            else:
                bests.append("-")
        table.append((f"final {key}", finals))
        if any(b != "-" for b in bests):
            table.append((f"best {key}", bests))
    notes = [f"training terms: moving averages over {window} steps; validation: one value per epoch",
             *nonfinite_notes(runs)]
    return {"runs": [run["label"] for run in runs], "rows": table, "note": "\n".join(notes)}


def nonfinite_notes(runs):
    """A line for each curve holding NaN or infinite values (a loss that diverged, or a run that
    skipped such steps): how many, and whether anything of it is drawn."""
    notes = []
    for run in runs:
        for key, (_, values) in run["curves"].items():
            bad = int((~np.isfinite(values)).sum())
            if bad == len(values):
                notes.append(f"{run['label']}: {key}: all {bad} values are non-finite (NaN or infinite); no curve "
                             "is drawn")
            elif bad:
                notes.append(f"{run['label']}: {key}: {bad} of {len(values)} values are non-finite (NaN or "
                             "infinite); they are gaps in its curve")
    return notes


def markdown(table):
    def cell(value):
        return str(value).replace("|", "\\|")

    lines = ["| | " + " | ".join(table["runs"]) + " |", "|---" * (len(table["runs"]) + 1) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in [name, *values]) + " |" for name, values in table["rows"]]
    return "\n".join(lines) + "\n\n" + table["note"].replace("\n", "\n\n") + "\n"


def csv_text(table):
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["", *table["runs"]])
    writer.writerows([name, *values] for name, values in table["rows"])
    return text.getvalue()


def plot(runs, window):
    """One panel per sample metric (FID, KID, precision and recall), per network's losses
    (training terms at every step, faint, and smoothed; validation as markers), and one for the
    learning rates where some run's rate changes (else the legend gives each run's rates). Colour:
    the run, the same in every panel; line style: the term. Networks are named by role (roles)."""
    keys = [k for k in loss_keys(runs) if panel_of(k) is not None]
    panels = list(dict.fromkeys(panel_of(k) for k in keys))
    lr_keys = list(dict.fromkeys(k for run in runs for k in run["curves"] if k.endswith("/lr")))
    with_lr = any(rate_changes(run["curves"][k][1]) for run in runs for k in lr_keys if k in run["curves"])
    n = len(panels) + with_lr
    rows = -(-max(n, 1) // 3)  # rows of at most three panels, so that six stay readable ...
    cols = -(-max(n, 1) // rows)  # ... and as full as can be: four make 2 x 2
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols + 1.5, 4.8 * rows + 0.4), squeeze=False,
                             layout="constrained")
    axes = axes.reshape(1, -1)  # one row of panels, in reading order
    for ax in axes[0][n:]:
        ax.axis("off")
    if n == 0:  # learning rates alone, that never change or are never finite: the legend and the table say them
        axes[0][0].text(0.5, 0.5, "no loss term or metric to draw", ha="center", va="center", color="0.4")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups = list(dict.fromkeys(run.get("group", run["label"]) for run in runs))  # (a sweep's seeds: one group)
    for run in runs:
        run["colour"] = colours[groups.index(run.get("group", run["label"])) % len(colours)]
    for ax, panel in zip(axes[0], panels):
        draw(ax, runs, [k for k in keys if panel_of(k) == panel], window, colours)
        if isinstance(panel, tuple):  # a metric's (title, y label)
            ax.set(title=panel[0], xlabel="step", ylabel=panel[1])
        else:
            ax.set(title=role_of(panel, runs), xlabel="step", ylabel="loss")
    if with_lr:
        draw(axes[0][n - 1], runs, lr_keys, window, colours)
        axes[0][n - 1].set(title="learning rate", xlabel="step", ylabel="learning rate")
    firsts = {run.get("group", run["label"]): run for run in reversed(runs)}  # each group's first run
    shown_runs = [firsts[group] for group in groups]
    handles = [plt.Line2D([], [], color=run["colour"], linewidth=2.5) for run in shown_runs]
    labels = [legend_label(run, runs) if with_lr else legend_label(run, runs) + constant_rates(run)
              for run in shown_runs]
    fig.legend(handles, labels, loc="outside right upper", title="run" if len(groups) == len(runs) else
               "configuration", fontsize="small")
    if any(is_training_term(k) for k in keys):
        smoothing_legend(fig, window)
    return fig


def legend_label(run, runs):
    """A run's legend entry: its label; for a group of runs (a sweep's seeds), the group and its runs."""
    if "group" not in run:
        return run["label"]
    members = [r["label"] for r in runs if r["group"] == run["group"]]
    return f"{run['group'] or '(the config as it is)'}\n({', '.join(members)})"


def smoothing_legend(fig, window):
    """What the faint and the solid curves of a training term are, in a legend of their own."""
    handles = [plt.Line2D([], [], color="0.3", linewidth=0.6, alpha=0.25),
               plt.Line2D([], [], color="0.3", linewidth=1.2)]
    fig.legend(handles, ["every step", f"mean of the last\n{window} steps"], loc="outside right lower",
               title="training terms", fontsize="small")


def rate_changes(values):
    """Whether a learning-rate curve moves (by more than rounding)."""
    finite = values[np.isfinite(values)]
    return len(finite) > 1 and finite.max() - finite.min() > 1e-9 * max(abs(finite.max()), 1e-30)


def constant_rates(run):
    """The run's learning rate(s) as more lines of its legend entry ("\\nlearning rate 0.001", one
    line per network where they differ), for a figure drawn without the learning-rate panel:
    every rate stayed where it started."""
    rates = {run.get("roles", {}).get(k.split("/")[0], k.split("/")[0]): values[np.isfinite(values)]
             for k, (_, values) in run["curves"].items() if k.endswith("/lr")}
    rates = {name: f"{values[0]:.3g}" for name, values in rates.items() if len(values)}
    if not rates:
        return ""
    if len(set(rates.values())) == 1:
        return f"\nlearning rate {next(iter(rates.values()))}"
    return "".join(f"\n{name}: learning rate {rate}" for name, rate in rates.items())


def role_of(network, runs):
    """A panel's title: what the network is in the runs drawn (roles), e.g. classifier."""
    return " / ".join(dict.fromkeys(run.get("roles", {}).get(network, network) for run in runs)) or network


def is_training_term(key):
    """Whether a key is a loss term logged at every step (drawn raw and smoothed), not a
    validation loss, a sample metric or a learning rate."""
    return not key.startswith(("validation/", "sample/")) and not key.endswith("/lr")


def draw(ax, runs, keys, window, colours):
    """The curves of `keys` for every run: colour by run, line style by key, validation as points;
    a training term at every step (thin and faint, leaving the y range to the smoothed curve and
    the bulk of the raw values) and smoothed. The style legend below the panel, a log y axis for
    wide ranges."""
    raw = []
    for i, key in enumerate(keys):
        for j, run in enumerate(runs):
            if key not in run["curves"]:
                continue
            style = {"color": run.get("colour", colours[j % len(colours)]), "linestyle": STYLES[i % len(STYLES)]}
            steps, values = run["curves"][key]
            if is_training_term(key):  # (add_artist: not in the data limits, which the smoothed curves set)
                ax.add_artist(plt.Line2D(steps, values, linewidth=0.6, alpha=0.25, gid="raw", **style))
                raw.append((steps, values))
            steps, values = smoothed(key, steps, values, window)
            point = key.startswith(("validation/", "sample/")) or len(values) == 1  # (one point is no line)
            ax.plot(steps, values, marker="o" if point else None, markersize=3, linewidth=1.2, **style)
    missing = [f"{run['label']}: {term_label(key, runs)}" for key in keys for run in runs
               if key in run["curves"] and not np.isfinite(run["curves"][key][1]).any()]
    if missing:  # (an empty panel would say nothing of why)
        ax.text(0.5, 0.5, "no finite value, not drawn:\n" + "\n".join(missing), transform=ax.transAxes,
                ha="center", va="center", fontsize="small", color="0.4")
    term_legend(ax, keys, runs)
    log_scale_if_wide(ax)
    include_bulk(ax, raw)
    ax.grid(alpha=0.3)


def include_bulk(ax, raw):
    """Widen the y range to hold the 1st to 99th percentile of each raw curve (on a log axis, of
    its positive values), so that the faint curves show around the smoothed ones without a few
    spikes squashing them."""
    log = ax.get_yscale() == "log"
    for steps, values in raw:
        finite = values[np.isfinite(values) & (values > 0 if log else True)]
        if len(finite):
            low, high = np.percentile(finite, [1, 99])
            ax.update_datalim([(steps[0], low), (steps[-1], high)])
    ax.autoscale_view()


def panel_of(key):
    """The panel a key is drawn in: its network for losses (generator/g_adv and
    validation/generator/g_adv -> generator), SAMPLE_PANELS' for sample metrics (None: not drawn)
    and METRIC_PANELS' for validation metrics (validation/generator/psnr)."""
    parts = key.split("/")
    if parts[0] == "sample":
        return SAMPLE_PANELS.get(parts[-1])
    if parts[0] == "validation" and parts[-1] in METRIC_PANELS:
        return METRIC_PANELS[parts[-1]]
    return parts[1] if parts[0] == "validation" and len(parts) > 2 else parts[0]


def term_legend(ax, keys, runs):
    """The line style of each term, below the panel (outside the data)."""
    handles = [plt.Line2D([], [], color="0.3", linestyle=STYLES[i % len(STYLES)],
                          marker="o" if k.startswith(("validation/", "sample/")) else None, markersize=3)
               for i, k in enumerate(keys)]
    ax.legend(handles, [term_label(k, runs) for k in keys], loc="upper center", bbox_to_anchor=(0.5, -0.14),
              ncols=min(3, len(keys)), fontsize="small", frameon=False)


def term_label(key, runs=()):
    """How a key reads in its panel: generator/g_adv -> g_adv, validation/generator/g_adv ->
    validation g_adv, generator/lr -> the network's role (in the learning-rate panel)."""
    parts = key.split("/")
    if parts[0] == "validation":
        return "validation " + parts[-1]
    return role_of(parts[0], runs) if parts[-1] == "lr" else "/".join(parts[1:])


def log_scale_if_wide(ax):
    """A log y axis for positive curves spanning more than two orders of magnitude. The raw
    curves (gid "raw") are left out: the smoothed ones are what the scale is chosen to read, and a
    raw step's loss may be 0."""
    lines = [line for line in ax.get_lines() if line.get_gid() != "raw"]
    ys = [y[np.isfinite(y)] for y in (np.asarray(line.get_ydata(), dtype=float) for line in lines)]
    ys = [y for y in ys if len(y)]
    if ys and min(y.min() for y in ys) > 0 and max(y.max() for y in ys) > 100 * min(y.min() for y in ys):
        ax.set_yscale("log", nonpositive="mask")  # (a raw 0 leaves a gap, not a line to the bottom)


if __name__ == "__main__":
    run_main(main)

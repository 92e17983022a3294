"""Sweeps: one train.py command trains many runs (a grid over config keys, or draws from ranges,
over seeds too) and ranks them.

    python train.py -t cfg.yaml --sweep training.learning_rate=1e-4,5e-4 --sweep training.seed=0,1

Every run is an ordinary run of train.py (its own run_<N>, config snapshot and run.json), started
as `python train.py -t cfg.yaml --set <each --set> --set <its keys>` in a process of its own; every
combination is loaded and trial-stepped before the first one trains. The sweep's folder,
<save_folder_name>/sweep_<N>/, holds sweep.json (each run's keys, folder, state, final metrics and
a failed run's error line), logs/ (each run's output) and the ranked table (table.md, table.csv).
The same command again goes on with the same sweep: done runs are skipped, the others resume from
their newest checkpoint. Ranking (`ranked_table`) is shared with evaluate_training.py.
"""
import csv
import io
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.cli import resolve_gpus
from engine.config import HIGHER_IS_BETTER, checkpoint_dir, keep_best, load_training_config
from engine.errors import UserError, shown
from engine.files import atomic_write
from engine.runs import BOOKKEEPING, RECORD, Run, claim_numbered, read_metrics

SWEEP = re.compile(r"^sweep_(?P<n>\d+)$")
STATE = "sweep.json"
DRAWS = {  # --sweep KEY=name(args) with --sweep-trials: how a value is drawn, and the arguments it takes
    "uniform": "LOW,HIGH", "loguniform": "LOW,HIGH (both above 0)", "randint": "LOW,HIGH (HIGH included)",
    "choice": "V1,V2,...",
}
SEED_KEY = "training.seed"  # runs that differ only here are one configuration, seeds of it
POLL_S = 0.5  # how often the sweep looks at its running runs


# ---- the command line's axes ----
def split_values(text):
    """'a,[1,2],{x: 1}' -> ['a', '[1,2]', '{x: 1}']: the commas outside brackets and quotes."""
    parts, depth, quote, start = [], 0, None, 0
    for i, c in enumerate(text):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c in "[{(":
            depth += 1
        elif c in "]})":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return parts + [text[start:].strip()]


def parse_axes(items, trials):
    """The --sweep items as [(key, ("values", [text, ...]) or (draw name, [text, ...]))]; the
    texts are YAML, passed on as `--set key=text`."""
    axes = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise UserError(f"--sweep {shown(item)}: expected KEY=V1,V2,... (YAML values) or, with --sweep-trials, "
                            f"KEY=loguniform(1e-5,1e-2); draws: {', '.join(DRAWS)}")
        if key in (k for k, _ in axes):
            raise UserError(f"--sweep {key}: given twice; list all its values in one --sweep {key}=V1,V2,...")
        draw = re.fullmatch(r"\s*([a-z_]+)\((.*)\)\s*", text, re.S)
        if draw and draw[1] in DRAWS:
            axes.append((key, (draw[1], check_draw(key, draw[1], split_values(draw[2]), trials))))
        else:
            values = split_values(text)
            if "" in values:
                raise UserError(f"--sweep {shown(item)}: an empty value; separate values with single commas")
            axes.append((key, ("values", values)))
    return axes


def check_draw(key, name, args, trials):
    """A draw's arguments, checked: two numbers in order for a range, at least one value for choice."""
    where = f"--sweep {key}={name}({','.join(args)})"
    if trials is None:
        raise UserError(f"{where}: a draw needs --sweep-trials K (how many configurations to draw)")
    if name == "choice":
        if "" in args:
            raise UserError(f"{where}: expected {name}({DRAWS[name]})")
        return args
    try:
        low, high = (int(a) if name == "randint" else float(a) for a in args)
    except ValueError:
        raise UserError(f"{where}: expected {name}({DRAWS[name]}), two {'integers' if name == 'randint' else 'numbers'}"
                        ) from None
    if not low <= high or (name == "loguniform" and low <= 0) or not all(map(math.isfinite, (low, high))):
        raise UserError(f"{where}: expected {name}({DRAWS[name]}) with LOW <= HIGH")
    return [low, high]


def combinations(axes, trials, seed):
    """Each run's `--set` items: with `trials`, that many draws of the drawn keys (numpy's
    generator seeded with `seed`: the same command draws the same values), each crossed with every
    combination of the listed values; without, the grid of the listed values."""
    listed = [[f"{key}={v}" for v in values] for key, (kind, values) in axes if kind == "values"]
    grid = [list(c) for c in itertools.product(*listed)]
    if trials is None:
        return grid
    rng = np.random.default_rng(seed)
    runs = []
    for _ in range(trials):
        drawn = {key: draw_value(rng, kind, args) for key, (kind, args) in axes if kind != "values"}
        for combo in grid:
            values = dict(item.split("=", 1) for item in combo) | drawn
            runs.append([f"{key}={values[key]}" for key, _ in axes])
    return runs


def draw_value(rng, kind, args):
    """One draw, as YAML text."""
    if kind == "choice":
        return args[int(rng.integers(len(args)))]
    if kind == "randint":
        return str(int(rng.integers(args[0], args[1] + 1)))
    low, high = (math.log(a) for a in args) if kind == "loguniform" else args
    value = float(rng.uniform(low, high))
    return repr(float(f"{math.exp(value) if kind == 'loguniform' else value:.4g}"))  # (4 digits: a readable table)


# ---- the sweep's folder ----
def find_sweep(root, spec):
    """The newest sweep_<N> under `root` made by the same command (`spec`), or None."""
    for folder in reversed(sweep_folders(root)):
        state = read_state(folder)
        if state is not None and state.get("spec") == spec:
            return folder
    return None


def sweep_folders(root):
    """The sweep_<N> folders under `root`, oldest first."""
    found = [p for p in root.iterdir() if p.is_dir() and SWEEP.match(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(SWEEP.match(p.name)["n"]))


def read_state(folder):
    try:
        return json.loads((Path(folder) / STATE).read_text())
    except (OSError, ValueError):
        return None


def write_state(folder, state):
    text = json.dumps(state, indent=2, allow_nan=False).encode()
    atomic_write(Path(folder) / STATE, lambda f: f.write(text))


def resolve_sweep(spec, root, where):
    """The sweep folder `spec` names: latest (the newest under `root`), sweep_<N> under `root`, or
    a path to one."""
    if spec == "latest":
        found = sweep_folders(root)
        if not found:
            raise UserError(f"{where}: latest: {root} holds no sweep_<N> yet (train.py --sweep makes them)")
        return found[-1]
    folder = next((p for p in (Path(spec), root / str(spec)) if (p / STATE).is_file()), None)
    if folder is None:
        have = ", ".join(p.name for p in sweep_folders(root)) or "none"
        raise UserError(f"{where}: {shown(spec)} is no sweep folder (one with {STATE}); sweeps in {root}: {have}")
    return folder


# ---- running it ----
def run_sweep(path, overrides, items, trials, seed, jobs, check, script):
    """train.py's --sweep: check every combination (`check(cfg)`: the trial step of train.py), then
    train them, `jobs` at a time, each as `python <script> -t <path> --set ...`."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError("--sweep: run a sweep with python, not torchrun; its runs may each use several GPUs")
    base = load_training_config(path, overrides)
    axes = parse_axes(items, trials)
    combos = combinations(axes, trials, seed)
    spec = {"training_cfg": str(Path(path).resolve()), "overrides": list(overrides), "sweep": list(items),
            "trials": trials, "seed": seed}
    root = checkpoint_dir(base)
    folder = find_sweep(root, spec)
    state = read_state(folder) if folder else {"spec": spec, "runs": [
        {"overrides": combo, "folder": None, "state": "pending", "error": None, "metrics": {}} for combo in combos]}
    todo = [run for run in state["runs"] if run["state"] != "done"]
    if not todo:
        print(f"{folder}: all {len(state['runs'])} runs are done; nothing to do")
        print(markdown(ranked_table(sweep_runs(state), rank_key(base))))
        return
    cfgs = check_all(path, overrides, todo, check)
    if folder is None:
        folder = claim_numbered(root, "sweep")
    (folder / "logs").mkdir(exist_ok=True)
    print(f"sweep folder: {folder} ({len(state['runs'])} runs, {len(todo)} to train, {jobs} at a time)")
    write_state(folder, state)
    stopped = Launcher(folder, state, path, overrides, jobs, script).run(todo, cfgs)
    table = ranked_table(sweep_runs(state), rank_key(base))
    md, rows = markdown(table).encode(), csv_text(table).encode()
    atomic_write(folder / "table.md", lambda f: f.write(md))
    atomic_write(folder / "table.csv", lambda f: f.write(rows))
    print("\n" + markdown(table) + f"\nsaved {folder / 'table.md'} and table.csv; plots: python evaluate_training.py "
          f"--sweep {folder}")
    if stopped:
        raise SystemExit(128 + stopped)
    failed = [run for run in state["runs"] if run["state"] == "failed"]
    if failed:
        print(f"{len(failed)} run(s) failed; the same command again retries them", file=sys.stderr)
        raise SystemExit(1)


def check_all(path, overrides, todo, check):
    """Each run's config, loaded and trial-stepped (`check`) before any trains: a bad value fails now."""
    cfgs = []
    for i, run in enumerate(tqdm(todo, desc="checking the sweep's runs", unit="run", leave=False)):
        try:
            cfg = load_training_config(path, [*overrides, *run["overrides"]])
            check(cfg)
        except UserError as e:
            raise UserError(f"--sweep: run {i + 1} of {len(todo)} to train ({' '.join(run['overrides'])}): {e}\n"
                            "(no run was trained: every run is checked first)") from None
        cfgs.append(cfg)
    return cfgs


class Launcher:
    """Trains a sweep's runs, `jobs` processes at a time, keeping sweep.json up to date: a run is
    running while its process lives, then done (exit 0, its final metrics kept) or failed (its
    error line kept); one stopped by Ctrl-C or SIGTERM is pending again, to resume."""

    def __init__(self, folder, state, path, overrides, jobs, script):
        self.folder, self.state, self.path, self.overrides, self.jobs = folder, state, path, overrides, jobs
        self.script, self.signum, self.running = script, None, {}  # {slot: (run, Popen, output thread)}
        self.stopped = set()  # the pids sent SIGTERM

    def run(self, todo, cfgs):
        """Train `todo` (with their configs `cfgs`); the signal that stopped the sweep, or None."""
        pending = list(zip(todo, cfgs))
        previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        bars = Bars(self.state, self.jobs) if self.jobs > 1 else None
        try:
            while (pending and self.signum is None) or self.running:
                while pending and self.signum is None and len(self.running) < self.jobs:
                    slot = min(set(range(self.jobs)) - set(self.running))
                    self.start(slot, *pending.pop(0))
                if self.signum is not None:
                    self.stop_running()  # (again: one may have started as the signal came)
                self.reap()
                if bars:
                    bars.update(self.running)
                time.sleep(POLL_S if self.running else 0)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if bars:
                bars.close()
        return self.signum

    def handle(self, signum, frame):
        """Ctrl-C or SIGTERM: no new run starts; the running ones save and stop."""
        self.signum = signum
        self.stop_running()

    def stop_running(self):
        """SIGTERM to each running run, once (a second would stop it without saving)."""
        for _, proc, _ in self.running.values():
            if proc.pid not in self.stopped:
                self.stopped.add(proc.pid)
                proc.send_signal(signal.SIGTERM)

    def start(self, slot, run, cfg):
        if run["folder"] is None:  # a run_<N> of the run's own save_folder_name, claimed as train.py would
            run["folder"] = str(Run.new(cfg).claim())
        cmd = [sys.executable, self.script, "-t", self.path]
        for item in [*self.overrides, *run["overrides"], *placement_overrides(cfg, slot, self.jobs)]:
            cmd += ["--set", item]
        cmd += ["--run-folder", run["folder"]]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.jobs > 1 and cfg["training"]["num_threads"] is None and not resolve_gpus(cfg["training"]["gpus"]):
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.jobs))  # the cores shared out
        index = self.state["runs"].index(run) + 1
        if self.jobs == 1:
            done = sum(r["state"] == "done" for r in self.state["runs"])
            print(f"\n[sweep {self.folder.name}: run {index} of {len(self.state['runs'])}, {done} done] "
                  f"{' '.join(run['overrides'])} -> {run['folder']}", flush=True)
        log = open(self.folder / "logs" / f"run{index}_{Path(run['folder']).name}.log", "ab")
        # (a session of its own: Ctrl-C in the terminal reaches the sweep only, which passes one SIGTERM
        # on; a second signal would stop the run without saving)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, preexec_fn=die_with_parent, start_new_session=True)
        output = Output(proc.stdout, log, echo=self.jobs == 1)
        run.update(state="running", error=None)
        self.running[slot] = (run, proc, output)
        write_state(self.folder, self.state)

    def reap(self):
        """Record the runs whose process has ended."""
        for slot, (run, proc, output) in list(self.running.items()):
            if proc.poll() is None:
                continue
            output.join()
            del self.running[slot]
            if proc.returncode == 0:
                run.update(state="done", metrics=final_metrics(run["folder"]))
            elif self.signum is not None and proc.returncode in (128 + self.signum, -self.signum, 130, 143):
                run.update(state="pending")  # stopped with the sweep: it resumes from its checkpoint
            else:
                run.update(state="failed", error=output.error_line() or f"exit status {proc.returncode}")
            write_state(self.folder, self.state)


def placement_overrides(cfg, slot, jobs):
    """With several runs at once on GPUs, one GPU per run: the slot's, round-robin over training.gpus."""
    gpus = resolve_gpus(cfg["training"]["gpus"])
    return [f"training.gpus=[{gpus[slot % len(gpus)]}]"] if jobs > 1 and gpus else []


def die_with_parent():
    """(Linux) A run's process gets SIGTERM, and so saves and stops, if the sweep is killed outright."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Output(threading.Thread):
    """Copies a run's output into its log file (and, with `echo`, to this terminal), keeping its
    last lines for the error line of a failed run."""

    def __init__(self, stream, log, echo):
        super().__init__(daemon=True)
        self.stream, self.log, self.echo, self.tail = stream, log, echo, b""
        self.start()

    def run(self):
        while chunk := self.stream.read1(65536):
            self.log.write(chunk)
            self.log.flush()
            if self.echo:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            self.tail = (self.tail + chunk)[-8192:]
        self.log.close()

    def error_line(self):
        lines = [line.strip() for line in re.split(r"[\r\n]", self.tail.decode(errors="replace")) if line.strip()]
        return next((line for line in lines if line.startswith("error:")), lines[-1] if lines else None)


class Bars:
    """With several runs at once: a bar for the sweep (runs finished of all) and one per running run
    (its steps, from its metrics.jsonl and run.json)."""

    def __init__(self, state, jobs):
        self.state = state
        self.sweep = tqdm(total=len(state["runs"]), desc="sweep", unit="run", position=0, dynamic_ncols=True)
        self.slots = [tqdm(total=0, unit="step", position=i + 1, dynamic_ncols=True, leave=False)
                      for i in range(jobs)]

    def update(self, running):
        states = [run["state"] for run in self.state["runs"]]
        self.sweep.n = states.count("done") + states.count("failed")
        self.sweep.set_postfix_str(f"{states.count('running')} running, {states.count('pending')} left, "
                                   f"{states.count('failed')} failed", refresh=False)
        self.sweep.refresh()
        for slot, bar in enumerate(self.slots):
            run = running.get(slot, (None,))[0]
            if run is None:
                bar.total, bar.n = 0, 0
                bar.set_description_str("(idle)")
                continue
            folder = Path(run["folder"])
            bar.total, bar.n = total_steps(folder), last_step(folder)
            bar.set_description_str(f"{folder.name}: {' '.join(run['overrides'])}"[:60])

    def close(self):
        for bar in [*self.slots, self.sweep]:
            bar.close()


def total_steps(folder):
    try:
        return json.loads((folder / RECORD).read_text())["starts"][-1].get("total_steps") or 0
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return 0


def last_step(folder):
    """The step of the last row of a run's metrics.jsonl (its end only is read)."""
    try:
        with open(folder / "metrics.jsonl", "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            lines = f.read().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError, IndexError):
        return 0


# ---- the table ----
def final_metrics(folder):
    """{key: its last value} of a run's metrics.jsonl (bookkeeping left out)."""
    last = {}
    for row in read_metrics(Path(folder) / "metrics.jsonl"):
        last |= {k: v for k, v in row.items() if k not in BOOKKEEPING and isinstance(v, (int, float))}
    return last


def sweep_runs(state):
    """The done runs of a sweep's state as ranked_table takes them: ({key: value text}, their rows)."""
    return [(dict(item.split("=", 1) for item in run["overrides"]), read_metrics(Path(run["folder"]) / "metrics.jsonl"))
            for run in state["runs"] if run["state"] == "done"]


def rank_key(cfg):
    """The key a sweep is ranked by unless one is named: saving.keep_best's, else (None) the
    first validation loss, sample metric or training loss the runs log (ranked_table picks)."""
    best = keep_best(cfg)
    return best[0] if best else None


def metric_keys(rows_of_runs):
    """The keys a table shows: validation losses and metrics and sample metrics; without any, each
    network's total training loss."""
    keys = list(dict.fromkeys(k for rows in rows_of_runs for row in rows for k in row
                              if k not in BOOKKEEPING and not k.endswith(("/lr", "_std"))))
    measured = [k for k in keys if k.startswith(("validation/", "sample/"))]
    return measured or [k for k in keys if k.endswith("/total")] or keys


def default_rank_key(keys):
    """What a table is ranked by unless named: the first validation loss, else FID, else the first
    sample metric, else the generator's (or the only network's) training loss."""
    losses = [k for k in keys if k.startswith("validation/") and not is_higher_better(k)]
    ordered = [*losses, *(k for k in keys if k == "sample/fid"), *(k for k in keys if k.startswith("sample/")),
               *(k for k in keys if k == "generator/total"), *keys]
    return ordered[0] if ordered else None


def is_higher_better(key):
    return key.rsplit("/", 1)[-1] in HIGHER_IS_BETTER


def final_and_best(rows, key, window=10):
    """(final, best) of `key` in one run's rows: a validation or sample metric's last and best
    value after training began (step 0's measures the untrained model); a training term's mean over
    its last `window` steps, and no best (a GAN's lowest loss is no best)."""
    values = np.array([row[key] for row in rows if isinstance(row.get(key), (int, float)) and row.get("step")],
                      dtype=float)
    if not len(values):
        return math.nan, math.nan
    if not key.startswith(("validation/", "sample/")):
        return float(values[-window:].mean()), math.nan
    finite = values[np.isfinite(values)]
    best = (finite.max() if is_higher_better(key) else finite.min()) if len(finite) else math.nan
    return float(values[-1]), float(best)


def ranked_table(runs, rank_by=None):
    """One row per configuration (runs whose keys differ only in training.seed are seeds of one),
    ranked by the mean over seeds of `rank_by`'s final value (lower first, higher where higher is
    better; default: the first key shown). `runs`: [({swept key: value text}, metrics rows)]."""
    keys = metric_keys([rows for _, rows in runs])
    rank_by = rank_by or default_rank_key(keys)
    if rank_by is not None and rank_by not in keys:
        keys = [rank_by, *keys]
    groups = {}
    for values, rows in runs:
        config = tuple((k, v) for k, v in values.items() if k != SEED_KEY)
        groups.setdefault(config, []).append(rows)
    swept = list(dict.fromkeys(k for config in groups for k, _ in config))
    rows = []
    for config, members in groups.items():
        stats = {key: spread([final_and_best(r, key) for r in members]) for key in keys}
        rows.append({"config": dict(config), "runs": len(members), "stats": stats})
    if rank_by is not None:
        sign = -1 if is_higher_better(rank_by) else 1
        rows.sort(key=lambda r: (math.isnan(r["stats"][rank_by]["final"][0]), sign * r["stats"][rank_by]["final"][0]))
    return {"keys": swept, "metrics": keys, "rank_by": rank_by, "rows": rows}


def spread(pairs):
    """{final: (mean, sd), best: (mean, sd)} over seeds (sd NaN for one seed), NaNs left out."""
    out = {}
    for i, name in enumerate(("final", "best")):
        values = np.array([p[i] for p in pairs], dtype=float)
        values = values[np.isfinite(values)]
        out[name] = (float(values.mean()) if len(values) else math.nan,
                     float(values.std(ddof=1)) if len(values) > 1 else math.nan)
    return out


def table_columns(table):
    """(header, [row cells]) with each metric's final and best as 'mean ± sd'."""
    header = ["rank", *table["keys"], "runs"]
    for key in table["metrics"]:
        header.append(f"final {key}")
        if any(not math.isnan(r["stats"][key]["best"][0]) for r in table["rows"]):
            header.append(f"best {key}")
    cells = []
    for i, row in enumerate(table["rows"]):
        line = [f"{i + 1}" + (" (best)" if i == 0 and table["rank_by"] else ""),
                *(row["config"].get(k, "-") for k in table["keys"]), str(row["runs"])]
        for key in table["metrics"]:
            line.append(mean_sd(row["stats"][key]["final"]))
            if f"best {key}" in header:
                line.append(mean_sd(row["stats"][key]["best"]))
        cells.append(line)
    return header, cells


def mean_sd(pair):
    mean, sd = pair
    if math.isnan(mean):
        return "-"
    return f"{mean:.4g}" + ("" if math.isnan(sd) else f" ± {sd:.2g}")


def markdown(table):
    header, cells = table_columns(table)
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in line) + " |" for line in cells]
    rank = f"ranked by the mean over seeds of the final {table['rank_by']}" if table["rank_by"] else "not ranked"
    note = rank + "; mean ± standard deviation over each configuration's runs"
    return "\n".join(lines) + f"\n\n{note}\n"


def csv_text(table):
    """The table as CSV, each mean and standard deviation in a column of its own."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["rank", *table["keys"], "runs"] + [f"{part} {key} {stat}" for key in table["metrics"]
                                                        for part in ("final", "best") for stat in ("mean", "sd")])
    for i, row in enumerate(table["rows"]):
        numbers = [row["stats"][key][part][j] for key in table["metrics"] for part in ("final", "best")
                   for j in (0, 1)]
        writer.writerow([i + 1, *(row["config"].get(k, "") for k in table["keys"]), row["runs"],
                         *("" if math.isnan(v) else f"{v:.6g}" for v in numbers)])
    return text.getvalue()

"""What training.num_threads does on this machine: whole train.py runs at each thread count.

    python benchmarks/bench_threads.py                                    # the toy GAN, 30 epochs (about 2 min)
    python benchmarks/bench_threads.py -t configs/unet_gan/unet_gan_training_cfg.yaml --epochs 2 --rounds 3

Each round runs train.py once per thread count (the order alternating between rounds, so that a
slow spell of the machine hits every side), as a user would: a fresh process, the config's own
settings, --set training.num_threads=N (null: torch's default, one thread per core), into a run
folder of its own that is deleted afterwards. The wall time includes starting Python and importing
torch (about 2.3 s here), which is the same for every side. Printed: each side's median (quartiles)
and its ratio to the default's.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
FOLDER = "bench_threads"


def train_seconds(config, epochs, threads):
    args = [sys.executable, "train.py", "-t", config, "--set", f"training.n_epochs={epochs}",
            "--set", f"training.num_threads={threads}", "--set", f"saving.save_folder_name={FOLDER}",
            "--set", "logging.tensorboard=false"]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    env.pop("OMP_NUM_THREADS", None)  # the point is what the config's setting does, not the shell's
    start = time.perf_counter()
    subprocess.run(args, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def quartiles(times):
    q1, median, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
    return median, q1, q3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-t", "--training_cfg", default="configs/example_model/example_training_cfg.yaml")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", default="null,1", help="comma-separated counts; null is torch's default")
    args = parser.parse_args()
    sides = args.threads.split(",")
    times = {side: [] for side in sides}
    model_dir = (REPO / yaml.safe_load((REPO / args.training_cfg).read_text())["model"]["model_flow_path"]).parent
    try:
        for r in range(args.rounds):
            for side in sides if r % 2 == 0 else sides[::-1]:
                times[side].append(train_seconds(args.training_cfg, args.epochs, side))
            print(f"round {r + 1}: " + ", ".join(f"{s} threads {times[s][-1]:.2f} s" for s in sides), flush=True)
    finally:
        shutil.rmtree(model_dir / "model_checkpoints" / FOLDER, ignore_errors=True)
        shutil.rmtree(REPO / "results" / model_dir.name / FOLDER, ignore_errors=True)
    print(f"{os.cpu_count()} cores, {args.training_cfg}, {args.epochs} epochs, {args.rounds} rounds, wall seconds:")
    base = statistics.median(times[sides[0]])
    for side in sides:
        median, q1, q3 = quartiles(times[side])
        print(f"  num_threads {side:>4}: median {median:.2f} (quartiles {q1:.2f}-{q3:.2f}), "
              f"{base / median:.2f}x the speed of {sides[0]}")


if __name__ == "__main__":
    main()

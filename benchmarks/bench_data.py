"""What the data pipeline costs: its loader against plain tensor slicing, and its share of training time.

    python benchmarks/bench_data.py                  # about 2-3 min on 2 (busy) CPU cores
    python benchmarks/bench_data.py --quick          # fewer rounds, shorter training runs
    python benchmarks/bench_data.py --json out.json  # also write every figure to out.json

1. Loader throughput (samples/s over whole epochs of in-memory streams, no transforms) of
   - plain: the hand-written loop `perm = torch.randperm(n); for i in range(0, n, B):
     batch = {k: v[perm[i:i+B]] for k, v in streams.items()}`, the least a shuffled epoch can cost;
   - loader: the pipeline's (dataset.build_dataset + dataset.EpochBatches + dataset.make_loader
     with num_workers=0, i.e. dataset.BatchLoader), as train.py builds it;
   - DataLoader: torch's DataLoader(num_workers=0, batch_sampler=EpochBatches,
     collate_fn=dataset.keep_batch) over the same dataset, which is what BatchLoader replaces.
   for the toy GAN (two [1,4,4] streams, 512 samples, batch 32: per-batch overhead is all there
   is), the U-Net (two [1,32,32] streams, 1024 samples, batch 16 and 64) and 3x64x64 images
   (8192 samples, batch 64). The three are timed in turn within each round (the order rotating
   from round to round), so that a slow spell of the machine hits every side of a ratio; printed
   are the medians over rounds of samples/s and of the ratios loader/plain and DataLoader/plain
   within a round, with the quartiles of loader/plain (the machine's noise). 1.0 means no cost
   over plain slicing. Target: loader/plain >= 0.9.
2. A per-sample torchvision.transforms.v2 transform (RandomHorizontalFlip, run sample by sample
   by dataset.Transform) against the vectorised dataset_functions.random_flip, both on both U-Net
   streams together through the same loader: samples/s of each and their ratio.
3. Data-wait share in real training: train.py runs as a subprocess on the toy GAN config and the
   U-Net config (into a throw-away save folder, removed afterwards); printed is the mean of
   metrics.jsonl's "data_wait" (the share of step time spent waiting for the loader, one row per
   step) over the training steps, leaving out the first log interval (start-up: first batches,
   lazy initialisation), and the wall time of each run (including ~5-10 s of Python and torch
   start-up). Target: < 5%.

Parts 1 and 2 run on one torch thread (--threads to change): on a busy machine two threads' intra-op
waits swamp the per-batch costs being measured. Timings are noisy on a shared machine: compare
ratios measured in one run, not figures across runs; nothing here asserts a timing.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dataset import EpochBatches, build_dataset, keep_batch, make_loader  # noqa: E402
from dataset_base import split_indices  # noqa: E402
from engine.config import check_dataset, checkpoint_dir, load_training_config, raise_if, results_dir  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

LOADER_CASES = [  # name, {stream: sample shape}, n, batch size
    ("toy GAN 2x[1,4,4], B=32", {"gen_inputs": [1, 4, 4], "real_images": [1, 4, 4]}, 512, 32),
    ("U-Net 2x[1,32,32], B=16", {"noisy_images": [1, 32, 32], "clean_images": [1, 32, 32]}, 1024, 16),
    ("U-Net 2x[1,32,32], B=64", {"noisy_images": [1, 32, 32], "clean_images": [1, 32, 32]}, 1024, 64),
    ("images [3,64,64], B=64", {"images": [3, 64, 64]}, 8192, 64),
]

TRAINING_RUNS = [  # name, config, epochs (default, --quick), extra --set overrides under --quick
    ("toy GAN", "configs/example_model/example_training_cfg.yaml", (3, 2), []),
    # 1024 samples, batch 16: 58 steps an epoch, about a minute on 2 busy cores. --quick trains on
    # the first 480 images of each (paired) stream instead.
    ("U-Net GAN", "configs/unet_gan/unet_gan_training_cfg.yaml", (1, 1),
     ["dataset.noisy_images.n_inputs=480", "dataset.clean_images.n_inputs=480"]),
]


def dataset_section(shapes, batch_transforms=()):
    """A validated dataset section with these streams (as generated ones; the benchmark supplies
    the tensors) and these batch_transforms, nothing else."""
    raw = {"data_len_key": next(iter(shapes)), "batch_transforms": list(batch_transforms),
           **{name: {"data_read_type": "function", "data_generating_function": "random_normal",
                     "data_generating_function_args": {"shape": shape}} for name, shape in shapes.items()}}
    errors = []
    section = check_dataset(raw, "dataset", errors)
    raise_if(errors, "bench_data")
    return section


def pipeline(shapes, n, batch_size, batch_transforms=()):
    """(streams, the pipeline's loader, torch's DataLoader over the same dataset and sampler)."""
    streams = {name: torch.randn(n, *shape) for name, shape in shapes.items()}
    section = dataset_section(shapes, batch_transforms)
    train_indices, _ = split_indices(n, section["validation_fraction"], section["split_seed"], "dataset")
    data = build_dataset(streams, section, train_indices, True, "dataset")
    sampler = EpochBatches(len(data), batch_size, seed=0)
    loader = make_loader(data, sampler, num_workers=0)
    torch_loader = DataLoader(data, batch_sampler=sampler, collate_fn=keep_batch, num_workers=0)
    return streams, loader, torch_loader


def plain_epoch(streams, n, batch_size):
    count = 0
    perm = torch.randperm(n)
    for i in range(0, n, batch_size):
        batch = {k: v[perm[i:i + batch_size]] for k, v in streams.items()}
        count += len(next(iter(batch.values())))
    return count


def loader_epoch(loader, epoch):
    loader.batch_sampler.set_epoch(epoch)
    count = 0
    for batch in loader:
        count += len(next(iter(batch.values())))
    return count


def time_epochs(run_epoch, epochs):
    """Seconds per epoch over `epochs` epochs, and the samples they gave."""
    start = time.perf_counter()
    samples = sum(run_epoch(e) for e in range(epochs))
    return (time.perf_counter() - start) / epochs, samples


def compare(contenders, n, rounds, block_s):
    """Median samples/s of each contender, and the per-round ratios of each to the first. Each
    round runs every contender for the same number of epochs (enough for about block_s seconds of
    the first), in an order that rotates from round to round."""
    names = list(contenders)
    for name in names:  # warm-up, and a check that every one gives a whole epoch
        _, samples = time_epochs(contenders[name], 2)
        if samples != 2 * n:
            raise SystemExit(f"{name}: {samples} samples in 2 epochs of {n}; the comparison would be meaningless")
    per_epoch, _ = time_epochs(contenders[names[0]], 3)
    epochs = max(1, round(block_s / per_epoch))
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(time_epochs(contenders[name], epochs)[0])
    rates = {name: n / statistics.median(t) for name, t in times.items()}
    ratios = {name: [base / t for base, t in zip(times[names[0]], times[name])] for name in names[1:]}
    return rates, ratios, epochs


def quartiles(values):
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q1, q3


def bench_loaders(rounds, block_s, image_samples):
    print("\n1. Loader throughput, samples/s over whole shuffled epochs of in-memory streams, no transforms.\n"
          "   plain = hand-written randperm + slicing loop; loader = dataset.make_loader(num_workers=0);\n"
          "   DataLoader = torch's, num_workers=0, same dataset and EpochBatches. Ratios are to plain, medians\n"
          "   over rounds of the ratio within a round (loader's quartiles: the machine's noise).")
    print(f"{'case':26} {'n':>5} {'plain':>10} {'loader':>10} {'DataLoader':>10} {'loader/plain':>12} "
          f"{'quartiles':>13} {'DL/plain':>8}  target")
    results = []
    for name, shapes, n, batch_size in LOADER_CASES:
        if "images" in shapes:
            n = image_samples
        streams, loader, torch_loader = pipeline(shapes, n, batch_size)
        # each lambda binds this case's objects (compare() calls them within this iteration only)
        contenders = {"plain": lambda e, s=streams, k=n, b=batch_size: plain_epoch(s, k, b),
                      "loader": lambda e, loader=loader: loader_epoch(loader, e),
                      "DataLoader": lambda e, torch_loader=torch_loader: loader_epoch(torch_loader, e)}
        rates, ratios, epochs = compare(contenders, n, rounds, block_s)
        ratio, dl_ratio = statistics.median(ratios["loader"]), statistics.median(ratios["DataLoader"])
        q1, q3 = quartiles(ratios["loader"])
        print(f"{name:26} {n:5} {rates['plain']:10.0f} {rates['loader']:10.0f} {rates['DataLoader']:10.0f} "
              f"{ratio:12.3f} {q1:6.3f}-{q3:<6.3f} {dl_ratio:8.3f}  >= 0.9 {'ok' if ratio >= 0.9 else 'MISSED'}")
        results.append({"case": name, "streams": shapes, "n": n, "batch_size": batch_size, "rounds": rounds,
                        "epochs_per_round": epochs, "plain_samples_per_s": rates["plain"],
                        "loader_samples_per_s": rates["loader"], "dataloader_samples_per_s": rates["DataLoader"],
                        "loader_over_plain": ratio, "loader_over_plain_quartiles": [q1, q3],
                        "dataloader_over_plain": dl_ratio,
                        "dataloader_over_plain_quartiles": quartiles(ratios["DataLoader"]),
                        "data_mb": sum(v.numel() * v.element_size() for v in streams.values()) / 2**20})
    return results


def bench_transforms(rounds, block_s):
    shapes = {"noisy_images": [1, 32, 32], "clean_images": [1, 32, 32]}
    n, batch_size = 1024, 16
    both = ["noisy_images", "clean_images"]
    loaders = {}
    for label, entry in (("none", None),
                         ("random_flip", {"transform": "random_flip", "args": {"horizontal": True}, "streams": both}),
                         ("RandomHorizontalFlip", {"transform": "RandomHorizontalFlip", "args": {"p": 0.5},
                                                   "streams": both})):
        loaders[label] = pipeline(shapes, n, batch_size, [entry] if entry else [])[1]
    print(f"\n2. A horizontal flip of both U-Net streams (2x[1,32,32], n={n}, B={batch_size}) through the loader:\n"
          "   the vectorised dataset_functions.random_flip (one op per batch) against torchvision's v2\n"
          "   RandomHorizontalFlip (which dataset.Transform runs sample by sample); samples/s, no-transform loader\n"
          "   for reference, ratios within a round.")
    contenders = {label: (lambda e, loader=loader: loader_epoch(loader, e)) for label, loader in loaders.items()}
    # Timed against random_flip: put it first so that blocks are sized on it.
    order = ["random_flip", "RandomHorizontalFlip", "none"]
    rates, ratios, epochs = compare({k: contenders[k] for k in order}, n, rounds, block_s)
    per_sample = statistics.median(ratios["RandomHorizontalFlip"])
    print(f"   no transform           {rates['none']:10.0f} samples/s\n"
          f"   random_flip            {rates['random_flip']:10.0f} samples/s\n"
          f"   RandomHorizontalFlip   {rates['RandomHorizontalFlip']:10.0f} samples/s   "
          f"({1 / per_sample:.1f}x the time of random_flip; quartiles of the ratio "
          f"{'-'.join(f'{1 / q:.1f}' for q in reversed(quartiles(ratios['RandomHorizontalFlip'])))})")
    return {"n": n, "batch_size": batch_size, "rounds": rounds, "epochs_per_round": epochs,
            "no_transform_samples_per_s": rates["none"], "random_flip_samples_per_s": rates["random_flip"],
            "RandomHorizontalFlip_samples_per_s": rates["RandomHorizontalFlip"],
            "RandomHorizontalFlip_time_over_random_flip": 1 / per_sample}


def data_wait(folder):
    """(mean data_wait over the training steps after the first log interval, steps counted,
    steps left out, the largest interval's share)."""
    log_interval = min(yaml.safe_load(p.read_text())["training"]["log_interval"]
                       for p in folder.glob("training_cfg_*.yaml"))
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [row for row in rows if "data_wait" in row]
    counted = [row["data_wait"] for row in rows if row["step"] > log_interval]
    if not counted:
        raise SystemExit(f"{folder}: no training step after the first log interval ({log_interval} steps)")
    return statistics.fmean(counted), len(counted), len(rows) - len(counted), max(counted)


def bench_training(quick, epochs_override):
    folder_name = f"bench_data_{os.getpid()}_{int(time.time())}"
    print("\n3. Data-wait share in real training runs (train.py as a subprocess, CPU): mean of metrics.jsonl's\n"
          "   data_wait over the training steps (one row per step), leaving out the first log interval\n"
          "   (warm-up); wall time includes start-up. Target: < 5%.")
    results, failed = [], []
    made = []
    try:
        for name, cfg_path, (epochs, quick_epochs), quick_sets in TRAINING_RUNS:
            epochs = epochs_override.get(name) or (quick_epochs if quick else epochs)
            sets = [f"saving.save_folder_name={folder_name}", f"training.n_epochs={epochs}",
                    *(quick_sets if quick else [])]
            cfg = load_training_config(REPO / cfg_path, sets)
            folder = checkpoint_dir(cfg)
            if folder.exists():
                raise SystemExit(f"{folder} exists already; it is not this benchmark's to overwrite")
            made += [folder, results_dir(cfg)]
            command = [sys.executable, "train.py", "-t", cfg_path, *[a for s in sets for a in ("--set", s)]]
            start = time.perf_counter()
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if done.returncode != 0:
                tail = (done.stdout + done.stderr)[-2000:]
                print(f"   {name}: train.py failed (exit status {done.returncode}):\n{tail}")
                failed.append(name)
                continue
            mean, counted, skipped, worst = data_wait(folder)
            print(f"   {name:10} {epochs} epoch{'s' * (epochs > 1)}: data wait {mean:6.2%} over {counted} steps "
                  f"(first {skipped} left out; largest interval {worst:.2%}), wall {wall:5.1f} s  "
                  f"target < 5% {'ok' if mean < 0.05 else 'MISSED'}")
            results.append({"run": name, "config": cfg_path, "overrides": sets[1:], "epochs": epochs,
                            "data_wait_mean": mean, "steps_counted": counted, "steps_left_out": skipped,
                            "data_wait_max_interval": worst, "wall_s": wall})
    finally:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)
    return results, failed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, fewer samples, shorter training runs")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    parser.add_argument("--toy-epochs", type=int, help="epochs of the toy GAN run (default 3, --quick 2)")
    parser.add_argument("--unet-epochs", type=int, help="epochs of the U-Net run (default 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for parts 1 and 2 (default 1: on a busy machine, two threads' "
                             "intra-op waits swamp the per-batch costs measured; train.py runs keep their default)")
    parser.add_argument("--skip-training", action="store_true", help="leave out the training runs (part 3)")
    args = parser.parse_args()
    torch.manual_seed(0)
    default_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    rounds, block_s, image_samples = (7, 0.03, 2048) if args.quick else (11, 0.05, 8192)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; parts 1-2 on {args.threads} torch thread(s), "
          f"training runs on torch's default ({default_threads})")
    figures = {"torch": torch.__version__, "threads": args.threads, "training_threads": default_threads,
               "quick": args.quick}
    figures["loader_vs_plain"] = bench_loaders(rounds, block_s, image_samples)
    figures["flip_transforms"] = bench_transforms(max(5, rounds // 2), block_s)
    failed = []
    if not args.skip_training:
        overrides = {"toy GAN": args.toy_epochs, "U-Net GAN": args.unet_epochs}
        figures["training_runs"], failed = bench_training(args.quick, overrides)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
        print(f"\nfigures written to {args.json}")
    if failed:
        raise SystemExit(f"training run(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

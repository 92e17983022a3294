"""What live logging costs the training loop: epochs with TensorBoard on against off.

    python benchmarks/bench_logging.py                  # the toy GAN: tiny steps, the worst case (about 1 min)
    python benchmarks/bench_logging.py -t configs/unet_gan/unet_gan_training_cfg.yaml --rounds 8
    python benchmarks/bench_logging.py --set training.log_interval=1   # a row per step, the most logging
    OMP_NUM_THREADS=1 valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        python benchmarks/bench_logging.py --only on --epochs 2   # instructions, which the noise does not move

A Trainer is built as train.py builds it (the config, the model, the loaders), and two runs are
started in temporary folders, one with logging.tensorboard off and one with it on. Every round
then trains --epochs epochs into each run (Trainer.run_epoch: the steps, metrics.jsonl rows every
training.log_interval steps, the progress bar; TensorBoard's writer thread writing its events
meanwhile), the two back to back in an order that alternates between rounds, so that a slow
spell of the machine hits both. The model trains on through the rounds; both sides train the same
epochs of data. Starting and closing a run (creating the writer; flushing its last events) happen
once per run and are timed apart.

Printed: the median time of each side, and TensorBoard's cost, the median over rounds of
(on / off - 1) within a round, with its quartiles (the machine's noise). Target: at most 2%.
As that difference of two noisy times is itself noisy, also the time the training thread spends
inside Dashboard.scalars (building and queueing the events; all TensorBoard adds to the loop, its
writer thread aside), as a share of the side's time, which the noise barely moves.

--only on|off|none trains --epochs epochs of one side and times nothing, for counting
instructions; as Trainer.fit does, each epoch's end draws the sample grid (on: a TensorBoard
image; off: a PNG; none: no metrics.jsonl, no TensorBoard and no grid, the logging all off).
Run it under callgrind with --epochs K and 2K for each side; the difference of the two counts is
what K epochs cost, start-up cancelled, and on / none of those differences is the default
logging's cost in instructions (the writer thread's included). Count with OMP_NUM_THREADS=1:
torch's OpenMP threads spin while they wait for work, and under valgrind, which runs one thread
at a time, that spinning grows with wall time, not with work (seen: +42% on against none with two
threads, nearly all of it in libgomp). Give valgrind the Python binary itself (python -c 'import
sys; print(sys.executable)'), not a wrapper script such as a pyenv shim, which valgrind would
follow no further.
Also the cost of the grid of generated samples at an epoch's end (TensorBoard image, or the PNG
written without it), which runs once per logging.image_every epochs, outside the steps.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm  # noqa: E402  (after the repository is on the path)

from engine.config import load_training_config  # noqa: E402
from engine.loop import Trainer  # noqa: E402
from engine.model_base import build_model  # noqa: E402
from engine.placement import seed_everything, setup_placement
from engine.runs import Run  # noqa: E402
from train import make_loaders  # noqa: E402


def quartiles(values):
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q1, q3


def timed_scalars(board, inside):
    """Have `board.scalars` add the seconds of each call to `inside`."""
    scalars = board.scalars

    def timed(rows):
        start = time.perf_counter()
        scalars(rows)
        inside.append(time.perf_counter() - start)
    board.scalars = timed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-t", "--training_cfg", default="configs/example_model/example_training_cfg.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=5, help="epochs per side and round")
    parser.add_argument("--only", choices=["on", "off", "none"],
                        help="train --epochs epochs of this side (none: no logging at all), time nothing")
    args = parser.parse_args()
    cfg = load_training_config(args.training_cfg, args.overrides + ["training.gpus=[]"])
    seed_everything(cfg["training"]["seed"])
    placement = setup_placement([], args.training_cfg)
    model = build_model(cfg["model"])
    loader, validation_loader = make_loaders(cfg, model, placement, args.training_cfg)
    trainer = Trainer(cfg, model, loader, placement, None, validation_loader)
    bar = tqdm(disable=True)
    if args.only:
        with tempfile.TemporaryDirectory() as tmp:
            trainer.run = Run(Path(tmp) / "run", Path(tmp) / "results")
            if args.only != "none":  # none: no metrics.jsonl, no TensorBoard, no grid
                trainer.run.start(cfg, trainer.step, {}, args.only == "on")
            for epoch in range(1, args.epochs + 1):
                trainer.run_epoch(epoch, bar)
                if args.only != "none" and epoch % trainer.image_every == 0:  # as Trainer.fit does at an epoch's end
                    sampler = trainer.sampler
                    trainer.run.log_images(epoch, trainer.step, *sampler.sample_outputs(), sampler.image_range)
            trainer.run.close()
        return
    print(f"{args.training_cfg}: {trainer.steps_per_epoch} steps per epoch, metrics every "
          f"{cfg['training']['log_interval']} steps, {args.rounds} rounds (+1 warm-up) of {args.epochs} epochs a side")
    times, cpu_times, images, once, inside = {False: [], True: []}, {False: [], True: []}, {False: [], True: []}, {}, []
    with tempfile.TemporaryDirectory() as tmp:
        runs = {tensorboard: Run(Path(tmp) / str(tensorboard), Path(tmp) / "results") for tensorboard in (False, True)}
        for tensorboard, run in runs.items():
            start = time.perf_counter()
            run.start(cfg, trainer.step, {}, tensorboard)
            once[tensorboard] = time.perf_counter() - start
        timed_scalars(runs[True].dashboard, inside)
        for round_ in range(args.rounds + 1):
            for tensorboard in ((False, True) if round_ % 2 else (True, False)):
                trainer.run = runs[tensorboard]
                start, cpu = time.perf_counter(), time.process_time()
                for epoch in range(1, args.epochs + 1):
                    trainer.run_epoch(epoch, bar)
                elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
                start = time.perf_counter()
                trainer.run.log_images(1, trainer.step, trainer.sampler.sample_outputs())
                images[tensorboard].append(time.perf_counter() - start)
                if round_:  # the first round warms up
                    times[tensorboard].append(elapsed)
                    cpu_times[tensorboard].append(cpu)
                if not round_ and tensorboard:
                    inside.clear()
        for tensorboard, run in runs.items():
            start = time.perf_counter()
            run.close()
            once[tensorboard] += time.perf_counter() - start
    off, on = times[False], times[True]
    costs = [b / a - 1 for a, b in zip(off, on)]
    q1, q3 = quartiles(costs)
    print(f"{args.epochs} epochs, TensorBoard off: {statistics.median(off) * 1e3:8.1f} ms (median of {len(off)})")
    print(f"{args.epochs} epochs, TensorBoard on:  {statistics.median(on) * 1e3:8.1f} ms")
    print(f"TensorBoard's cost: {statistics.median(costs):+.1%} of the training time (quartiles {q1:+.1%} .. "
          f"{q3:+.1%}); target: at most +2.0%")
    cpu_costs = [b / a - 1 for a, b in zip(cpu_times[False], cpu_times[True])]
    q1, q3 = quartiles(cpu_costs)
    print(f"in CPU time (all threads): {statistics.median(cpu_costs):+.1%} (quartiles {q1:+.1%} .. {q3:+.1%})")
    share, per_side = sum(inside) / sum(on), sum(inside) / len(on)
    print(f"inside Dashboard.scalars: {per_side * 1e3:.2f} ms of the {statistics.median(on) * 1e3:.0f} ms, "
          f"{share:.2%} of the training time ({len(inside) / len(on):.0f} calls, "
          f"{sum(inside) / len(inside) * 1e6:.0f} us each)")
    print(f"starting and closing a run, once per run: {once[True] * 1e3:.0f} ms with TensorBoard, "
          f"{once[False] * 1e3:.0f} ms without")
    print(f"sample grid at an epoch's end: {statistics.median(images[True]) * 1e3:.1f} ms as a TensorBoard image, "
          f"{statistics.median(images[False]) * 1e3:.1f} ms as a PNG")


if __name__ == "__main__":
    main()

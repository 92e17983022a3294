"""What the pipeline's training step costs: loop.Trainer against a minimal hand-written loop.

    python benchmarks/bench_train_loop.py                      # about 2-3 min on 2 CPU cores
    python benchmarks/bench_train_loop.py --quick              # fewer rounds, a rougher figure (1-2 min)
    python benchmarks/bench_train_loop.py --size 8 --width 8 --batch-size 4 --cases fp32 --rounds 40
                                                               # tiny steps: the Trainer's fixed cost shows
    python benchmarks/bench_train_loop.py --device cuda --size 64 --width 64   # pytorch/examples' DCGAN
    python benchmarks/bench_train_loop.py --json out.json      # also write every figure to out.json
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_train_loop.py --cases fp32
                                                               # both sides under DDP, one process per GPU/CPU share

The model is a DCGAN (pytorch/examples/dcgan: latent nz x 1 x 1 -> ConvTranspose2d / BatchNorm2d /
ReLU stages -> Tanh image; image -> Conv2d / BatchNorm2d / LeakyReLU stages -> one logit), trained
with the least-squares GAN loss (loss.least_squares_gan_loss) and Adam (lr 2e-4, betas 0.5, 0.999)
for both networks, discriminator first, one update of each per batch. The reference work is the
DCGAN at 64x64 with ngf = ndf = 64 (--size 64 --width 64, for a GPU); the default, 32x32 images
with ngf = ndf = 32 at batch 32, keeps a CPU run short.

Two sides train the same model from the same weights on the same pre-made batches (already on
the device, cycled), with the same optimizers and precision:
- pipeline: the model as the pipeline's architecture YAML plus a flow module, generated into a
  temporary folder with a training config, and built as train.py builds it
  (config.load_training_config, model_base.build_model, train.make_loaders,
  loop.Trainer(cfg, model, loader, Placement(device))); timed is Trainer.train_step(batch)
  alone (no progress bar, metrics.jsonl or checkpoints, which train.py's loop adds every
  log_interval steps and epochs). With training.on_nonfinite_loss: stop, its default, each
  update checks its loss for NaN/inf, one host-device sync; --on-nonfinite ignore leaves it out.
- hand: the DCGAN of pytorch/examples written out (nn.Sequential generator and discriminator, the
  pipeline model's initial weights copied in) and its training step: fake = G(z); the
  discriminator's loss on D(real) and D(fake.detach()), backward, step; the generator's loss on
  D(fake), backward, step. Unlike the example, the generator's backward computes only the
  generator's gradients (backward(inputs=...)), as the pipeline's does, so both sides do the same
  arithmetic; the example's also computes the discriminator's, which the next step throws away.
  Precision is torch.autocast around the forward passes and losses, as training.precision does.

Cases: fp32, bf16 (training.precision: bf16; autocast to bfloat16, on the CPU too), own (fp32, the
pipeline's model with a flow that writes its own step, `losses`, and a networks section: the hand
loop's math line for line; target >= 0.95 as for the built-in step), and when the
config has training.compile, the compiled variants (training.compile: true on the pipeline side;
torch.compile of the generator and discriminator on the hand side), each case a fresh pair built
from the same initial weights. On a GPU both sides' Adam is fused (the pipeline's default there),
so that these cases compare identical settings. On a GPU, also `best`: the pipeline's fastest
settings (bf16, fused Adam, training.cuda_graphs; the batches already on the GPU, as
dataset.on_device gives them) against the loop most people write, eager fp32 with torch's
default (foreach) Adam. Target: >= 2.0. After a warm-up (the first step, which for the compiled cases
includes compiling, is timed and printed: about a minute for all four on 2 CPU cores with a cold
inductor cache; the pipeline side compiles second and may reuse kernels that the hand side's
identical graphs left in the cache), every round times one block of steps of every side of
every case: the cases in an order that rotates from round to round, the two sides of a case back
to back in an order that alternates, so that a slow spell of the machine hits both sides of a
ratio. A case's block has as many steps as take about --block-s seconds (measured in the warm-up;
a bf16 step on a CPU without bf16 instructions can take 20x an fp32 one). Printed:

- steps/s of each side, the median over rounds (one step = one discriminator and one generator
  update on one batch), images/s (steps/s x batch) and, on a GPU, each side's peak memory
  (torch.cuda.max_memory_allocated over its blocks);
- pipeline/hand: the median over rounds of the ratio of the two sides' steps/s within a round,
  with its quartiles (the machine's noise). 1.0 means the Trainer costs nothing over the hand loop.
  Target: >= 0.95, on the CPU and on a GPU;
- extra ms/step: the median over rounds of the pipeline's step time minus the hand loop's, the
  Trainer's own cost per step (a fixed cost: it weighs more the faster a step is, as on a GPU);
- whether bf16 and compile help: each variant's steps/s over fp32's, on the same side, again the
  median of per-round ratios (above 1: faster), with a verdict (helps / hurts) only when the
  quartiles of both sides lie above / below 1. On a CPU without bf16 instructions (AVX-512 BF16,
  AMX) bf16 is expected to be slower;
- a sanity check, after the timing: from identical fresh weights, one fp32 step of each side on the
  same batch must give the same losses and weights (allclose), so that the two sides compute the
  same thing and the comparison is apples to apples.

Under torchrun both sides train with DDP, each process on its own shard of the batches: the
pipeline through the Trainer's wrapper per network, the hand loop the way one writes it by hand
(the generator and the discriminator each in a DistributedDataParallel, the generator's loss
scored by the discriminator's unwrapped module so that only the generator's gradients are
reduced; neither side synchronises buffers at each forward pass). The processes agree on the
steps of each block and warm up for exactly --warmup steps, so that their collectives pair up;
rank 0 prints its timings.

Timings are noisy on a shared machine: compare ratios measured in one run, not figures across runs;
nothing here asserts a timing.
"""
import argparse
import copy
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import config  # noqa: E402
from engine.loop import Trainer  # noqa: E402
from engine.model_base import build_model  # noqa: E402
from engine.placement import Placement, seed_everything, setup_placement
from train import make_loaders  # noqa: E402

NZ, NC = 100, 3  # latent size and image channels of pytorch/examples' DCGAN
CASES = ["fp32", "bf16", "own", "compile", "compile-bf16", "best"]
TARGETS = {"best": 2.0}  # pipeline / hand steps/s; every other case: 0.95
SEED = 0

FLOW = '''"""The DCGAN's flow (generated by benchmarks/bench_train_loop.py)."""
from engine.model_base import PyNet


class DCGAN(PyNet):
    target_key = "real_images"

    def forward(self, inputs):
        return self.model_components["generator"]["gen"](inputs, {})

    def discriminate(self, images, inputs=None):
        return self.model_components["discriminator"]["disc"](images, {})
'''

# The `own` case: the same DCGAN whose flow writes its step (docs/training.md, "Write your own
# step"), the hand loop's math line for line: the discriminator's update makes the fakes, and the
# generator's reuses them with their graph.
OWN_STEP = FLOW + '''
    def losses(self, network, batch, step):
        z, real = batch["gen_inputs"], batch["real_images"]
        if network == "discriminator":
            step["fake"] = fake = self(z)
            return {"d": 0.5 * ((self.discriminate(real) - 1) ** 2).mean()
                    + 0.5 * (self.discriminate(fake.detach()) ** 2).mean()}
        return {"g": 0.5 * ((self.discriminate(step.pop("fake")) - 1) ** 2).mean()}
'''
OWN_NETWORKS = "networks={discriminator: {components: [discriminator]}, generator: {components: [generator]}}"


def ddp(module):
    """A DistributedDataParallel of `module` as one writes it by hand (buffers not synchronised at
    each forward pass, as the pipeline's are not)."""
    return nn.parallel.DistributedDataParallel(module, broadcast_buffers=False)


def stages(size):
    """Stride-2 stages between 4x4 and size x size (4 for 64x64, as in the DCGAN)."""
    n = int(math.log2(size)) - 2
    if size < 8 or 2 ** (n + 2) != size:
        raise SystemExit(f"--size {size}: must be a power of two, at least 8")
    return n


def architecture(size, width):
    """The DCGAN as the pipeline's architecture YAML (a dict)."""
    n = stages(size)
    gen = [{"ConvTranspose2d": {"out_channels": width * 2 ** (n - 1), "kernel_size": 4, "stride": 1, "padding": 0,
                                "bias": False}}, {"BatchNorm2d": None}, {"ReLU": {"inplace": True}}]
    for k in range(n - 2, -1, -1):
        gen += [{"ConvTranspose2d": {"out_channels": width * 2 ** k, "kernel_size": 4, "stride": 2, "padding": 1,
                                     "bias": False}}, {"BatchNorm2d": None}, {"ReLU": {"inplace": True}}]
    gen += [{"ConvTranspose2d": {"out_channels": NC, "kernel_size": 4, "stride": 2, "padding": 1, "bias": False}},
            {"Tanh": None}]
    disc = [{"Conv2d": {"out_channels": width, "kernel_size": 4, "stride": 2, "padding": 1, "bias": False}},
            {"LeakyReLU": {"negative_slope": 0.2, "inplace": True}}]
    for k in range(1, n):
        disc += [{"Conv2d": {"out_channels": width * 2 ** k, "kernel_size": 4, "stride": 2, "padding": 1,
                             "bias": False}}, {"BatchNorm2d": None},
                 {"LeakyReLU": {"negative_slope": 0.2, "inplace": True}}]
    disc += [{"Conv2d": {"out_channels": 1, "kernel_size": 4, "stride": 1, "padding": 0, "bias": False}},
             {"Flatten": None}]
    return {"model_components": {"generator": {"adv_type": "generator", "submodels": ["gen"]},
                                 "discriminator": {"adv_type": "discriminator", "submodels": ["disc"]}},
            "gen": {"submodel_input": {"input_data": {"data_key": "gen_inputs", "input_size": [NZ, 1, 1]}},
                    "layer_name_prefix": "gen", "layers": gen},
            "disc": {"submodel_input": {"gen": "output"}, "layer_name_prefix": "disc", "layers": disc}}


class Generator(nn.Module):
    """pytorch/examples' DCGAN generator, at any power-of-two size."""

    def __init__(self, size, ngf):
        super().__init__()
        n = stages(size)
        layers = [nn.ConvTranspose2d(NZ, ngf * 2 ** (n - 1), 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 2 ** (n - 1)),
                  nn.ReLU(True)]
        for k in range(n - 2, -1, -1):
            layers += [nn.ConvTranspose2d(ngf * 2 ** (k + 1), ngf * 2 ** k, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(ngf * 2 ** k), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(ngf, NC, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, x):
        return self.main(x)


class Discriminator(nn.Module):
    """pytorch/examples' DCGAN discriminator, returning logits (no Sigmoid: the loss is least squares)."""

    def __init__(self, size, ndf):
        super().__init__()
        n = stages(size)
        layers = [nn.Conv2d(NC, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        for k in range(1, n):
            layers += [nn.Conv2d(ndf * 2 ** (k - 1), ndf * 2 ** k, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2 ** k),
                       nn.LeakyReLU(0.2, inplace=True)]
        layers += [nn.Conv2d(ndf * 2 ** (n - 1), 1, 4, 1, 0, bias=False), nn.Flatten()]
        self.main = nn.Sequential(*layers)

    def forward(self, x):
        return self.main(x)


def dcgan_init(module):
    """The DCGAN's weight initialisation (pytorch/examples' weights_init)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def copy_weights(source, target):
    """Copy `source`'s state (parameters and buffers, in order) into `target` (same layers)."""
    src, dst = list(source.state_dict().values()), target.state_dict()
    if len(src) != len(dst) or any(a.shape != b.shape for a, b in zip(src, dst.values())):
        raise SystemExit("the hand-written DCGAN does not match the generated architecture")
    target.load_state_dict(dict(zip(dst, src)))


def write_run(folder, args, n_samples):
    """The architecture YAML, the flow, the real images (.npy) and the training config; returns the config's path."""
    folder = Path(folder)
    arch = architecture(args.size, args.width)
    (folder / "dcgan_architecture.yaml").write_text(yaml.safe_dump(arch, sort_keys=False))
    (folder / "dcgan.py").write_text(FLOW)
    (folder / "dcgan_own.py").write_text(OWN_STEP)
    images = np.tanh(np.random.default_rng(SEED).standard_normal((n_samples, NC, args.size, args.size), np.float32))
    np.save(folder / "real_images.npy", images)
    cfg = {
        "training": {"n_epochs": 1, "learning_rate": 2e-4, "optimizer": "Adam",
                     "optimizer_args": {"betas": [0.5, 0.999]}, "batch_size": args.batch_size, "seed": SEED,
                     "gpus": [torch.device(args.device).index or 0] if args.device.startswith("cuda") else [],
                     "on_nonfinite_loss": args.on_nonfinite},
        "adversarial": {"enable_adversarial_training": True, "train_disc_first": True},
        "model": {"architecture_cfg_path": str(folder / "dcgan_architecture.yaml"),
                  "model_flow_path": str(folder / "dcgan.py")},
        "loss": {"loss_fn": "least_squares_gan_loss"},
        "saving": {"save_folder_name": "bench_train_loop"},  # nothing is saved: train_step only
        "dataset": {"data_len_key": "real_images",
                    "gen_inputs": {"n_inputs": n_samples, "data_read_type": "function",
                                   "data_generating_function": "random_normal",
                                   "data_generating_function_args": {"shape": [NZ, 1, 1]}},
                    "real_images": {"data_read_type": "file", "data_path": str(folder / "real_images.npy"),
                                    "file_reader": "read_npy"}},
    }
    path = folder / "dcgan_training_cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class PipelineSide:
    """Trainer.train_step of a model built as train.py builds it."""

    def __init__(self, cfg_path, overrides, placement, init_state):
        cfg = config.load_training_config(cfg_path, overrides)
        self.model = build_model(cfg["model"])
        self.model.load_state_dict(init_state)
        loader, _ = make_loaders(cfg, self.model, placement, str(cfg_path))
        self.loader = loader
        self.trainer = Trainer(cfg, self.model, loader, placement)

    def step(self, batch):
        terms, _ = self.trainer.train_step(batch)
        return terms["discriminator"]["total"], terms["generator"]["total"]


class HandSide:
    """The DCGAN example's training step, written out."""

    def __init__(self, pipeline_model, size, width, device, precision, compiled, distributed=False, fused=None):
        self.G, self.D = Generator(size, width).to(device), Discriminator(size, width).to(device)
        copy_weights(pipeline_model.components_of("generator"), self.G)
        copy_weights(pipeline_model.components_of("discriminator"), self.D)
        self.g_params = list(self.G.parameters())
        fused = torch.device(device).type == "cuda" if fused is None else fused  # (as the pipeline chooses)
        self.opt_g = torch.optim.Adam(self.g_params, lr=2e-4, betas=(0.5, 0.999), fused=fused or None)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=2e-4, betas=(0.5, 0.999), fused=fused or None)
        self.netG, self.netD = (torch.compile(self.G), torch.compile(self.D)) if compiled else (self.G, self.D)
        # Under DDP the networks train through their wrappers; the generator's loss is scored by
        # the bare discriminator, whose gradients it does not need.
        self.trainG, self.trainD = (ddp(self.netG), ddp(self.netD)) if distributed else \
            (self.netG, self.netD)
        self.device_type = torch.device(device).type
        self.dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def step(self, batch):
        z, real = batch["gen_inputs"], batch["real_images"]
        with self.autocast():
            fake = self.trainG(z)
            err_d = 0.5 * ((self.trainD(real) - 1) ** 2).mean() + 0.5 * (self.trainD(fake.detach()) ** 2).mean()
        self.opt_d.zero_grad(set_to_none=True)
        err_d.backward()
        self.opt_d.step()
        with self.autocast():
            err_g = 0.5 * ((self.netD(fake) - 1) ** 2).mean()
        self.opt_g.zero_grad(set_to_none=True)
        err_g.backward(inputs=self.g_params)
        self.opt_g.step()
        return err_d.detach(), err_g.detach()


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_block(side, batches, n, device):
    """Seconds per step over n steps (cycling through the batches), and the peak memory
    allocated meanwhile (bytes, on a GPU; else None)."""
    synchronize(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(n):
        side.step(batches[i % len(batches)])
    synchronize(device)
    return (time.perf_counter() - start) / n, torch.cuda.max_memory_allocated(device) if cuda else None


def warm_up(side, batches, n, block_s, device, stop_early=True):
    """Run the first step (lazy initialisation, compiling) and up to n - 1 more, stopping early once
    they take over 2 * block_s (unless not `stop_early`: DDP processes must run the same steps);
    returns (seconds of the first step, seconds of each later one)."""
    later = []
    for i in range(max(n, 2)):
        synchronize(device)
        start = time.perf_counter()
        side.step(batches[i % len(batches)])
        synchronize(device)
        later.append(time.perf_counter() - start)
        if stop_early and i >= 2 and sum(later[1:]) > 2 * block_s:
            break
    return later[0], later[1:]


def quartiles(values):
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q1, q3


def make_batches(loader, n_batches, device):
    batches = []
    loader.batch_sampler.set_epoch(1)
    for batch in loader:
        batches.append({k: v.to(device) for k, v in batch.items()})
        if len(batches) == n_batches:
            break
    return batches


def sanity_check(cfg_path, placement, init_state, batch, args):
    """One fp32 step of fresh sides from the same weights on one batch: (the pipeline's losses, the
    hand loop's, the largest difference of their weights after the step, whether both are the same
    and the weights moved)."""
    pipeline = PipelineSide(cfg_path, ["training.precision=fp32"], placement, init_state)
    hand = HandSide(pipeline.model, args.size, args.width, placement.device, "fp32", False, placement.distributed)
    pipe_losses = [v.item() for v in pipeline.step(batch)]
    hand_losses = [v.item() for v in hand.step(batch)]
    model = pipeline.model
    pipe_after = [*model.components_of("generator").state_dict().values(),
                  *model.components_of("discriminator").state_dict().values()]
    hand_after = [*hand.G.state_dict().values(), *hand.D.state_dict().values()]
    weight_diff = max((a.double() - b.double()).abs().max().item() for a, b in zip(pipe_after, hand_after))
    same_weights = all(torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6)
                       for a, b in zip(pipe_after, hand_after))
    moved = any(not torch.equal(a.cpu(), b) for a, b in zip(model.state_dict().values(), init_state.values()))
    same_losses = all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7) for a, b in zip(pipe_losses, hand_losses))
    return pipe_losses, hand_losses, weight_diff, same_losses and same_weights and moved


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, a rougher figure")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    parser.add_argument("--size", type=int, default=32, help="image size, a power of two (default 32; the DCGAN: 64)")
    parser.add_argument("--width", type=int, default=32, help="ngf = ndf (default 32; the DCGAN: 64)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per step (default 32)")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 12, --quick 5)")
    parser.add_argument("--block-s", type=float, help="seconds a side's block should take, which sets each case's "
                                                       "steps per block (default 0.5, --quick 0.25)")
    parser.add_argument("--block", type=int, help="steps per side per round instead, for every case")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps per side first, at least 2 (default 5; fewer when steps are slow)")
    parser.add_argument("--cases", help="comma-separated, of fp32, bf16, own, compile, compile-bf16 (default: all that "
                                        "apply; compile ones only if the config has training.compile)")
    parser.add_argument("--on-nonfinite", default="stop", choices=["stop", "skip", "ignore"],
                        help="the pipeline's training.on_nonfinite_loss (default stop, its default: one host sync "
                             "per update; ignore saves it)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="cudnn.benchmark on (the DCGAN example's setting) instead of train.py's deterministic "
                             "kernels (seed_everything), for both sides")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this machine has no GPU")
    if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun: one GPU (or a share of the CPU) per process
        gpus = list(range(int(os.environ["LOCAL_WORLD_SIZE"]))) if device.type == "cuda" else []
        placement = setup_placement(gpus, "benchmarks/bench_train_loop.py")
        device = placement.device
    else:
        placement = Placement(device)
    try:
        run(args, placement)
    finally:
        if placement.distributed:
            dist.destroy_process_group()


def run(args, placement):
    device = placement.device
    say = print if placement.is_main else (lambda *_, **__: None)
    rounds = args.rounds or (5 if args.quick else 12)
    block_s = args.block_s or (0.25 if args.quick else 0.5)
    has_compile = "compile" in config.TRAINING["training"]
    best = device.type == "cuda" and not placement.distributed  # (CUDA graphs: one GPU, no DDP)
    cases = ["fp32", "bf16", "own"] + (["compile", "compile-bf16"] if has_compile else []) + (["best"] if best else [])
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in CASES]
        if unknown:
            raise SystemExit(f"--cases: unknown {unknown}; valid: {', '.join(CASES)}")
        if not has_compile and any(c.startswith("compile") for c in wanted):
            raise SystemExit("--cases: this config has no training.compile")
        if not best and "best" in wanted:
            raise SystemExit("--cases best: needs one GPU (--device cuda, not under torchrun)")
        cases = wanted
    n_batches = 4
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    if placement.distributed:
        where += f"; DDP, {placement.world_size} processes, batch {args.batch_size} each"
    say(f"torch {torch.__version__}, {device} ({where}); DCGAN {NC}x{args.size}x{args.size}, nz {NZ}, "
        f"ngf = ndf = {args.width}, batch {args.batch_size}; {rounds} rounds, blocks of "
        f"{f'{args.block} steps' if args.block else f'~{block_s} s'} per side; up to {args.warmup} warm-up steps; "
        f"on_nonfinite_loss: {args.on_nonfinite}"
        + (f"; cudnn.benchmark {args.cudnn_benchmark}" if device.type == "cuda" else ""))
    figures = {"torch": torch.__version__, "device": str(device), "device_name": where, "size": args.size,
               "width": args.width, "batch_size": args.batch_size, "rounds": rounds, "block_s": block_s,
               "block": args.block,
               "warmup": args.warmup, "on_nonfinite_loss": args.on_nonfinite, "quick": args.quick,
               "training_compile_available": has_compile, "cases": {}}

    tmp = tempfile.mkdtemp(prefix="bench_train_loop_")
    try:
        cfg_path = write_run(tmp, args, n_batches * args.batch_size)
        seed_everything(SEED)  # as train.py does (cuDNN's deterministic kernels too)
        if args.cudnn_benchmark:
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
        base = build_model(config.load_training_config(cfg_path)["model"])
        base.apply(dcgan_init)
        init_state = copy.deepcopy(base.state_dict())

        sides, warmup, steps = {}, {}, {}
        batches = None
        for case in cases:
            precision = "bf16" if case.endswith("bf16") or case == "best" else "fp32"
            compiled = case.startswith("compile")
            overrides = [f"training.precision={precision}"] + (["training.compile=true"] if compiled else []) \
                + (["training.cuda_graphs=true"] if case == "best" else []) \
                + ([f"model.model_flow_path={Path(tmp) / 'dcgan_own.py'}", "loss.loss_fn=null", OWN_NETWORKS,
                    "adversarial.enable_adversarial_training=false"] if case == "own" else [])
            pipeline = PipelineSide(cfg_path, overrides, placement, init_state)
            if batches is None:
                batches = make_batches(pipeline.loader, n_batches, device)
            if case == "best":  # against the plain loop: eager fp32, torch's default Adam
                hand = HandSide(pipeline.model, args.size, args.width, device, "fp32", False, fused=False)
            else:
                hand = HandSide(pipeline.model, args.size, args.width, device, precision, compiled,
                                placement.distributed)
            sides[case] = {"hand": hand, "pipeline": pipeline}
            for name, side in sides[case].items():
                first, rest = warm_up(side, batches, args.warmup, block_s, device, stop_early=not placement.distributed)
                warmup[case, name] = first, rest
            est = statistics.median([t for name in ("hand", "pipeline") for t in warmup[case, name][1]])
            steps[case] = args.block or max(1, round(block_s / est))
            if placement.distributed:  # rank 0's count, so that every process runs the same steps
                count = torch.tensor([steps[case]], device=device)
                dist.broadcast(count, 0)
                steps[case] = int(count.item())
            say(f"  {case:13} first step (compiling included): hand {warmup[case, 'hand'][0]:.1f} s, pipeline "
                f"{warmup[case, 'pipeline'][0]:.1f} s; then ~{est * 1e3:.0f} ms a step: {steps[case]} step(s) a block")

        times = {(case, name): [] for case in cases for name in ("hand", "pipeline")}
        peaks = {(case, name): 0 for case in cases for name in ("hand", "pipeline")}
        start = time.perf_counter()
        for r in range(rounds):
            for case in cases[r % len(cases):] + cases[:r % len(cases)]:
                order = ("hand", "pipeline") if r % 2 == 0 else ("pipeline", "hand")
                for name in order:
                    seconds, peak = run_block(sides[case][name], batches, steps[case], device)
                    times[case, name].append(seconds)
                    peaks[case, name] = max(peaks[case, name], peak or 0)
        timed_s = time.perf_counter() - start

        say(f"\nsteps/s (median over rounds; one step = a discriminator and a generator update), pipeline/hand "
            f"(median of per-round ratios, quartiles = the machine's noise); timing took {timed_s:.0f} s")
        say(f"{'case':13} {'hand':>9} {'pipeline':>9} {'pipeline/hand':>14} {'quartiles':>13} {'extra ms/step':>14}  "
            f"{'target':11} {'images/s hand, pipeline':>24} {'peak MiB hand, pipeline':>24}")
        for case in cases:
            hand_t, pipe_t = times[case, "hand"], times[case, "pipeline"]
            ratios = [h / p for h, p in zip(hand_t, pipe_t)]
            ratio, (q1, q3) = statistics.median(ratios), quartiles(ratios)
            extra = statistics.median(p - h for h, p in zip(hand_t, pipe_t))
            target = TARGETS.get(case, 0.95)
            hand_rate, pipe_rate = 1 / statistics.median(hand_t), 1 / statistics.median(pipe_t)
            peak = [peaks[case, name] / 2**20 for name in ("hand", "pipeline")]
            say(f"{case:13} {hand_rate:9.2f} {pipe_rate:9.2f} {ratio:14.3f} {q1:6.3f}-{q3:<6.3f} {extra * 1e3:14.3f}  "
                f">= {target:<4} {'ok' if ratio >= target else 'MISSED':6} "
                f"{hand_rate * args.batch_size:11.0f}, {pipe_rate * args.batch_size:10.0f} "
                + (f"{peak[0]:12.1f}, {peak[1]:10.1f}" if device.type == "cuda" else f"{'-':>24}"))
            figures["cases"][case] = {
                "hand_steps_per_s": hand_rate, "pipeline_steps_per_s": pipe_rate,
                "hand_images_per_s": hand_rate * args.batch_size, "pipeline_images_per_s": pipe_rate * args.batch_size,
                "pipeline_over_hand": ratio, "pipeline_over_hand_quartiles": [q1, q3], "target": target,
                "pipeline_extra_s_per_step": extra,
                "peak_memory_bytes": {"hand": peaks[case, "hand"], "pipeline": peaks[case, "pipeline"]}
                if device.type == "cuda" else None,
                "steps_per_block": steps[case],
                "first_step_s": {"hand": warmup[case, "hand"][0], "pipeline": warmup[case, "pipeline"][0]}}
        if "best" in cases:
            say("(best: the pipeline in bf16 with fused Adam and CUDA graphs against the plain hand loop, eager fp32 "
                "with torch's default Adam)")

        variants = [c for c in cases if c not in ("fp32", "best", "own")]
        if "fp32" in cases and variants:
            say("\ndo bf16 / compile help? steps/s of each variant over fp32's on the same side (median of per-round "
                "ratios; above 1: faster)")
            say(f"{'variant':13} {'hand':>7} {'quartiles':>13} {'pipeline':>9} {'quartiles':>13}")
            figures["speedup_over_fp32"] = {}
            for case in variants:
                row, figure = f"{case:13}", {}
                for name, width in (("hand", 7), ("pipeline", 9)):
                    ratios = [f / v for f, v in zip(times["fp32", name], times[case, name])]
                    speedup, (q1, q3) = statistics.median(ratios), quartiles(ratios)
                    row += f" {speedup:{width}.3f} {q1:6.3f}-{q3:<6.3f}"
                    figure[name] = {"median": speedup, "quartiles": [q1, q3]}
                # a verdict only where the quartiles of both sides are on one side of 1
                verdict = "helps" if min(f["quartiles"][0] for f in figure.values()) > 1 else \
                    "hurts" if max(f["quartiles"][1] for f in figure.values()) < 1 else "no clear change"
                say(f"{row}  {verdict}")
                figures["speedup_over_fp32"][case] = figure | {"verdict": verdict}
        if not has_compile:
            say("(config.TRAINING has no training.compile: the compiled cases are left out)")

        pipe_losses, hand_losses, weight_diff, same = sanity_check(cfg_path, placement, init_state, batches[0], args)
        say(f"\nsanity: one fp32 step of each from the same weights on the same batch: discriminator loss "
            f"{pipe_losses[0]:.6f} (pipeline) / {hand_losses[0]:.6f} (hand), generator loss {pipe_losses[1]:.6f} / "
            f"{hand_losses[1]:.6f}; weights after the step differ by at most {weight_diff:.2e}: "
            f"{'the same computation' if same else 'DIFFERENT: the comparison is not apples to apples'}")
        figures["sanity"] = {"pipeline_losses": pipe_losses, "hand_losses": hand_losses,
                             "max_weight_difference": weight_diff, "same": same}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json and placement.is_main:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
        say(f"\nfigures written to {args.json}")
    if not figures.get("sanity", {}).get("same"):
        raise SystemExit("the two sides computed different first steps")


if __name__ == "__main__":
    main()

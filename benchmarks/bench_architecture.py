"""How much the architecture compiler costs: built submodels against hand-written forwards.

    python benchmarks/bench_architecture.py            # about 40 s on 2 CPU cores
    python benchmarks/bench_architecture.py --quick    # fewer rounds, a rougher figure

1. Forward + backward time of built submodels against a hand-written forward over the very same
   layer modules (so the only difference is model_base's orchestration: the layer loop and the
   skip merges), interleaved block by block in one process. Printed as hand/built, the median
   over rounds of the ratio within a round, with its quartiles (the machine's noise): 1.0 means
   no cost, below 1 means the built model is slower. Targets: >= 0.95 at 1x1x4x4, >= 0.98 at
   16x1x32x32.
2. Build time (YAML to modules, with every check and shape) of a generated 500-layer architecture.
   Target: under 1 s.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.model_base import PyNet  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# A residual conv stack that runs at any image size: an add skip and a cat skip.
CONV_STACK = {
    "model_components": {"net": {"adv_type": "generator", "submodels": ["b"]}},
    "b": {
        "submodel_input": {"input_data": {"data_key": "x", "input_size": [1, 4, 4]}},
        "layer_name_prefix": "b",
        "layers": [{"Conv2d": {"out_channels": 16, "kernel_size": 3, "padding": 1}}, {"BatchNorm2d": None},
                   {"ReLU": None}, {"Conv2d": {"out_channels": 16, "kernel_size": 3, "padding": 1}}, {"ReLU": None},
                   {"Conv2d": {"out_channels": 16, "kernel_size": 3, "padding": 1}}, {"ReLU": None},
                   {"Conv2d": {"out_channels": 1, "kernel_size": 3, "padding": 1}}, {"Tanh": None}],
        "skip_connections": {"b_ReLU_2": {"future_layers": ["b_ReLU_4", "b_ReLU_6"],
                                          "connection_types": ["add", "cat"]}},
    },
}


class HandConvStack(nn.Module):
    """CONV_STACK's forward written out, over the built model's own layers."""

    def __init__(self, layers):
        super().__init__()
        (self.conv0, self.bn1, self.relu2, self.conv3, self.relu4, self.conv5, self.relu6, self.conv7,
         self.tanh8) = layers.values()

    def forward(self, x):
        a = self.relu2(self.bn1(self.conv0(x)))
        b = self.relu4(self.conv3(a)) + a
        c = torch.cat((self.relu6(self.conv5(b)), a), 1)
        return self.tanh8(self.conv7(c))


class HandUNet(nn.Module):
    """The U-Net example's generator written out, over the built model's own layers."""

    def __init__(self, encoder, decoder):
        super().__init__()
        self.enc, self.dec = nn.ModuleList(encoder.values()), nn.ModuleList(decoder.values())

    def forward(self, x):
        e = self.enc
        e1 = e[1](e[0](x))
        e4 = e[4](e[3](e[2](e1)))
        e7 = e[7](e[6](e[5](e4)))
        h = e[9](e[8](e7))
        d = self.dec
        h = torch.cat((d[2](d[1](d[0](h))), e7), 1)
        h = torch.cat((d[5](d[4](d[3](h))), e4), 1)
        h = torch.cat((d[8](d[7](d[6](h))), e1), 1)
        return d[10](d[9](h) + x)


class BuiltUNet(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.enc, self.dec = model.submodels["unet_enc"], model.submodels["unet_dec"]

    def forward(self, x):
        skips = {}
        return self.dec(self.enc(x, skips), skips)


def write_yaml(data, folder, name):
    path = Path(folder) / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def step(model, x):
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()


def compare(hand, built, x, rounds, block):
    """Per-step seconds of each (medians) and the median over rounds of hand/built, each round
    timing one block of `block` steps of each back to back (in alternating order), so that
    a slow spell of the machine hits both sides of a ratio."""
    with torch.no_grad():
        if not torch.equal(hand(x), built(x)):
            raise SystemExit("hand-written and built forwards differ: the comparison would be meaningless")
    for _ in range(3):  # warm-up
        step(hand, x)
        step(built, x)
    times = {"hand": [], "built": []}
    for r in range(rounds):
        order = (("hand", hand), ("built", built)) if r % 2 == 0 else (("built", built), ("hand", hand))
        for name, model in order:
            start = time.perf_counter()
            for _ in range(block):
                step(model, x)
            times[name].append((time.perf_counter() - start) / block)
    ratios = [h / b for h, b in zip(times["hand"], times["built"])]
    quartiles = statistics.quantiles(ratios, n=4)
    return statistics.median(times["hand"]), statistics.median(times["built"]), statistics.median(ratios), quartiles


def generated_architecture(n_layers):
    """Conv/ReLU pairs at 16 channels, with an add skip every 8 layers."""
    layers = [{"Conv2d": {"out_channels": 16, "kernel_size": 3, "padding": 1}} if i % 2 == 0 else {"ReLU": None}
              for i in range(n_layers)]
    skips = {f"g_ReLU_{i}": {"future_layers": [f"g_ReLU_{i + 4}"], "connection_types": ["add"]}
             for i in range(1, n_layers - 4, 8)}
    return {"model_components": {"net": {"adv_type": "generator", "submodels": ["g"]}},
            "g": {"submodel_input": {"input_data": {"data_key": "x", "input_size": [1, 32, 32]}},
                  "layer_name_prefix": "g", "layers": layers, "skip_connections": skips}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    scale = 0.3 if args.quick else 1.0
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        conv_stack = PyNet(write_yaml(CONV_STACK, tmp, "conv_stack.yaml")).submodels["b"]
        unet = PyNet(REPO / "models/unet_gan/unet_gan_architecture.yaml")
        hand_unet = HandUNet(unet.submodels["unet_enc"].layers, unet.submodels["unet_dec"].layers)
        cases = [  # name, hand, built, input, rounds, steps per block, target
            ("conv stack, 1x1x4x4", HandConvStack(conv_stack.layers), conv_stack, torch.randn(1, 1, 4, 4), 200, 20,
             0.95),
            ("conv stack, 16x1x32x32", HandConvStack(conv_stack.layers), conv_stack, torch.randn(16, 1, 32, 32), 160, 2,
             0.98),
            ("U-Net generator, 16x1x32x32", hand_unet, BuiltUNet(unet), torch.randn(16, 1, 32, 32), 160, 1, 0.98),
        ]
        print(f"{'forward + backward':30} {'hand ms':>9} {'built ms':>9} {'hand/built':>11} {'quartiles':>13}  target")
        for name, hand, built, x, rounds, block, target in cases:
            t_hand, t_built, ratio, (q1, _, q3) = compare(hand, built, x, max(10, int(rounds * scale)), block)
            print(f"{name:30} {t_hand * 1e3:9.3f} {t_built * 1e3:9.3f} {ratio:11.3f} {q1:6.3f}-{q3:<6.3f}  >= {target} "
                  f"{'ok' if ratio >= target else 'MISSED'}")

        path = write_yaml(generated_architecture(500), tmp, "generated_500.yaml")
        builds = []
        for _ in range(5):
            start = time.perf_counter()
            model = PyNet(path)
            builds.append(time.perf_counter() - start)
        n_layers = sum(len(s.layers) for s in model.submodels.values())
        build = statistics.median(builds)
        print(f"build of a generated {n_layers}-layer architecture: median {build:.3f} s of 5 "
              f"(min {min(builds):.3f}, max {max(builds):.3f})  target < 1 s {'ok' if build < 1 else 'MISSED'}")


if __name__ == "__main__":
    main()

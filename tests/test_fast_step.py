"""What makes a GPU step fast, as far as a CPU can check it: fused optimizers by default on a GPU
(and optimizer state that loads across the switch), a step that never reads a value back from
the device (non-finite losses found when the losses are logged), dataset.on_device's choices and
refusals, and training.cuda_graphs' refusals. The GPU itself is exercised by tests/test_cuda.py."""
import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dataset
from conftest import SRC, TRAIN_CFG
from engine import config, cuda_graphs, network
from engine.errors import UserError
from engine.placement import Placement
from test_training_options import CPU, toy_trainer

CUDA = Placement(torch.device("cuda"))  # (a placement only: nothing here touches a GPU)


def settings(optimizer="Adam", **args):
    return {"optimizer": optimizer, "optimizer_args": args, "learning_rate": 0.01}


@pytest.mark.parametrize("optimizer, args, fused", [
    ("Adam", {}, True), ("AdamW", {"betas": [0.5, 0.9]}, True), ("SGD", {"momentum": 0.9}, True),
    ("Adam", {"fused": False}, False), ("Adam", {"foreach": True}, False), ("RMSprop", {}, False)])
def test_optimizers_are_fused_on_a_gpu_unless_the_config_says(optimizer, args, fused):
    params = [torch.nn.Parameter(torch.randn(3, 3))]  # (CPU tensors: torch's fused kernels take them too)
    built = network.make_optimizer(params, settings(optimizer, **args), torch.device("cuda"), "cfg: training")
    assert bool(built.defaults.get("fused")) is fused
    on_cpu = network.make_optimizer(params, settings(optimizer, **args), torch.device("cpu"), "cfg: training")
    assert not on_cpu.defaults.get("fused") or args.get("fused")


def test_cuda_graphs_make_optimizers_capturable_where_they_can_be():
    params = [torch.nn.Parameter(torch.randn(3, 3))]
    assert network.make_optimizer(params, settings("Adam"), torch.device("cpu"), "w", capturable=True) \
        .defaults["capturable"] is True
    assert "capturable" not in network.make_optimizer(params, settings("SGD"), torch.device("cpu"), "w",
                                                      capturable=True).defaults


@pytest.mark.parametrize("first, second", [(True, False), (False, True)])
def test_optimizer_state_loads_across_the_fused_switch(tmp_path, first, second):
    """A run saved by fused optimizers (a GPU's default) resumes with unfused ones and the other way
    round: each keeps this run's implementation, and its step counts sit where that one wants them."""
    args = "training.optimizer_args={betas: [0.5, 0.999], fused: %s}"
    saved_by = toy_trainer(tmp_path / "a", args % str(first).lower())
    state = torch.load(saved_by.fit(), map_location="cpu", weights_only=True)
    # (copies: a loaded optimizer trains on the checkpoint's own tensors, in place)
    resumed = toy_trainer(tmp_path / "b", args % str(second).lower(), "training.n_epochs=2",
                          resume=copy.deepcopy(state))
    optimizer = resumed.networks["generator"].optimizer
    assert all(bool(group["fused"]) is second for group in optimizer.param_groups)
    steps = [s["step"] for s in optimizer.state.values()]
    assert steps and all(s.item() == 4 and s.dtype == torch.float32 for s in steps)
    resumed.fit()  # trains on: fused and unfused Adam compute the same update
    same = toy_trainer(tmp_path / "c", args % str(first).lower(), "training.n_epochs=2", resume=copy.deepcopy(state))
    same.fit()
    for (key, a), b in zip(resumed.model.state_dict().items(), same.model.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), key


class DeviceReads:
    """Counts the pipeline's calls that read a tensor's value back to the host (on a GPU, each
    waits for the device). torch's own are left out: its unfused optimizers read their step
    counts, which live on the CPU, and its fused ones read nothing."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self.counting(original))

    def counting(self, original):
        def read(tensor, *args):
            caller = sys._getframe(1).f_code.co_filename
            self.count += Path(caller).resolve().is_relative_to(SRC)
            return original(tensor, *args)
        return read


@pytest.mark.parametrize("policy, reads", [("stop", False), ("ignore", False), ("skip", True)])
def test_a_step_reads_nothing_back_unless_it_must_skip(tmp_path, monkeypatch, policy, reads):
    trainer = toy_trainer(tmp_path, f"training.on_nonfinite_loss={policy}")
    batches = list(trainer.loader)
    trainer.train_step(batches[0])  # (the first step may initialise lazily)
    counter = DeviceReads(monkeypatch)
    for batch in batches[1:]:
        trainer.train_step(batch)
    assert (counter.count > 0) is reads, counter.count


def test_a_nonfinite_loss_is_found_when_the_losses_are_logged(tmp_path, capsys):
    """on_nonfinite_loss: stop looks at the losses every log_interval steps: the error names the
    first bad step and network, and metrics.jsonl and the loss history keep the steps before it."""
    trainer = toy_trainer(tmp_path, "training.log_interval=10", "dataset.real_images.data_batch_transform=null")
    order = trainer.loader.batch_sampler
    order.set_epoch(1)
    third_batch = int(order.order()[2 * 16])  # a sample of the epoch's third batch (each comes once an epoch)
    trainer.loader.dataset.streams["real_images"][trainer.loader.dataset.indices[third_batch]] = math.nan
    with pytest.raises(SystemExit) as e:
        trainer.fit()
    assert e.value.code == 3
    err = capsys.readouterr().err
    assert "non-finite loss at epoch 1, step 3 (3 of the epoch): discriminator loss total=nan" in err
    history = trainer.networks["discriminator"].loss_history["total"]
    assert len(history) == 2 and all(math.isfinite(v) for v in history)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows if "discriminator/total" in r] == [1, 2]


def cfg_with(*overrides):
    return config.load_training_config(SRC / TRAIN_CFG, list(overrides))


@pytest.mark.parametrize("overrides, says", [
    ([], "this run trains on the cpu"),
    (["training.precision=fp16"], "gradient scaler"),
    (["training.ema_decay=0.99"], "ema_decay"),
    (["training.grad_accumulation_steps=2"], "grad_accumulation_steps"),
    (["training.compile=true"], "reduce-overhead"),
    (["training.on_nonfinite_loss=skip"], "on_nonfinite_loss: skip"),
])
def test_cuda_graphs_refuse_what_they_cannot_record(overrides, says):
    train = cfg_with("training.cuda_graphs=true", *overrides)["training"]
    placement = CPU if not overrides else CUDA
    networks = [train | {"every": 1}]  # (the generator's settings, as network.network_specs gives them)
    assert says in cuda_graphs.refusal(train, train["on_nonfinite_loss"], placement, networks)
    ddp = Placement(torch.device("cuda"), distributed=True)
    plain = cfg_with()["training"]
    assert "DDP" in cuda_graphs.refusal(plain, "stop", ddp, [plain | {"every": 1}])
    assert cuda_graphs.refusal(plain, "stop", CUDA, [plain | {"every": 1}]) is None
    assert "every" in cuda_graphs.refusal(plain, "stop", CUDA, [plain | {"every": 5}])


def test_cuda_graphs_on_a_cpu_are_a_user_error(tmp_path):
    with pytest.raises(UserError, match="training.cuda_graphs: it records CUDA kernels"):
        toy_trainer(tmp_path, "training.cuda_graphs=true")


@pytest.mark.parametrize("overrides, says", [
    ([], "trains on the cpu"),
    (["dataset.real_images={data_read_type: folder, data_path: FOLDER, file_reader: read_npy, in_memory: false}"],
     "read from disk"),
    (["dataset.num_workers=2"], "worker processes"),
    (["dataset.batch_transforms=[{transform: RandomHorizontalFlip, streams: [real_images]}]"], "torchvision"),
])
def test_on_device_true_refuses_data_it_cannot_hold(tmp_path, overrides, says):
    for i in range(4):
        np.save(tmp_path / f"{i}.npy", np.zeros((1, 4, 4), np.float32))
    cfg = cfg_with("dataset.on_device=true", *[o.replace("FOLDER", str(tmp_path)) for o in overrides])
    data = build_training_set(cfg)
    device = torch.device("cpu" if not overrides else "cuda")
    with pytest.raises(UserError, match=f"dataset.on_device: true.*{says}"):
        dataset.on_device(cfg["dataset"], [data], device, "cfg: dataset")
    cfg["dataset"]["on_device"] = None  # null: the same data simply stays where it is
    assert dataset.on_device(cfg["dataset"], [data], device, "cfg: dataset") is False


def build_training_set(cfg):
    import dataset_base
    streams = dataset_base.load_streams(cfg["dataset"], 0, "cfg")
    n = len(streams[cfg["dataset"]["data_len_key"]])
    return dataset.build_dataset(streams, cfg["dataset"], torch.arange(n), True, "cfg: dataset")


def test_batches_cut_from_positions_on_the_device_are_the_same_batches():
    plain = dataset.EpochBatches(50, 8, seed=3)
    placed = dataset.EpochBatches(50, 8, seed=3, device=torch.device("cpu"))
    for b in (plain, placed):
        b.set_epoch(2, skip=1)
    assert [(k, p.tolist()) for k, p in plain] == [(k, p.tolist()) for k, p in placed]
    fixed = dataset.FixedBatches(20, 8, 0, device=torch.device("cpu"))
    assert [p.tolist() for _, p in fixed] == [list(range(8)), list(range(8, 16)), list(range(16, 20))]

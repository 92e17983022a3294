"""The GPU paths: fused optimizers by default, a steady-state step with no host-device sync, data
cut on the device, and CUDA graphs that train exactly as eager steps do. Skipped without a GPU
(CI has none); benchmarks/gpu_checks.sh runs them on one."""
import pytest
import torch

from engine.placement import Placement
from test_training_options import toy_trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = Placement(torch.device("cuda", 0))
ON_GPU = ["training.gpus=[0]", "dataset.on_device=true"]


def test_optimizers_are_fused_and_the_data_sits_on_the_gpu(tmp_path):
    trainer = toy_trainer(tmp_path, *ON_GPU, placement=GPU)
    assert all(net.optimizer.defaults["fused"] for net in trainer.networks.values())
    batch = next(iter(trainer.loader))
    assert all(tensor.device.type == "cuda" for tensor in batch.values())


@pytest.mark.parametrize("graphs", [False, True])
def test_the_steady_state_step_never_syncs(tmp_path, graphs):
    trainer = toy_trainer(tmp_path, *ON_GPU, f"training.cuda_graphs={str(graphs).lower()}", placement=GPU)
    batches = list(trainer.loader)
    for batch in batches * 2:  # warm-up (and, with graphs, the capture)
        trainer.train_step(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any sync in the step raises
    try:
        for batch in batches:
            trainer.train_step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_batches_cut_on_the_gpu_are_the_ones_cut_on_the_cpu(tmp_path):
    plain = ["dataset.real_images.data_batch_transform=null"]
    on_gpu = toy_trainer(tmp_path / "a", *ON_GPU, *plain, placement=GPU)
    on_cpu = toy_trainer(tmp_path / "b", "training.gpus=[0]", "dataset.on_device=false", *plain, placement=GPU)
    for a, b in zip(on_gpu.loader, on_cpu.loader):
        assert all(torch.equal(a[k].cpu(), b[k]) for k in a)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graphs_train_as_eager_steps_do(tmp_path, precision):
    """The same 20 steps (one of them a short batch, which runs eagerly) from the same weights, with
    and without graphs, under a schedule that changes the learning rate every step: allclose weights."""
    common = [*ON_GPU, f"training.precision={precision}", "training.scheduler=ExponentialLR",
              "training.scheduler_args={gamma: 0.9}", "training.scheduler_interval=step"]
    eager = toy_trainer(tmp_path / "eager", *common, placement=GPU)
    graphed = toy_trainer(tmp_path / "graphed", *common, "training.cuda_graphs=true", placement=GPU)
    graphed.model.load_state_dict(eager.model.state_dict())
    batches = list(eager.loader)
    short = {k: v[:8] for k, v in batches[0].items()}
    steps = (batches * 5)[:19] + [short]
    steps.insert(10, steps.pop())
    for batch in steps:
        eager_terms, _ = eager.train_step(batch)
        graphed_terms, _ = graphed.train_step(batch)
    assert graphed.stepper.graphed.graph is not None and not graphed.stepper.graphed.failed
    tolerance = {"fp32": {"rtol": 1e-4, "atol": 1e-5}, "bf16": {"rtol": 1e-2, "atol": 1e-3}}[precision]
    for (key, a), b in zip(eager.model.state_dict().items(), graphed.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), **tolerance), key
    for name, terms in eager_terms.items():
        assert torch.allclose(terms["total"], graphed_terms[name]["total"], **tolerance), name
    assert eager.networks["generator"].lr == pytest.approx(graphed.networks["generator"].lr)

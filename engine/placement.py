"""Where this process trains: its device and its rank among the DDP processes, the model put
there, torch's threads, and the random numbers (seeded, saved in checkpoints, restored)."""
import os
import platform
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from engine.cli import resolve_gpus, select_device
from engine.errors import UserError, kwargs_text


# ---- where this process trains ----
@dataclass
class Placement:
    """Where this process trains: its device, and its rank among world_size processes;
    `distributed` once it has joined a process group (under torchrun, even as the only process)."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    distributed: bool = False

    @property
    def is_main(self):
        return self.rank == 0

    def about(self):
        """The device, as run.json records it."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else \
            platform.processor() or "cpu"
        return {"device": str(self.device), "device_name": name, "world_size": self.world_size}


def setup_placement(gpus, source):
    """The device from `training.gpus`; under torchrun, one process per GPU (or CPU process)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    where = f"{source}: training.gpus"
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    gpus = resolve_gpus(gpus, local_world_size)
    select_device(gpus, where)  # are there GPUs at all?
    if gpus and local_world_size != len(gpus):
        raise UserError(f"{where}: {len(gpus)} GPUs need one process each, but {local_world_size} "
                        f"{'was' if local_world_size == 1 else 'were'} started; run torchrun --standalone --nnodes=1 "
                        f"--nproc_per_node={len(gpus)} train.py -t {source}")
    device = select_device(gpus, where, local_rank)  # the GPU this process owns
    if gpus:
        torch.cuda.set_device(device)
    # Under torchrun a single process joins a process group too, so that --nproc_per_node=1
    # rehearses a multi-GPU run: NCCL, the gradient all-reduces and all.
    distributed = world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if distributed:
        dist.init_process_group("nccl" if gpus else "gloo", device_id=device if gpus else None)
    return Placement(device, rank, world_size, distributed)


def share_buffers(model, placement, parameters=False):
    """Rank 0's buffers (BatchNorm running statistics, a flow's own) to every process, and its
    weights with `parameters` (at the start). Gradients are averaged, so the weights agree,
    but each process updates buffers from its own shard: validation and checkpoints use one
    set, as DDP's broadcast_buffers does."""
    if placement.world_size > 1:
        for tensor in [*model.parameters(), *model.buffers()] if parameters else model.buffers():
            dist.broadcast(tensor.data, 0)


def set_num_threads(num_threads, placement):
    """torch's CPU threads for this process: training.num_threads, or torch's default (one per
    core) shared out among the processes of a multi-process CPU run, which would otherwise each
    start one per core and slow one another down."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", placement.world_size))
    if num_threads is None and placement.device.type == "cpu" and local > 1:
        num_threads = max(1, torch.get_num_threads() // local)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    return torch.get_num_threads()


def seed_everything(seed):
    """Seed every RNG and ask cuDNN for its deterministic kernels, so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def rng_state():
    """The global random number generators, in weights_only-loadable form. (Batch transforms
    draw from seeds fixed by the batch, see dataset.py: they need no state.)"""
    np_state = np.random.get_state()
    return {
        "python": list(random.getstate()[1]),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state):
    random.setstate((3, tuple(state["python"]), None))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prepare_model(model, train, placement, source):
    """Move the model to its device, with the BatchNorm kind and memory format the config asks for."""
    model.to(placement.device)
    if train["sync_batchnorm"] and placement.world_size > 1:
        if placement.device.type != "cuda":
            raise UserError(f"{source}: training.sync_batchnorm: torch's SyncBatchNorm runs on GPUs only; "
                            "set it to false for CPU processes")
        # in place: the components keep their modules, and the weights their names
        for name, component in model.model_components.items():
            model.model_components[name] = torch.nn.SyncBatchNorm.convert_sync_batchnorm(component)
    if train["channels_last"]:
        model.to(memory_format=torch.channels_last)


def compile_submodels(model, args, where):
    """torch.compile each submodel's forward in place (nn.Module.compile): the flow between
    submodels stays eager Python, and the weights keep their names."""
    for component in model.model_components.values():
        for submodel in component.values():
            try:
                submodel.compile(**args)
            except (TypeError, ValueError, RuntimeError, AssertionError) as e:  # (torch checks some values by assert)
                raise UserError(f"{where}: torch.compile({kwargs_text(args)}) failed: {e}") from None

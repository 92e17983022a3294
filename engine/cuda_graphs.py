"""training.cuda_graphs: the whole training step recorded once as a CUDA graph and replayed.

At the sizes researchers iterate on, a GPU step spends much of its time launching kernels: each
network's forward pass, loss, backward pass and optimizer step launch hundreds, each costing
microseconds of Python and driver time. A CUDA graph records those launches once and replays them
as one, on tensors at fixed addresses: the batch is copied into the step's static input buffers,
and the weights, gradients and optimizer state are updated where they lie.

GraphedStep wraps the Trainer's step (every update of every network on one batch): a few eager
steps first, on a side stream, as torch's documentation asks (they also create the optimizers'
state), then the capture, then a replay per batch. A batch of another shape (the short last batch
of an epoch) runs eagerly on the same weights and optimizer state. The optimizers are made
capturable (their step counts live on the GPU) and read their learning rates from GPU tensors,
which follow the schedules' values. What cannot be recorded is refused before training starts
(`refusal`); a step that fails to record (a loss function that reads a value back to the host,
say) falls back to eager steps, with a message.
"""
import torch
from tqdm import tqdm

from engine.errors import UserError

WARMUP_STEPS = 3  # eager steps before the capture


def graphed_step(train, placement, networks, updates, source):
    """With training.cuda_graphs, the step (`updates([batch])` of the `networks`, Network objects)
    as a GraphedStep; None without it. A setting it cannot record is a user error."""
    if not train["cuda_graphs"]:
        return None
    why = refusal(train, train["on_nonfinite_loss"], placement, [net.settings for net in networks])
    if why:
        raise UserError(f"{source}: training.cuda_graphs: {why}")
    return GraphedStep(lambda batch: updates([batch]), [net.optimizer for net in networks], f"{source}: training")


def refusal(train, on_nonfinite, placement, networks):
    """Why training.cuda_graphs cannot be used with these settings and networks (each network's
    settings: its precision, ema_decay and every) (None: it can)."""
    if placement.device.type != "cuda":
        return f"it records CUDA kernels, but this run trains on the {placement.device.type}; set training.gpus"
    reasons = [
        (placement.distributed, "not yet under DDP (torchrun): leave it off there"),
        (any(s["precision"] == "fp16" for s in networks), "fp16's gradient scaler reads its overflow check back "
                                                          "to the host every step; use precision: bf16, which needs "
                                                          "no scaler"),
        (any(s["ema_decay"] is not None for s in networks), "a moving average of weights (ema_decay) checks its update "
                                                       "count on the host every step; set ema_decay to null"),
        (any(s["every"] > 1 for s in networks), "a network updated every k-th step (networks.<name>.every) makes "
                                                 "steps of two kinds, and one graph records one; set every to 1"),
        (train["grad_accumulation_steps"] > 1, "a step of several batches (grad_accumulation_steps) is not "
                                               "recorded; set it to 1 and raise batch_size instead"),
        (train["compile"], "torch.compile records graphs of its own (compile_args: {mode: reduce-overhead}); use "
                           "one of the two"),
        (on_nonfinite == "skip", "on_nonfinite_loss: skip decides on the host whether each update happens; use "
                                 "stop or ignore"),
    ]
    return next((why for bad, why in reasons if bad), None)


class GraphedStep:
    """`step(batch)` -> {network: {term: tensor}}, every update of one batch ({stream: tensor}), recorded
    as a CUDA graph on the first batch after WARMUP_STEPS eager ones and replayed afterwards.
    `optimizers` are the optimizers the step updates (capturable ones)."""

    def __init__(self, step, optimizers, where):
        self.step, self.optimizers, self.where = step, optimizers, where
        self.eager_steps, self.graph, self.failed = 0, None, False
        self.static = self.outputs = None
        self.lr = []  # [(param group, its learning rate on the GPU)]
        self.side = None  # the warm-up steps' stream

    def __call__(self, batch):
        if self.graph is None and not self.failed and self.eager_steps >= WARMUP_STEPS:
            self.capture(batch)
        if self.graph is None or not self.fits(batch):
            return self.eager(batch)
        for name, x in batch.items():
            self.static[name].copy_(x)
        for group, lr in self.lr:  # the schedule's latest value, copied on the GPU (no host sync)
            lr.fill_(group["lr"])
        self.graph.replay()
        # (the outputs are overwritten by the next replay: copies, which the loop keeps until it logs)
        return {name: {term: value.clone() for term, value in terms.items()} for name, terms in self.outputs.items()}

    def fits(self, batch):
        return all(x.shape == self.static[name].shape for name, x in batch.items())

    def eager(self, batch):
        if self.graph is not None or self.failed:
            return self.step(batch)
        # warm-up steps on a side stream, as torch asks before a capture
        self.side = self.side or torch.cuda.Stream()
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            terms = self.step(batch)
        torch.cuda.current_stream().wait_stream(self.side)
        self.eager_steps += 1
        return terms

    def capture(self, batch):
        self.static = {name: x.clone() for name, x in batch.items()}
        device = next(iter(batch.values())).device
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)  # the gradients are made inside the graph, in its memory
            for group in optimizer.param_groups:
                self.lr.append((group, torch.tensor(float(group["lr"]), device=device)))
        graph = torch.cuda.CUDAGraph()
        floats = [group["lr"] for group, _ in self.lr]
        for group, lr in self.lr:
            group["lr"] = lr  # recorded: the optimizer reads its rate from this tensor at every replay
        try:
            with torch.cuda.graph(graph):
                self.outputs = self.step(self.static)
            self.graph = graph
        except RuntimeError as e:  # nothing recorded ran: the weights are as they were
            self.failed = True
            for optimizer in self.optimizers:
                optimizer.zero_grad(set_to_none=True)
            tqdm.write(f"{self.where}.cuda_graphs: the step could not be recorded as a CUDA graph "
                       f"({str(e).splitlines()[0]}); training on without one")
        finally:
            for (group, _), value in zip(self.lr, floats):
                group["lr"] = value  # the schedulers and the logs go on with plain numbers
        if self.failed:
            self.lr = []

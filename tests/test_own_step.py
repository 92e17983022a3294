"""A flow that writes its own step (docs/training.md, "Write your own step"): three networks of an
InfoGAN-like model on the toy GAN's data, two of them sharing the generator's weights, one updated
every second step only, a value logged beside the terms and a buffer the flow keeps across steps.
The engine trains them from the flow's `losses` alone: these tests hold it to the checks a
researcher would make of a hand-written loop (what updates when, resuming bit for bit, the trial
step leaving no trace, mistakes named)."""
import json

import pytest
import torch
from tqdm import tqdm

import train
from conftest import SRC
from engine import config, loop, model_base, preflight, runs
from engine.errors import UserError
from engine.network import Step
from engine.placement import Placement, seed_everything
from engine.sampling import first_samples

TRAIN_CFG = "configs/example_model/example_training_cfg.yaml"
CPU = Placement(torch.device("cpu"))

ARCHITECTURE = """\
model_components:
  generator: {adv_type: generator, submodels: [gen]}
  discriminator: {adv_type: discriminator, submodels: [body, head]}
  q: {adv_type: discriminator, submodels: [q_head]}
gen:
  submodel_input: {input_data: {data_key: gen_inputs, input_size: [1, 4, 4]}}
  layers:
    - {Flatten: {}}
    - {Linear: {out_features: 32}}
    - {ReLU: null}
    - {Linear: {out_features: 16}}
    - {Unflatten: {dim: 1, unflattened_size: [1, 4, 4]}}
    - {Tanh: null}
body:
  submodel_input: {gen: output}
  layers:
    - {Flatten: {}}
    - {Linear: {out_features: 32}}
    - {LeakyReLU: {negative_slope: 0.2}}
head:
  submodel_input: {body: output}
  layers: [{Linear: {out_features: 1}}]
q_head:
  submodel_input: {body: output}
  layers: [{Linear: {out_features: 2}}]
"""

FLOW = '''\
import torch
import torch.nn.functional as F

from engine.model_base import PyNet


class InfoToy(PyNet):
    """Noise in, image out; the discriminator's body feeds both its real/fake head and Q, which
    recovers the first two noise values (the "code") from a generated image."""
    loss_args = {"info_weight": 1.0}

    def __init__(self, path):
        super().__init__(path)
        self.register_buffer("real_score", torch.zeros(()))  # a moving mean of D's real scores, kept across steps

    def forward(self, noise):
        return self.model_components["generator"]["gen"](noise)

    def features(self, images):
        return self.model_components["discriminator"]["body"](images)

    def score(self, images):
        return self.model_components["discriminator"]["head"](self.features(images))

    def losses(self, network, batch, step):
        noise, real = batch["gen_inputs"], batch["real_images"]
        if network == "discriminator":
            with torch.no_grad():
                step["fake"] = self(noise)
            real_scores, fake_scores = self.score(real), self.score(step["fake"])
            self.real_score.mul_(0.9).add_(0.1 * real_scores.detach().mean())
            accuracy = ((real_scores > 0).float().mean() + (fake_scores < 0).float().mean()) / 2
            terms = {"real": F.softplus(-real_scores).mean(), "fake": F.softplus(fake_scores).mean()}
            return terms, {"accuracy": accuracy}
        fake = self(noise)
        if network == "generator":
            return {"adversarial": F.softplus(-self.score(fake)).mean()}
        code = self.model_components["q"]["q_head"](self.features(fake))
        return {"info": self.loss_args["info_weight"] * F.mse_loss(code, noise.flatten(1)[:, :2])}
'''

NETWORKS = ("networks={discriminator: {components: [discriminator]}, generator: {components: [generator], every: 2}, "
            "info: {components: [generator, q], learning_rate: 0.001}}")


@pytest.fixture
def own_step(tmp_path):
    """The overrides that train InfoToy on the toy data: 64 real images in batches of 16 (4 steps an epoch)."""
    (tmp_path / "info_toy.yaml").write_text(ARCHITECTURE)
    (tmp_path / "info_toy.py").write_text(FLOW)
    return [f"model.architecture_cfg_path={tmp_path / 'info_toy.yaml'}",
            f"model.model_flow_path={tmp_path / 'info_toy.py'}",
            "loss.loss_fn=null", "loss.loss_args={info_weight: 0.5}", "adversarial.enable_adversarial_training=false",
            NETWORKS, "dataset.real_images.n_inputs=64", "training.batch_size=16", "logging.tensorboard=false",
            "dataset.real_images.data_batch_transform=null", "dataset.gen_inputs.data_batch_transform=null"]


def trainer_of(tmp_path, overrides, resume=None, folder="run"):
    cfg = config.load_training_config(SRC / TRAIN_CFG, overrides)
    seed_everything(0)
    model = model_base.build_model(cfg["model"])
    loader, _ = train.make_loaders(cfg, model, CPU, TRAIN_CFG)
    if resume is not None:
        runs.load_weights(model, resume, "checkpoint")
    return loop.Trainer(cfg, model, loader, CPU, resume, run=runs.Run.of(cfg, folder=tmp_path / folder))


def test_each_network_updates_when_its_settings_say_and_logs_what_the_flow_watches(tmp_path, own_step):
    trainer = trainer_of(tmp_path, [*own_step, "training.n_epochs=2"])
    nets = trainer.networks
    assert [net.name for net in trainer.update_order] == ["discriminator", "generator", "info"]
    shared = {id(p) for p in nets["generator"].params} & {id(p) for p in nets["info"].params}
    assert shared == {id(p) for p in nets["generator"].params}  # info trains the generator too, and Q
    assert nets["info"].lr == 0.001 and nets["generator"].lr == trainer.cfg["training"]["learning_rate"]
    assert trainer.model.loss_args == {"info_weight": 0.5}  # the config's, over the flow's default
    q_before = trainer.model.model_components["q"].state_dict()["q_head.layers.q_head_Linear_0.weight"].clone()
    trainer.fit()
    history = {name: net.loss_history for name, net in nets.items()}
    assert len(history["discriminator"]["total"]) == len(history["info"]["total"]) == 8
    assert len(history["generator"]["total"]) == 4  # every second step: steps 0, 2, 4, 6
    disc = history["discriminator"]
    assert len(disc["accuracy"]) == 8 and all(0 <= a <= 1 for a in disc["accuracy"])
    # watched, not trained: the total is the sum of the terms alone
    assert all(t == pytest.approx(r + f, abs=1e-6) for t, r, f in zip(disc["total"], disc["real"], disc["fake"]))
    assert not torch.equal(trainer.model.model_components["q"].state_dict()["q_head.layers.q_head_Linear_0.weight"],
                           q_before)
    rows = [json.loads(line) for line in (trainer.run.folder / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "data_wait" in row]
    assert [("generator/total" in row) for row in steps] == [True, False] * 4
    assert all("discriminator/accuracy" in row and "info/info" in row for row in steps)
    saved = torch.load(runs.list_checkpoints(trainer.run.folder)[-1], weights_only=True)
    assert saved["model_state_dict"]["real_score"] != 0  # the flow's buffer is in every checkpoint
    assert set(saved["networks"]) == {"discriminator", "generator", "info"}
    assert saved["networks"]["info"]["components"] == ["generator", "q"]


def test_a_flow_defined_step_resumes_bit_for_bit(tmp_path, own_step):
    """Two epochs straight, or one and then a resume of the second: the same weights, buffer,
    optimizer states and histories, to the last bit (the every-2nd network's turn included)."""
    straight = trainer_of(tmp_path, [*own_step, "training.n_epochs=2"], folder="straight")
    straight.fit()
    first = trainer_of(tmp_path, [*own_step, "training.n_epochs=1"], folder="halves")
    first.fit()
    state = torch.load(runs.list_checkpoints(first.run.folder)[-1], weights_only=True)
    second = trainer_of(tmp_path, [*own_step, "training.n_epochs=2"], resume=state, folder="halves")
    second.fit()
    a, b = straight.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name, net in straight.networks.items():
        other = second.networks[name]
        assert net.loss_history == other.loss_history
        for p, q in zip(net.params, other.params):
            for key, value in net.optimizer.state[p].items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(other.optimizer.state[q][key]))


def test_the_trial_step_leaves_the_flows_buffer_and_every_network_as_they_were(tmp_path, own_step):
    trainer = trainer_of(tmp_path, [*own_step, "training.n_epochs=1"])
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    batch = first_samples(trainer.loader.dataset, 2)
    preflight.check_whole_step(trainer, batch, None, "cfg.yaml")
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert all(not net.loss_history and not net.optimizer.state for net in trainer.networks.values())


@pytest.mark.parametrize("body, says", [
    ("return None", "returned None; it must return its loss terms"),
    ("return {}", "returned an empty dict; it must return its loss terms"),
    ("return {'total': self(batch['gen_inputs']).mean()}", "a term named 'total'"),
    ("return {'l1': self(batch['gen_inputs']).abs()}", "a term 'l1' that is a float32 tensor of shape [2, 1, 4, 4]"),
    ("return {'l1': self(batch['gen_inputs']).abs().mean()}, {'l1': 1.0}", "a value to watch named 'l1'"),
    ("return {'l1': self(batch['gen_inputs']).abs().mean().detach()}", "do not depend on the weights"),
    ("return {'l1': self(batch['nope']).mean()}", "KeyError: 'nope'"),
    ("return {'adversarial': self.score(self(batch['gen_inputs']).detach()).mean()}", "reach none of its weights"),
])
def test_what_a_flows_losses_returns_is_checked_before_training(tmp_path, own_step, body, says):
    flow = tmp_path / "info_toy.py"
    flow.write_text(FLOW.replace("    def losses(self, network, batch, step):\n",
                                 f"    def losses(self, network, batch, step):\n        {body}\n"))
    with pytest.raises(UserError, match="losses") as e:
        trial(tmp_path, own_step)
    assert says in str(e.value)


def trial(tmp_path, overrides):
    """The checks train.py makes before it writes anything: the step phase by phase, then whole."""
    trainer = trainer_of(tmp_path, [*overrides, "training.n_epochs=1"])
    batch = first_samples(trainer.loader.dataset, 2)
    preflight.check_step(trainer.losses, batch, "cfg.yaml", trainer.update_order, Step(0, 1))
    preflight.check_whole_step(trainer, batch, None, "cfg.yaml")


@pytest.mark.parametrize("overrides, says", [
    (["loss.loss_args={info_wieght: 0.5}"], "loss.loss_args.info_wieght: not a setting of the flow InfoToy's "
                                            "loss_args (did you mean 'info_weight'?); valid: info_weight"),
    (["loss.loss_args={info_weight: yes}"], "loss.loss_args.info_weight: True is not of the kind"),
    (["loss.loss_fn=bce_gan_loss", "loss.loss_args={}"], "loss.loss_fn: the flow InfoToy writes its own step"),
    (["networks={gen: {components: [generatr]}}"], "networks.gen.components[0]: 'generatr' is not a component"),
])
def test_mistakes_in_a_flow_defined_steps_config_are_named(tmp_path, own_step, overrides, says):
    with pytest.raises(UserError) as e:
        trainer_of(tmp_path, [*own_step, *overrides])
    assert says in str(e.value)


def test_the_networks_section_is_checked_with_the_config(tmp_path, own_step):
    with pytest.raises(UserError) as e:
        config.load_training_config(SRC / TRAIN_CFG, [
            "networks={1gen: {components: [generator]}, d: {components: [], optimizer: Adamm, every: 0}}",
            "adversarial.enable_adversarial_training=true"])
    message = str(e.value)
    for says in ("networks.1gen: a network's name is a Python identifier", "networks.d.components: empty",
                 "networks.d.optimizer: 'Adamm'", "networks.d.every: 0", "adversarial.enable_adversarial_training"):
        assert says in message


def test_a_built_in_flow_refuses_the_networks_section(tmp_path):
    with pytest.raises(UserError, match="networks: the networks section is for a flow that writes its own step"):
        trainer_of(tmp_path, ["networks={generator: {components: [generator]}}", "adversarial.enable_adversarial_"
                              "training=false", "loss.loss_fn=weighted_reconstruction_loss",
                              "loss.loss_args={}"])


def test_training_steps_make_one_host_read_per_log_interval(tmp_path, own_step):
    """The flow's step keeps the loop's promise: the terms stay on the device until they are logged."""
    trainer = trainer_of(tmp_path, [*own_step, "training.n_epochs=1", "training.log_interval=4"])
    reads = []
    original = torch.Tensor.cpu
    torch.Tensor.cpu = lambda self, *a, **k: (reads.append(self.shape), original(self, *a, **k))[1]
    try:
        assert trainer.run_epoch(1, tqdm(disable=True))
    finally:
        torch.Tensor.cpu = original
    assert len(reads) == 1


def test_a_network_may_train_in_a_precision_of_its_own(tmp_path, own_step):
    """networks.<name>.precision: the discriminator's terms under bf16 autocast, the others in fp32."""
    networks = NETWORKS.replace("discriminator: {components: [discriminator]}",
                                "discriminator: {components: [discriminator], precision: bf16}")
    trainer = trainer_of(tmp_path, [*own_step, networks, "training.n_epochs=1"])
    seen = {}
    losses = trainer.model.losses

    def spy(network, batch, step):  # the dtype autocast gives a matmul under each network's update
        seen[network] = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
        return losses(network, batch, step)
    trainer.model.losses = spy
    assert trainer.run_epoch(1, tqdm(disable=True))
    assert seen == {"discriminator": torch.bfloat16, "generator": torch.float32, "info": torch.float32}
    assert all(torch.isfinite(torch.tensor(net.loss_history["total"])).all() for net in trainer.networks.values())

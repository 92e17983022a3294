"""preflight.check_step: one training step's forward passes and losses, tried before a run writes
anything. A failure names the config, the phase, the stream and the layer; a pass leaves no trace."""
import random

import numpy as np
import pytest
import torch

from conftest import CHECKPOINTS, SRC, TRAIN_CFG, run
from engine import config, model_base, preflight
from engine.errors import UserError
from engine.placement import compile_submodels
from engine.step import Losses, check_training_setup

WHERE = "configs/my_gan/my_gan_training_cfg.yaml"

# A small GAN: noise [2, 4, 4] -> image [1, 4, 4] -> one score. BatchNorm (running statistics)
# and Dropout (random numbers) in both networks, for the no-trace checks.
GAN_YAML = """
model_components:
  generator: {adv_type: generator, submodels: [gen]}
  discriminator: {adv_type: discriminator, submodels: [disc]}
gen:
  submodel_input: {input_data: {data_key: noise, input_size: [2, 4, 4]}}
  layer_name_prefix: gen
  layers:
    - {Conv2d: {out_channels: 4, kernel_size: 3, padding: 1}}
    - {BatchNorm2d: null}
    - {Dropout: {p: 0.5}}
    - {Conv2d: {out_channels: 1, kernel_size: 1}}
disc:
  submodel_input: {gen: output}
  layer_name_prefix: disc
  layers:
    - {Conv2d: {out_channels: 4, kernel_size: 3, padding: 1}}
    - {BatchNorm2d: null}
    - {Dropout: {p: 0.5}}
    - {Flatten: null}
    - {Linear: {out_features: 8}}
    - {BatchNorm1d: null}
    - {Linear: {out_features: 1}}
"""

# A regression without a discriminator: an image [1, 4, 4] -> an image [1, 4, 4].
REGRESSION_YAML = """
model_components:
  generator: {submodels: [net]}
net:
  submodel_input: {input_data: {data_key: images, input_size: [1, 4, 4]}}
  layer_name_prefix: net
  layers:
    - {Conv2d: {out_channels: 1, kernel_size: 3, padding: 1}}
"""


class Gan(model_base.PyNet):
    target_key = "real"


class Regression(model_base.PyNet):
    target_key = "targets"
    paired_targets = True


def build(tmp_path, flow, text):
    path = tmp_path / "architecture.yaml"
    path.write_text(text)
    torch.manual_seed(0)
    return flow(path)


def losses_of(model, *overrides):
    """A Losses for `model`, with the toy GAN's config and `overrides` (--set items)."""
    cfg = config.load_training_config(SRC / TRAIN_CFG, list(overrides))
    return Losses(model, cfg, torch.device("cpu"))


def gan_batch(noise=(2, 4, 4), real=(1, 4, 4), n=8):
    return {"noise": torch.randn(n, *noise), "real": torch.randn(n, *real)}


def failure(losses, batch):
    with pytest.raises(UserError) as e:
        preflight.check_step(losses, batch, WHERE)
    return str(e.value)


def hooks_left(model):
    return [name for name, m in model.named_modules() if m._forward_pre_hooks or m._forward_hooks]


def snapshot(model):
    """Everything a step's forward passes could change: weights, buffers, modes, random numbers."""
    return ({k: v.clone() for k, v in model.state_dict().items()}, {n: m.training for n, m in model.named_modules()},
            torch.get_rng_state(), random.getstate(), np.random.get_state())


def assert_unchanged(model, before):
    state, modes, torch_rng, python_rng, numpy_rng = before
    after = model.state_dict()
    assert after.keys() == state.keys()
    changed = [k for k in state if not torch.equal(after[k], state[k])]
    assert not changed, f"changed by the check: {changed}"
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert random.getstate() == python_rng
    new_numpy = np.random.get_state()
    assert new_numpy[0] == numpy_rng[0] and np.array_equal(new_numpy[1], numpy_rng[1])
    assert new_numpy[2:] == numpy_rng[2:]
    assert not hooks_left(model)


@pytest.mark.parametrize("real, layer, given, expects, built", [
    ((1, 8, 8), "disc_Linear_4 (Linear)", [256], "in_features=64", [64]),
    ((3, 4, 4), "disc_Conv2d_0 (Conv2d)", [3, 4, 4], "in_channels=1", [1, 4, 4]),
])
def test_real_stream_that_does_not_fit_names_stream_and_discriminator_layer(tmp_path, real, layer, given, expects,
                                                                            built):
    model = build(tmp_path, Gan, GAN_YAML)
    losses, batch = losses_of(model), gan_batch(real=real)
    before = snapshot(model)
    message = failure(losses, batch)
    lines = message.splitlines()
    assert lines[0] == (f"{WHERE}: one training step cannot run on this data: "
                        "the discriminator on the real samples failed")
    assert lines[1] == ("  data: dataset stream 'real' (the discriminator's real samples, target_key of the flow "
                        f"Gan), samples of shape {list(real)} (float32)")
    assert lines[2] == (f"  layer: component discriminator, submodel disc, layer {layer}, given samples of shape "
                        f"{given}; it expects {expects}; the architecture built it for samples of shape {built}")
    assert lines[3].startswith("  torch: ") and len(lines) == 4
    assert_unchanged(model, before)  # also after a failure: the generator's BatchNorm had run


def test_real_stream_check_uses_two_samples(tmp_path):
    model = build(tmp_path, Gan, GAN_YAML)
    message = failure(losses_of(model), gan_batch(real=(1, 8, 8), n=64))
    assert message.endswith("torch: mat1 and mat2 shapes cannot be multiplied (2x256 and 64x8)")


def test_input_stream_that_does_not_fit_names_generator_layer(tmp_path):
    model = build(tmp_path, Gan, GAN_YAML)
    message = failure(losses_of(model), gan_batch(noise=(3, 4, 4)))
    assert f"{WHERE}: one training step cannot run on this data: the generator's forward pass failed" in message
    assert (f"data: dataset stream 'noise' (the generator's inputs, input_data.data_key of {model.architecture_path}), "
            "samples of shape [3, 4, 4] (float32)") in message
    assert ("layer: component generator, submodel gen, layer gen_Conv2d_0 (Conv2d), given samples of shape [3, 4, 4]; "
            "it expects in_channels=2; the architecture built it for samples of shape [2, 4, 4]") in message
    assert "expected input[2, 3, 4, 4] to have 2 channels" in message.splitlines()[-1]


def test_loss_on_outputs_and_targets_that_do_not_fit_names_the_loss(tmp_path):
    model = build(tmp_path, Regression, REGRESSION_YAML)
    losses = losses_of(model, "adversarial.enable_adversarial_training=false",
                       "loss.loss_fn=weighted_reconstruction_loss", "loss.loss_args={}")
    batch = {"images": torch.randn(4, 1, 4, 4), "targets": torch.randn(4, 1, 8, 8)}
    before = snapshot(model)
    with pytest.warns(UserWarning):  # torch's own warning about the target size, before it fails
        message = failure(losses, batch)
    lines = message.splitlines()
    assert lines[0] == f"{WHERE}: one training step cannot run on this data: the generator's loss terms failed"
    assert lines[1] == ("  data: loss.loss_fn weighted_reconstruction_loss, given outputs: samples of shape [1, 4, 4] "
                        "(float32); targets: dataset stream 'targets', samples of shape [1, 8, 8] (float32)")
    assert lines[2].startswith("  torch: The size of tensor a (4) must match the size of tensor b (8)")
    assert not any(line.startswith("  layer:") for line in lines)  # no layer was running
    # then where in loss.py (a file users edit) it failed, its frames alone: none of the pipeline's or torch's
    assert lines[3] == "  in your code:" and "loss.py" in lines[4] and "weighted_reconstruction_loss" in message
    assert not any("engine" in line or "site-packages" in line for line in lines)
    assert_unchanged(model, before)


def test_passing_check_leaves_no_trace(tmp_path):
    model = build(tmp_path, Gan, GAN_YAML)
    # A gradient penalty: the loss asks for the discriminator and draws random numbers.
    losses = losses_of(model, "loss.loss_fn=wgan_gp_loss", "loss.loss_args={gp_weight: 10.0}")
    model.eval()
    model.model_components["discriminator"]["disc"].layers["disc_Dropout_2"].train()  # mixed modes stay mixed
    batch = gan_batch()
    before = snapshot(model)
    with torch.no_grad():  # the check turns autograd on for the penalty itself
        preflight.check_step(losses, batch, WHERE)
    assert_unchanged(model, before)
    # The check is worth making: a forward pass in train mode does change the buffers.
    model.train()
    model(batch["noise"])
    tracked = "model_components.generator.gen.layers.gen_BatchNorm2d_1.num_batches_tracked"
    assert not torch.equal(model.state_dict()[tracked], before[0][tracked])


def test_forward_passes_run_in_train_mode(tmp_path):
    """A BatchNorm on a batch of one fails in training; so it does in the check, even of a model in eval mode."""
    model = build(tmp_path, Gan, GAN_YAML)
    model.eval()
    message = failure(losses_of(model), gan_batch(n=1))
    assert "the discriminator on the real samples failed" in message
    assert "layer: component discriminator, submodel disc, layer disc_BatchNorm1d_5 (BatchNorm1d)" in message
    assert "it expects num_features=8" in message
    assert "Expected more than 1 value per channel when training" in message
    assert not model.training and not hooks_left(model)


def test_compiled_submodels_run_eagerly_in_the_check(tmp_path):
    """Hooks inside a compiled submodel would see nothing; the check runs them eagerly (and compiles nothing)."""
    model = build(tmp_path, Gan, GAN_YAML)
    losses = losses_of(model)
    compile_submodels(model, {}, "training.compile_args")
    message = failure(losses, gan_batch(real=(1, 8, 8)))
    assert "layer: component discriminator, submodel disc, layer disc_Linear_4 (Linear)" in message
    assert message.endswith("torch: mat1 and mat2 shapes cannot be multiplied (2x256 and 64x8)")


@pytest.mark.slow
def test_train_stops_before_writing_when_real_stream_does_not_fit(repo):
    """The toy GAN given 32x32 real images (its discriminator takes 4x4 ones): exit status 2, no run folder."""
    proc = run(repo, "train.py", "-t", TRAIN_CFG, "--set", "saving.save_folder_name=preflight_misfit",
               "--set", "dataset.real_images.data_path=data/unet_gan/shapes_32x32.npy",
               "--set", "dataset.real_images.n_inputs=8", "--set", "dataset.gen_inputs.n_inputs=8",
               "--set", "training.n_epochs=1", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"error: {TRAIN_CFG}: one training step cannot run on this data: "
                                  "the discriminator on the real samples failed"), proc.stderr
    assert "dataset stream 'real_images'" in proc.stderr and "samples of shape [1, 32, 32]" in proc.stderr
    assert "submodel disc_cnn, layer disc_cnn_Linear_5 (Linear)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (repo / CHECKPOINTS / "preflight_misfit").exists()


# ---- a discriminator that squashes its scores --------------------------------------------------
def sigmoid_architecture(tmp_path):
    """The toy GAN's architecture with a final Sigmoid in its discriminator, as pytorch/examples'
    DCGAN has one."""
    text = (SRC / "models/example_model/example_model_architecture.yaml").read_text()
    path = tmp_path / "sigmoid_arch.yaml"
    path.write_text(text.replace("    - {Linear: {out_features: 1}}", "    - {Linear: {out_features: 1}}\n"
                                 "    - {Sigmoid: null}"))
    return path


def test_a_bounded_discriminator_with_a_loss_on_raw_scores_is_refused(tmp_path):
    import loss

    class Flow(model_base.PyNet):
        target_key = "real_images"

    model = Flow(sigmoid_architecture(tmp_path))
    with pytest.raises(UserError, match=r"disc_cnn\.layers\[6\] \(disc_cnn_Sigmoid_6, Sigmoid\) bounds the "
                                        r"discriminator's scores, but loss.loss_fn bce_gan_loss \(cfg.yaml\)"):
        check_training_setup(model, True, loss.bce_gan_loss, "cfg.yaml")

    def probability_loss(network, outputs, targets, fake_scores, real_scores):
        return {}
    probability_loss.takes_probabilities = True
    check_training_setup(model, True, probability_loss, "cfg.yaml")  # a loss on probabilities: fine
    Flow.bounded_scores = True
    check_training_setup(model, True, loss.bce_gan_loss, "cfg.yaml")  # the flow says it is meant
    check_training_setup(model_base.PyNet(SRC / "models/example_model/example_model_architecture.yaml"),
                         False, loss.weighted_reconstruction_loss, "cfg.yaml")  # no discriminator trained


@pytest.mark.slow
def test_train_refuses_a_sigmoid_discriminator_before_writing(repo, tmp_path):
    proc = run(repo, "train.py", "-t", TRAIN_CFG, "--set", "saving.save_folder_name=preflight_sigmoid",
               "--set", f"model.architecture_cfg_path={sigmoid_architecture(tmp_path)}",
               "--set", "loss.loss_fn=bce_gan_loss", "--set", "loss.loss_args={}", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "disc_cnn_Sigmoid_6" in proc.stderr and "Drop the Sigmoid layer" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (repo / CHECKPOINTS / "preflight_sigmoid").exists()

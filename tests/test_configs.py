"""Every shipped config loads and validates; defaults are filled; `--set` overrides work."""
import math

import pytest
import yaml

import dataset_base
from conftest import ARCH_YAML, FLOW_PY, SRC, TRAIN_CFG
from engine import config, model_base
from engine.errors import UserError

CONFIGS = sorted((SRC / "configs").rglob("*.yaml"))
ARCHITECTURES = sorted(p for p in (SRC / "models").rglob("*.yaml") if "model_checkpoints" not in p.parts)


def kind(path):
    """Which schema a config file follows, from its top-level keys."""
    top = yaml.safe_load(path.read_text())
    if "training_evaluation" in top:
        return "training_evaluation"
    if "evaluation" in top:
        return "evaluation"
    return "training"


def by_kind(wanted):
    return [pytest.param(p, id=str(p.relative_to(SRC))) for p in CONFIGS if kind(p) == wanted]


def test_configs_are_found():
    kinds = {kind(p) for p in CONFIGS}
    assert kinds == {"training", "evaluation", "training_evaluation"}, CONFIGS


@pytest.mark.parametrize("path", by_kind("training"))
def test_training_config_loads_and_builds(path):
    cfg = config.load_training_config(path)
    assert cfg["training"]["n_epochs"] >= 1
    assert cfg["dataset"]["data_len_key"] in cfg["dataset"]
    model = model_base.build_model(cfg["model"])
    assert isinstance(model, model_base.PyNet)
    assert sum(p.numel() for p in model.parameters()) > 0
    if cfg["adversarial"]["enable_adversarial_training"]:
        assert model.has_discriminator


@pytest.mark.parametrize("path", by_kind("training"))
def test_training_config_data_loads(path):
    """The config's data streams read, and the architecture's input stream is among them with the
    per-sample shape the architecture expects."""
    cfg = config.load_training_config(path)
    streams = dataset_base.load_streams(cfg["dataset"], cfg["training"]["seed"], str(path))
    assert set(streams) == set(config.stream_configs(cfg["dataset"]))
    assert all(len(s) > 0 for s in streams.values())
    model = model_base.build_model(cfg["model"])
    assert tuple(streams[model.input_key].shape[1:]) == model.input_size


@pytest.mark.parametrize("path", by_kind("evaluation"))
def test_evaluation_config_loads(path):
    ev = config.load_config(path, config.EVALUATION)["evaluation"]
    assert ev["n_samples"] >= 1 and ev["batch_size"] >= 1
    assert isinstance(ev["model_checkpoint_filename"], str)


@pytest.mark.parametrize("path", by_kind("training_evaluation"))
def test_training_evaluation_config_loads(path):
    te = config.load_config(path, config.TRAINING_EVALUATION)["training_evaluation"]
    assert te["loss_average_window"] >= 1
    # the training config it names is itself valid
    config.load_training_config(config.resolve_path(te["training_cfg_path"]))


@pytest.mark.parametrize("path", [pytest.param(p, id=str(p.relative_to(SRC))) for p in ARCHITECTURES])
def test_architecture_builds(path):
    model = model_base.PyNet(path)
    assert model.submodels and sum(p.numel() for p in model.parameters()) > 0


# ---- defaults ----------------------------------------------------------------------------------
MINIMAL = {
    "model": {"architecture_cfg_path": ARCH_YAML, "model_flow_path": FLOW_PY},
    "loss": {"loss_fn": "example_gan_loss"},
    "dataset": {"data_len_key": "noise",
                "noise": {"data_read_type": "function", "data_generating_function": "random_normal",
                          "n_inputs": 8}},
}


def write_cfg(tmp_path, cfg, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_left_out_keys_take_defaults(tmp_path):
    cfg = config.load_training_config(write_cfg(tmp_path, MINIMAL))
    # every section and every key is there
    for section, keys in config.TRAINING.items():
        assert set(keys) <= set(cfg[section]), section
    assert set(config.STREAM) == set(cfg["dataset"]["noise"])
    t = cfg["training"]
    assert t["gpus"] == []                       # CPU unless asked
    assert t["optimizer"] == "Adam" and t["optimizer_args"] == {}
    assert isinstance(t["seed"], int)            # runs are seeded by default
    assert isinstance(t["learning_rate"], float) and t["learning_rate"] > 0
    assert isinstance(t["n_epochs"], int) and t["n_epochs"] >= 1
    assert cfg["adversarial"]["enable_adversarial_training"] is False
    assert cfg["model"]["model_checkpoint_filename"] is None      # start from scratch
    assert cfg["loss"]["loss_args"] == {}
    s = cfg["dataset"]["noise"]
    assert s["randomize_inputs"] is False and s["multiple_samples_per_file"] is False
    assert s["data_generating_function_args"] == {} and s["data_batch_transform"] is None


def test_adversarial_nulls_copy_training(tmp_path):
    raw = dict(MINIMAL, training={"learning_rate": 0.003, "learning_rate_gamma": 0.5, "learning_rate_step": 7,
                                  "optimizer": "SGD", "optimizer_args": {"momentum": 0.9}},
               adversarial={"enable_adversarial_training": True, "learning_rate": None})
    adv = config.load_training_config(write_cfg(tmp_path, raw))["adversarial"]
    assert adv["learning_rate"] == 0.003
    assert adv["learning_rate_gamma"] == 0.5
    assert adv["learning_rate_step"] == 7
    assert adv["optimizer"] == "SGD"
    assert adv["optimizer_args"] == {"momentum": 0.9}


def test_adversarial_values_given_are_kept(tmp_path):
    raw = dict(MINIMAL, training={"learning_rate": 0.003}, adversarial={"learning_rate": 0.01})
    cfg = config.load_training_config(write_cfg(tmp_path, raw))
    assert cfg["adversarial"]["learning_rate"] == 0.01 and cfg["training"]["learning_rate"] == 0.003


def test_explicit_null_takes_default(tmp_path):
    default = config.load_training_config(write_cfg(tmp_path, MINIMAL, "a.yaml"))
    raw = dict(MINIMAL, training={"batch_size": None, "seed": None})
    cfg = config.load_training_config(write_cfg(tmp_path, raw, "b.yaml"))
    assert cfg["training"]["batch_size"] == default["training"]["batch_size"]
    assert cfg["training"]["seed"] == default["training"]["seed"]


def test_defaults_are_not_shared_between_loads(tmp_path):
    path = write_cfg(tmp_path, MINIMAL)
    first = config.load_training_config(path)
    first["training"]["gpus"].append(3)
    first["loss"]["loss_args"]["x"] = 1
    second = config.load_training_config(path)
    assert second["training"]["gpus"] == [] and second["loss"]["loss_args"] == {}


def test_float_written_without_dot_is_a_float(tmp_path):
    raw = dict(MINIMAL, training={"learning_rate": "2e-4"})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw).replace("'2e-4'", "2e-4"))
    assert "learning_rate: 2e-4" in path.read_text()
    lr = config.load_training_config(path)["training"]["learning_rate"]
    assert isinstance(lr, float) and lr == 2e-4


# ---- --set overrides ---------------------------------------------------------------------------
EXAMPLE = SRC / TRAIN_CFG


def test_override_changes_values():
    cfg = config.load_training_config(EXAMPLE, overrides=["training.n_epochs=3", "saving.save_folder_name=other",
                                                          "dataset.real_images.n_inputs=100"])
    assert cfg["training"]["n_epochs"] == 3
    assert cfg["saving"]["save_folder_name"] == "other"
    assert cfg["dataset"]["real_images"]["n_inputs"] == 100
    untouched = config.load_training_config(EXAMPLE)
    assert untouched["training"]["n_epochs"] != 3  # the file itself is unchanged


def test_override_values_are_yaml():
    cfg = config.load_training_config(EXAMPLE, overrides=[
        "training.learning_rate=2e-4", "training.gpus=[]", "training.optimizer_args={betas: [0.9, 0.99]}",
        "adversarial.learning_rate=null", "training.batch_size=16", "adversarial.train_disc_first=false"])
    t, adv = cfg["training"], cfg["adversarial"]
    assert isinstance(t["learning_rate"], float) and math.isclose(t["learning_rate"], 2e-4)
    assert adv["learning_rate"] == t["learning_rate"]  # null copies training's value
    assert t["gpus"] == []
    assert t["optimizer_args"] == {"betas": [0.9, 0.99]}
    assert t["batch_size"] == 16 and isinstance(t["batch_size"], int)
    assert adv["train_disc_first"] is False


def test_apply_overrides_on_raw_dict():
    raw = {"a": {"b": 1}}
    out = config.apply_overrides(raw, ["a.c=[1, 2]", "a.b=x", "d.e.f=2.5"], "src.yaml")
    assert out == {"a": {"b": "x", "c": [1, 2]}, "d": {"e": {"f": 2.5}}}


def test_override_sets_a_list_entry_by_index():
    """--set reaches into lists, e.g. one of dataset.batch_transforms, and the result is validated."""
    unet = SRC / "configs/unet_gan/unet_gan_training_cfg.yaml"
    cfg = config.load_training_config(unet, overrides=["dataset.batch_transforms[1].args.std=0.2",
                                                       "dataset.batch_transforms[0].in_evaluation=true"])
    noise, flip = cfg["dataset"]["batch_transforms"][1], cfg["dataset"]["batch_transforms"][0]
    assert noise["args"] == {"std": 0.2} and noise["transform"] == "add_gaussian_noise"
    assert flip["in_evaluation"] is True and flip["args"] == {"horizontal": True, "vertical": True}
    message = r"--set dataset\.batch_transforms\[2\]\.args\.std: no entry \[2\] \(a list of 2 entries\)"
    with pytest.raises(UserError, match=message):
        config.load_training_config(unet, overrides=["dataset.batch_transforms[2].args.std=0.2"])
    with pytest.raises(UserError, match=r"no entry \[0\] \(not a list\)"):
        config.load_training_config(unet, overrides=["training.n_epochs[0]=1"])
    with pytest.raises(UserError, match=r"--set dataset\.batch_transforms\[0\]\.args\.std: the config has no "
                                        r"'batch_transforms'"):
        config.load_training_config(EXAMPLE, overrides=["dataset.batch_transforms[0].args.std=0.2"])
    with pytest.raises(UserError, match=r"dataset\.batch_transforms\[1\]\.args\.sd: not an argument"):
        config.load_training_config(unet, overrides=["dataset.batch_transforms[1].args.sd=0.2"])


@pytest.mark.parametrize("item", ["training.n_epochs", "=3", "training.n_epochs=[1,",
                                  "training.n_epochs.deeper=1"])
def test_malformed_override_is_user_error(item):
    with pytest.raises(UserError):
        config.load_training_config(EXAMPLE, overrides=[item])


def test_override_result_is_validated():
    with pytest.raises(UserError, match=r"training\.batch_size"):
        config.load_training_config(EXAMPLE, overrides=["training.batch_size=abc"])


def test_unknown_override_key_names_nearest():
    with pytest.raises(UserError) as e:
        config.load_training_config(EXAMPLE, overrides=["training.n_epoch=3"])
    assert "training.n_epoch" in str(e.value) and "did you mean 'n_epochs'" in str(e.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(UserError) as e:
        config.load_training_config(EXAMPLE, overrides=["training.batch_size=0", "loss.loss_fn=nope",
                                                        "saving.save_epoch_incremnt=2"])
    message = str(e.value)
    assert str(EXAMPLE) in message
    assert "training.batch_size" in message and "loss.loss_fn" in message and "saving.save_epoch_incremnt" in message


@pytest.mark.parametrize("override, key", [
    ("training.learning_rate_gamma=1.5", "training.learning_rate_gamma"),
    ("training.n_epochs=2.5", "training.n_epochs"),
    ("training.n_epochs=true", "training.n_epochs"),
    ("training.learning_rate=.inf", "training.learning_rate"),
    ("training.optimizer=Adma", "training.optimizer"),
    ("training.gpus=[-1]", "training.gpus"),
    ("dataset.real_images.file_reader=read_npz", "dataset.real_images.file_reader"),
    ("dataset.real_images.data_pth=x", "dataset.real_images.data_pth"),
    ("dataset.real_images.file_reader_args={dtpye: float32}", "dataset.real_images.file_reader_args.dtpye"),
    ("dataset.data_len_key=real_image", "dataset.data_len_key"),
    ("loss.loss_args={adversarial_wieght: 2}", "loss.loss_args.adversarial_wieght"),
    ("model.architecture_cfg_path=models/nope.yaml", "model.architecture_cfg_path"),
    ("model.model_flow_path=models/example_model", "model.model_flow_path"),
    ("training.seed=-1", "training.seed"),
    ("loss=x", "loss"),
    ("dataset.gen_inputs=5", "dataset.gen_inputs"),
    ("dataset=[1]", "dataset"),
    ("dataset.real_images.data_read_type=folder", "dataset.real_images.data_path"),
])
def test_bad_values_are_user_errors(override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        config.load_training_config(EXAMPLE, overrides=[override])


def test_set_fills_a_section_written_as_null():
    raw = config.apply_overrides({"adversarial": None}, ["adversarial.n_disc_iterations=2"], "cfg.yaml")
    assert raw == {"adversarial": {"n_disc_iterations": 2}}


def test_evaluation_config_overrides_and_rejects_unknown_keys():
    path = SRC / "configs/example_model/example_evaluation_cfg.yaml"
    ev = config.load_config(path, config.EVALUATION, overrides=["evaluation.n_samples=8"])["evaluation"]
    assert ev["n_samples"] == 8
    with pytest.raises(UserError, match=r"evaluation\.n_sample\b.*did you mean 'n_samples'"):
        config.load_config(path, config.EVALUATION, overrides=["evaluation.n_sample=8"])


def test_missing_config_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="nope.yaml"):
        config.load_training_config(tmp_path / "nope.yaml")


def test_invalid_yaml_is_user_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training: {n_epochs: 3\n")
    with pytest.raises(UserError, match="bad.yaml"):
        config.load_training_config(path)


# ---- the generated reference, docs/config.md ---------------------------------------------------
def schema_keys():
    """(key path, Key) of every key of every schema."""
    tables = [(f"training.{s}" if s != "training" else s, k) for s, k in config.TRAINING.items()]
    tables += [("stream", config.STREAM), ("batch_transform", config.BATCH_TRANSFORM),
               ("evaluation", config.EVALUATION["evaluation"]),
               ("training_evaluation", config.TRAINING_EVALUATION["training_evaluation"])]
    return [(f"{prefix}.{key}", rule) for prefix, schema in tables for key, rule in schema.items()]


def test_committed_config_reference_is_up_to_date():
    committed = (SRC / "docs" / "config.md").read_text()
    assert committed == config.config_reference(), \
        f"docs/config.md differs from what config.py generates; regenerate it with `{config.DOCS_COMMAND}`"


def test_every_key_and_rule_is_described():
    assert not [path for path, rule in schema_keys() if not rule.doc.strip()], "keys without a doc"
    assert not [path for path, rule in schema_keys() if rule.check and not getattr(rule.check, "text", "")], \
        "rules without a description (wrap them in config.described)"


def test_reference_lists_every_key_with_its_default_and_rule():
    reference = config.config_reference()
    for key in config.TRAINING["training"]:
        assert f"`training.{key}`" in reference
    for key in config.STREAM:
        assert f"`dataset.<stream>.{key}`" in reference
    assert "| `training.optimizer` | string | `Adam` | an optimizer in torch.optim |" in reference
    assert "| `model.architecture_cfg_path` | string | **required** |" in reference
    assert "| `loss.loss_fn` | string | `null` | a function in loss.py |" in reference
    assert "| `networks.<name>.components` | list | **required** | names |" in reference
    assert "| `training.ema_decay` | number | `null` | in (0, 1) |" in reference
    assert "(null: training.learning_rate)" in reference and config.DOCS_COMMAND in reference


def test_write_docs_replaces_the_file_whole(tmp_path):
    path = tmp_path / "docs" / "config.md"
    config.write_docs(path)
    config.write_docs(path)
    assert path.read_text() == config.config_reference()
    assert [p.name for p in path.parent.iterdir()] == ["config.md"]  # no temp file left behind


def test_rules_keep_their_messages():
    assert config.at_least(1)(0) == "must be >= 1" and config.at_least(1)(1) is None
    assert config.between(0, 1, "(]")(0) == "must be in (0, 1]" and config.between(0, 1, "(]")(1) is None
    assert config.between(0, 1, "[)")(1) == "must be in [0, 1)" and config.between(0, 1, "[)")(0) is None
    assert config.between(0, 1, "()", ", e.g. 0.999")(1) == "must be in (0, 1), e.g. 0.999"
    assert config.greater_than(0)(0) == "must be > 0"
    assert config.one_of("epoch", "step")("epoc") == "must be one of epoch, step (did you mean 'epoch'?)"
    assert config.one_of("epoch", "step").text == "one of: epoch, step"


def test_registry_tables_resolve_names_with_did_you_mean():
    from engine import registry
    assert "Adam" in registry.optimizers() and "StepLR" in registry.schedulers()
    assert "LambdaLR" not in registry.schedulers() and "Compose" not in registry.batch_transforms()
    with pytest.raises(UserError, match=r"x\.yaml: k: 'adamw': unknown optimizer \(did you mean 'AdamW'\?\); valid: "):
        registry.lookup("adamw", registry.optimizers(), "optimizer", "x.yaml: k")

"""One bad input of each kind that fuzzing found the scripts crashing on, each through the real
script: exit status 2, an `error:` message naming the file or the key, no traceback, and nothing
written (SPEC, Errors). tests/test_fuzz.py searches for more of them at random; these are the
ones a regression must never bring back.

The cases of a test run in children forked from one process that imported the pipeline
(conftest.run_forked), all of them in one go, which keeps each test to seconds.
"""
import copy
import random
import shutil

import pytest
import torch
import yaml

import config
import runs
from conftest import ARCH_YAML, EVAL_CFG, TRAIN_CFG, TRAIN_EVAL_CFG, checkpoints, run, run_forked
from errors import UserError

CLASSIFIER_CFG = "configs/shape_classifier/shape_classifier_training_cfg.yaml"


def architecture(repo, folder, name, change):
    """The toy GAN's architecture, changed by `change(arch)`, written to `folder`; its path."""
    arch = yaml.safe_load((repo / ARCH_YAML).read_text())
    change(arch)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(arch, sort_keys=False))
    return path


def set_prefix(value):
    return lambda arch: arch["gen_cnn"].__setitem__("layer_name_prefix", value)


def renamed(old, new):
    """A submodel renamed in the architecture (and where it is read there), not in the flow."""
    def change(arch):
        arch[new] = arch.pop(old)
        arch["model_components"]["generator"]["submodels"] = [new if s == old else s for s in
                                                              arch["model_components"]["generator"]["submodels"]]
        for spec in arch.values():
            inputs = spec.get("submodel_input") if isinstance(spec, dict) else None
            if isinstance(inputs, dict) and old in inputs:
                inputs[new] = inputs.pop(old)
    return change


def empty_component_name(arch):
    arch["model_components"][""] = arch["model_components"].pop("discriminator")


def config_cases(repo, tmp):
    """{name: ([script, *args], what the message must name, the folder that must stay empty)}."""
    files, out = tmp / "files", tmp / "out"
    files.mkdir()

    def train(*sets, cfg=TRAIN_CFG):
        return ["train.py", "-t", cfg, "--set", f"saving.save_folder_name={out}", "--set", "training.n_epochs=1",
                *[a for s in sets for a in ("--set", s)]]

    def arch(name, change):
        return train(f"model.architecture_cfg_path={architecture(repo, files, name, change)}")

    (files / "not_python.py").write_bytes(b"\x00\x01 binary")
    (files / "bad_import.py").write_text("import a_module_nobody_has\n")
    (files / "twice.yaml").write_text((repo / TRAIN_CFG).read_text() + "\ntraining:\n  n_epochs: 3\n")
    (files / "twice_arch.yaml").write_text((repo / ARCH_YAML).read_text().replace(
        "  discriminator:\n", "  discriminator: {adv_type: discriminator, submodels: [disc_cnn]}\n  discriminator:\n"))
    found = {
        "binary_config": (["train.py", "-t", "data/example_model/blobs_4x4.npy"], "blobs_4x4.npy: not a text file"),
        "long_path": (["train.py", "-t", "x" * 400 + ".yaml"], "xxxx"),
        "flow_not_python": (train(f"model.model_flow_path={files / 'not_python.py'}"), "not_python.py"),
        "flow_import_fails": (train(f"model.model_flow_path={files / 'bad_import.py'}"), "bad_import.py"),
        "prefix_empty": (arch("prefix_empty", set_prefix("")), "gen_cnn.layer_name_prefix"),
        "prefix_dot": (arch("prefix_dot", set_prefix("a.b")), "gen_cnn.layer_name_prefix"),
        "prefix_number": (arch("prefix_number", set_prefix(5)), "gen_cnn.layer_name_prefix"),
        "submodel_dot": (arch("submodel_dot", renamed("gen_cnn", "gen.cnn")), "'gen.cnn'"),
        "component_empty": (arch("component_empty", empty_component_name), "model_components."),
        "flow_reads_missing_submodel": (arch("renamed", renamed("gen_dec", "gen_decoder")), "'gen_dec'"),
        "shape_nested": (train("dataset.gen_inputs.data_generating_function_args={shape: [[3], 4, 4]}"),
                         "dataset.gen_inputs.data_generating_function_args"),
        "low_text": (train("dataset.real_images.data_read_postprocessing_fn=scale_to_symmetric",
                           "dataset.real_images.data_read_postprocessing_fn_args={low: '3', high: 1}"),
                     "data_read_postprocessing_fn_args.low"),
        "betas_short": (train("training.optimizer_args={betas: [0.5]}"), "training.optimizer_args"),
        "weight_list": (train("loss.loss_args={l1_weight: [100.0]}"), "loss.loss_args.l1_weight"),
        "weight_empty": (train("loss.loss_args={l1_weight: ''}"), "loss.loss_args.l1_weight"),
        "n_inputs_huge": (train("dataset.gen_inputs.n_inputs=100000000000"), "dataset.gen_inputs.n_inputs"),
        "data_float64": (train("dataset.real_images.file_reader_args={dtype: float64}"), "(float64)"),
        "labels_wrong_rank": (train("dataset.labels.file_reader_args={key: images, dtype: int64}",
                                    cfg=CLASSIFIER_CFG), "cross_entropy_loss"),
        "key_twice": (["train.py", "-t", files / "twice.yaml", "--set", f"saving.save_folder_name={out}"],
                      "'training' is written twice"),
        "component_twice": (train(f"model.architecture_cfg_path={files / 'twice_arch.yaml'}"),
                            "'discriminator' is written twice"),
    }
    # each case writes (if it wrongly runs) into a folder of its own, so that one cannot hide another
    return {name: ([str(a).replace(str(out), str(out / name)) for a in args], named, out / name)
            for name, (args, named) in found.items()}


DELETE = object()


def damaged_checkpoints(source, folder):
    """{name: path} of copies of the checkpoint at `source`, each damaged in one way."""
    state = torch.load(source, map_location="cpu", weights_only=True)

    def save(name, **changes):
        damaged = {k: v for k, v in {**state, **changes}.items() if v is not DELETE}
        torch.save(damaged, folder / f"{name}.pth")

    save("no_epoch", epoch=DELETE)
    save("rng_part", rng_state={k: v for k, v in state["rng_state"].items() if k != "python"})
    save("history_text", loss_history="x")
    save("weights_true", model_state_dict=True)
    save("scheduler_nan", scheduler_state_dict=float("nan"))
    save("ema_other", ema_state_dict={"a.weight": torch.zeros(3)}, ema_updates=3)
    optimizer = copy.deepcopy(state["optimizer_state_dict"])  # a buffer of Adam's renamed, as a bit flip may
    optimizer["state"][0]["exp_avg_sqx"] = optimizer["state"][0].pop("exp_avg_sq")
    save("optimizer_buffer", optimizer_state_dict=optimizer)
    save("weights_nan", model_state_dict={k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                                          for k, v in state["model_state_dict"].items()})
    (folder / "random_bytes.pth").write_bytes(random.Random(0).randbytes(5000))
    (folder / "truncated.pth").write_bytes(source.read_bytes()[:source.stat().st_size // 2])
    return {p.stem: p for p in sorted(folder.glob("*.pth"))}


# The damage a script has no need to see, where it may well run: a resume alone needs the epoch
# and the optimizer's buffers, and evaluate_training.py reads a checkpoint's histories, not its
# generator's EMA.
UNREAD = {"no_epoch": {"evaluate", "evaluate_training", "jit_trace"}, "ema_other": {"evaluate_training"},
          "optimizer_buffer": {"evaluate", "evaluate_training", "jit_trace"}}


def checkpoint_cases(run_folder, tmp):
    """Each damaged checkpoint handed to every script that reads one: {name: (args, named, folder)}."""
    folder = tmp / "checkpoints"
    folder.mkdir()
    found = {}
    for damage, path in damaged_checkpoints(checkpoints(run_folder)[-1], folder).items():
        scripts = {
            "train": ["train.py", "-t", TRAIN_CFG, "--set", f"model.model_checkpoint_filename={path}",
                      "--set", "training.n_epochs=3"],
            "evaluate": ["evaluate.py", "-t", TRAIN_CFG, "-e", EVAL_CFG, "--set",
                         f"evaluation.model_checkpoint_filename={path}"],
            "evaluate_training": ["evaluate_training.py", "-te", TRAIN_EVAL_CFG, "--set",
                                  f"training_evaluation.model_checkpoint_filename={path}"],
            "jit_trace": ["jit_trace_model.py", "-t", TRAIN_CFG, "-c", path, "-i", "1", "1", "4", "4"],
        }
        for script, args in scripts.items():
            if script not in UNREAD.get(damage, ()):
                out = tmp / "checkpoint_runs" / f"{script}-{damage}"
                shutil.copytree(run_folder, out / "run_1")  # a run for evaluate_training.py to read
                found[f"{script}-{damage}"] = ([*args, "--set", f"saving.save_folder_name={out}"], path.name, out)
    return found


def run_refused(repo, found, tmp):
    """Run every case of `found` at once: {case: (CompletedProcess, what its message must name,
    the folder, its files before)}."""
    before = {name: listing(folder) for name, (_, _, folder) in found.items()}
    logs = tmp / "logs"
    logs.mkdir()
    done = run_forked(repo, {name: args for name, (args, _, _) in found.items()}, logs)
    return {name: (done[name], named, folder, before[name]) for name, (_, named, folder) in found.items()}


def listing(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*")) if folder.exists() else []


def broken_promises(proc, named, folder, before):
    """What in `proc`'s ending breaks the contract for a refused input ([] when nothing does)."""
    err = proc.stderr
    problems = []
    if proc.returncode != 2:
        problems.append(f"exit {proc.returncode}, not 2")
    if "Traceback" in err:
        problems.append("a traceback")
    if not err.lstrip().startswith("error: "):
        problems.append("no 'error: ' message")
    if named not in err:
        problems.append(f"the message does not name {named!r}")
    if listing(folder) != before:
        problems.append(f"files were written: {sorted(set(listing(folder)) - set(before))}")
    return problems


def assert_refused(refused, expected):
    broken = {name: (problems, proc.stderr[-1500:]) for name, (proc, named, folder, before) in refused.items()
              if (problems := broken_promises(proc, named, folder, before))}
    assert not broken, "\n\n".join(f"{name}: {'; '.join(problems)}\n{err}" for name, (problems, err) in broken.items())
    assert len(refused) == expected  # (every case ran)


def test_bad_configs_architectures_and_files_are_refused_naming_them(repo, tmp_path):
    assert_refused(run_refused(repo, config_cases(repo, tmp_path), tmp_path), 20)


@pytest.mark.slow  # (the fast subset fuzzes checkpoints in every script: tests/test_fuzz.py)
def test_damaged_checkpoints_are_refused_by_every_script_naming_them(repo, trained, tmp_path):
    _, run_folder = trained
    assert_refused(run_refused(repo, checkpoint_cases(run_folder, tmp_path), tmp_path), 10 * 4 - 7)


@pytest.mark.slow
def test_the_checkpoint_layout_check_knows_every_key_a_run_writes(trained):
    """runs.CHECKPOINT lists what Trainer.state writes; a key added there and not here would go unchecked."""
    _, run_folder = trained
    state = runs.read_checkpoint(checkpoints(run_folder)[-1])
    assert set(state) <= set(runs.CHECKPOINT), set(state) - set(runs.CHECKPOINT)
    runs.check_checkpoint(state, "x.pth", resume=True)  # and a real one passes it


def test_the_longest_checkpoint_prefix_allowed_still_saves(repo, tmp_path):
    """saving.save_filename_prefix is refused past the length whose checkpoint names (and their
    temporary names while written) still fit a file system's 255 bytes; at that length it saves."""
    longest = "p" * (config.NAME_MAX - config.NAME_ROOM)
    args = ["-t", TRAIN_CFG, "--set", "training.n_epochs=1", "--set", f"saving.save_folder_name={tmp_path / 'out'}"]
    with pytest.raises(UserError, match="saving.save_filename_prefix"):
        config.load_training_config(repo / TRAIN_CFG, [f"saving.save_filename_prefix={longest}p"])
    run(repo, "train.py", *args, "--set", f"saving.save_filename_prefix={longest}")
    assert len(checkpoints(tmp_path / "out" / "run_1")) == 2  # epochs 0 and 1

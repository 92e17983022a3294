"""One bad input of each kind that fuzzing found the scripts crashing on, each through the real
script: exit status 2, an `error:` message naming the file or the key, no traceback, and nothing
written (SPEC, Errors). tests/test_fuzz.py searches for more of them at random; these are the
ones a regression must never bring back.

The cases of a test run two at a time (conftest.run_all), each in a process forked from one that
imported the libraries, which keeps each test to seconds.
"""
import copy
import errno
import json
import pathlib
import random
import shutil

import pytest
import torch
import yaml

import evaluate_training
from conftest import ARCH_YAML, EVAL_CFG, SRC, TRAIN_CFG, TRAIN_EVAL_CFG, checkpoints, run, run_all
from engine import config, errors, model_base, runs
from engine.errors import UserError

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


def component_named(name):
    return lambda arch: arch["model_components"].__setitem__(name, arch["model_components"].pop("discriminator"))


def alias_bomb(levels):
    """YAML flow text of a list whose `levels` levels each repeat the one before 9 times, by alias:
    a few hundred bytes that load into a small tree, whose repr is 12 x 9^levels characters."""
    steps = ["&l0 [" + ", ".join(["xxxxxxxx"] * 9) + "]"] + \
        [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(steps) + "]"


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
    cfg = yaml.safe_load((repo / TRAIN_CFG).read_text())
    cfg["dataset"][1] = cfg["dataset"]["gen_inputs"]  # written `1:`, which YAML reads as a number
    (files / "int_stream.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (files / "a_file").write_text("not a folder")
    (files / "bomb_arch.yaml").write_text((repo / ARCH_YAML).read_text().replace(
        "adv_type: discriminator", f"adv_type: {alias_bomb(6)}"))
    (files / "big_bomb_arch.yaml").write_text((repo / ARCH_YAML).read_text().replace(
        "adv_type: discriminator", f"adv_type: {alias_bomb(10)}"))
    (files / "deep_arch.yaml").write_text((repo / ARCH_YAML).read_text() + "deep: " + "[" * 100_000 + "]" * 100_000)
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
        # issue 29: names torch.nn.ModuleDict keeps for itself, and a submodel named like the stream
        # it reads; a key YAML reads as a number; a layer built on the meta device; an input beyond
        # any tensor (jit_trace_model.py refuses it before loading); runs under a path through a
        # file; a message echoing an alias bomb (7 MB as a repr)
        "component_taken": (arch("component_taken", component_named("keys")), "model_components.keys: "),
        "submodel_taken": (arch("submodel_taken", renamed("gen_cnn", "items")), "items: the submodel 'items'"),
        "submodel_named_as_stream": (arch("submodel_named_as_stream", renamed("gen_cnn", "gen_inputs")),
                                     "gen_inputs.submodel_input.input_data.data_key"),
        "stream_key_int": (train(cfg=files / "int_stream.yaml"), "dataset.1: this key is a number"),
        "layer_device": (arch("layer_device", lambda a: a["disc_cnn"]["layers"][0]["Conv2d"].update(device="meta")),
                         "disc_cnn.layers[0].layer_params.device"),
        "layer_dtype": (arch("layer_dtype", lambda a: a["gen_dec"]["layers"][0]["Linear"].update(dtype="float64")),
                        "gen_dec.layers[0].layer_params.dtype: the pipeline sets the whole model's precision"),
        "input_size_huge": (["jit_trace_model.py", "-t", TRAIN_CFG, "-c", "latest", "-i", "100000000000", "1", "32",
                             "32", "--set", f"saving.save_folder_name={out}"], "--input_size"),
        "benchmark_huge": (["jit_trace_model.py", "-t", TRAIN_CFG, "-c", "latest", "-i", "1", "1", "4", "4",
                            "--benchmark", "10000000", "--set", f"saving.save_folder_name={out}"], "--benchmark"),
        "save_folder_through_file": (train(f"saving.save_folder_name={files / 'a_file' / 'runs'}"),
                                     "saving.save_folder_name"),
        "alias_bomb": (train(f"model.architecture_cfg_path={files / 'bomb_arch.yaml'}"),
                       "model_components.discriminator.adv_type"),
        # found fuzzing after those: YAML nested 100,000 deep (libyaml's loader crashed the process
        # with a segmentation fault), a bomb past a million values and a value holding itself (the
        # trial step's copy of the config walked them without end)
        "value_range_reversed": (train("dataset.real_images.value_range=[1, -1]"),
                                 "dataset.real_images.value_range: [1, -1]: low must be below high"),
        "yaml_deep": (train(f"model.architecture_cfg_path={files / 'deep_arch.yaml'}"), "nested more than 100 levels"),
        "alias_bomb_huge": (train(f"model.architecture_cfg_path={files / 'big_bomb_arch.yaml'}"),
                            "4,412,961,607 values nested 14 deep"),
        "yaml_holds_itself": (train("dataset.gen_inputs.file_reader_args=&x {a: *x}"),  # (unused by the stream)
                              "--set dataset.gen_inputs.file_reader_args: an alias"),
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
    # the generator's EMA and optimizer state: in an older checkpoint's keys (no networks entry), and
    # in a network's entry, which a checkpoint of now reads them from
    other_ema = {"a.weight": torch.zeros(3)}
    save("ema_other", ema_state_dict=other_ema, ema_updates=3, networks=DELETE)
    optimizer = copy.deepcopy(state["optimizer_state_dict"])  # a buffer of Adam's renamed, as a bit flip may
    optimizer["state"][0]["exp_avg_sqx"] = optimizer["state"][0].pop("exp_avg_sq")
    save("optimizer_buffer", optimizer_state_dict=optimizer, networks=DELETE)
    generator = state["networks"]["generator"]
    save("network_ema_other", networks={**state["networks"], "generator": {**generator, "ema": other_ema}})
    save("network_optimizer_buffer", networks={**state["networks"], "generator": {**generator,
                                                                                  "optimizer": optimizer}})
    save("weights_nan", model_state_dict={k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                                          for k, v in state["model_state_dict"].items()})
    (folder / "random_bytes.pth").write_bytes(random.Random(0).randbytes(5000))
    (folder / "truncated.pth").write_bytes(source.read_bytes()[:source.stat().st_size // 2])
    return {p.stem: p for p in sorted(folder.glob("*.pth"))}


# The damage a script has no need to see, where it may well run: a resume alone needs the epoch
# and the optimizer's buffers, and evaluate_training.py reads a checkpoint's histories, not its
# generator's EMA.
UNREAD = {"no_epoch": {"evaluate", "evaluate_training", "jit_trace"}, "ema_other": {"evaluate_training"},
          "optimizer_buffer": {"evaluate", "evaluate_training", "jit_trace"},
          "network_ema_other": {"evaluate_training"},
          "network_optimizer_buffer": {"evaluate", "evaluate_training", "jit_trace"}}


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
    done = run_all(repo, {name: args for name, (args, _, _) in found.items()})
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
    if len(err[err.find("error: "):]) > errors.MESSAGE_LIMIT + 200:  # (the cut leaves a line and a note)
        problems.append(f"a message of {len(err):,} characters")
    if listing(folder) != before:
        problems.append(f"files were written: {sorted(set(listing(folder)) - set(before))}")
    return problems


def assert_refused(refused, expected):
    broken = {name: (problems, proc.stderr[-1500:]) for name, (proc, named, folder, before) in refused.items()
              if (problems := broken_promises(proc, named, folder, before))}
    assert not broken, "\n\n".join(f"{name}: {'; '.join(problems)}\n{err}" for name, (problems, err) in broken.items())
    assert len(refused) == expected  # (every case ran)


@pytest.mark.slow  # (dozens of script runs: the full suite's)
def test_bad_configs_architectures_and_files_are_refused_naming_them(repo, tmp_path):
    assert_refused(run_refused(repo, config_cases(repo, tmp_path), tmp_path), 34)


@pytest.mark.slow  # (the fast subset fuzzes checkpoints in every script: tests/test_fuzz.py)
def test_damaged_checkpoints_are_refused_by_every_script_naming_them(repo, trained, tmp_path):
    _, run_folder = trained
    assert_refused(run_refused(repo, checkpoint_cases(run_folder, tmp_path), tmp_path), 12 * 4 - 11)


@pytest.mark.slow
def test_the_checkpoint_layout_check_knows_every_key_a_run_writes(trained):
    """runs.CHECKPOINT lists what resume.training_state writes; a key added there and not here would go unchecked."""
    _, run_folder = trained
    state = runs.read_checkpoint(checkpoints(run_folder)[-1])
    assert set(state) <= set(runs.CHECKPOINT), set(state) - set(runs.CHECKPOINT)
    runs.check_checkpoint(state, "x.pth", resume=True)  # and a real one passes it


@pytest.mark.slow
def test_the_longest_checkpoint_prefix_allowed_still_saves(repo, tmp_path):
    """saving.save_filename_prefix is refused past the length whose checkpoint names (and their
    temporary names while written) still fit a file system's 255 bytes; at that length it saves."""
    longest = "p" * (config.NAME_MAX - config.NAME_ROOM)
    args = ["-t", TRAIN_CFG, "--set", "training.n_epochs=1", "--set", f"saving.save_folder_name={tmp_path / 'out'}"]
    with pytest.raises(UserError, match="saving.save_filename_prefix"):
        config.load_training_config(repo / TRAIN_CFG, [f"saving.save_filename_prefix={longest}p"])
    run(repo, "train.py", *args, "--set", f"saving.save_filename_prefix={longest}")
    assert len(checkpoints(tmp_path / "out" / "run_1")) == 2  # epochs 0 and 1


# ---- issue 29, in process ------------------------------------------------------------------------
NAN = float("nan")


@pytest.mark.parametrize("source", ["checkpoint", "metrics"])
def test_a_loss_history_of_nans_is_drawn_as_far_as_finite_and_said(tmp_path, capsys, source):
    """evaluate_training.py on a run whose every loss value is NaN (in its checkpoint's loss_history,
    or as the nulls of its metrics.jsonl) is no error: it writes its figure and tables and says that
    the curve is all non-finite. (A network's lone total was dropped as a duplicate, leaving no
    panel, and dividing the panels into rows raised ZeroDivisionError.)"""
    folder = tmp_path / "runs" / "run_1"
    folder.mkdir(parents=True)
    torch.save({"model_state_dict": {}, "epoch": 1, "step": 3, "loss_history": {"generator": {"total": [NAN] * 3}}},
               folder / "model_epoch1_20260101-000000.pth")
    if source == "metrics":
        (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": step, "generator/total": None}) + "\n"
                                                      for step in (1, 2, 3)))
    evaluate_training.main(["-te", str(SRC / TRAIN_EVAL_CFG), "--set", f"saving.save_folder_name={tmp_path / 'runs'}"])
    out = capsys.readouterr().out
    assert "generator/total: all 3 values are non-finite (NaN or infinite); no curve is drawn" in out, out
    assert (folder / "training_losses.png").is_file() and "non-finite" in (folder / "training_summary.md").read_text()


def test_histories_no_run_writes_are_refused_or_drawn_as_far_as_they_can_be(tmp_path, capsys):
    """Found fuzzing evaluate_training.py: a checkpoint history of another shape than the trainer
    writes (a network's values as a bare list, validation values without their steps) is refused
    naming its key; a metrics.jsonl row whose step or value no run logs (a step beyond numpy's
    integers; an integer beyond any float, or a float beyond float32's range, which matplotlib
    cannot scale an axis to) is left out or drawn as infinite, and said."""
    for key, history in (("loss_history", {"generator": [1.0, 2.0]}),
                         ("validation_history", {"generator": {"total": [1.0]}}),
                         ("validation_history", {"step": ["a"], "generator": {"total": [1.0]}})):
        with pytest.raises(UserError, match=f"x.pth: {key}: "):
            runs.check_checkpoint({"model_state_dict": {}, key: history}, "x.pth")
    folder = tmp_path / "runs" / "run_1"
    folder.mkdir(parents=True)
    rows = [{"step": 1, "generator/g": 10 ** 400}, {"step": 2, "generator/g": -1e308}, {"step": 3, "generator/g": 1.0},
            {"step": 10 ** 20, "generator/g": 2.0}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    evaluate_training.main(["-te", str(SRC / TRAIN_EVAL_CFG), "--set", f"saving.save_folder_name={tmp_path / 'runs'}"])
    assert "generator/g: 2 of 3 values are non-finite" in capsys.readouterr().out
    assert (folder / "training_losses.png").is_file()


def test_a_checkpoint_search_through_a_folder_it_cannot_list_names_the_path_and_the_key(tmp_path, monkeypatch):
    """Every search of runs and checkpoints that meets a folder it cannot list (no read permission:
    tests run as root, so Path.iterdir is made to say so; a file where a folder should be, as
    os.scandir says it) is a UserError naming the path and the key, not an OSError."""
    root = tmp_path / "runs"
    (root / "run_1").mkdir(parents=True)
    (root / "run_1" / "model_epoch1_20260101-000000.pth").write_bytes(b"")
    cfg = config.load_training_config(SRC / TRAIN_CFG, [f"saving.save_folder_name={root}"])
    te = {"model_checkpoint_filename": None, "runs": "latest"}
    lists_run_1 = {  # the searches that list run_1's checkpoints
        "latest": lambda: runs.find_checkpoint(cfg, "latest", "model.model_checkpoint_filename"),
        "run folder": lambda: runs.find_checkpoint(cfg, "run_1", "model.model_checkpoint_filename"),
        "newest": lambda: runs.newest_checkpoint(cfg),
        "gather_runs": lambda: evaluate_training.gather_runs([cfg], te, "training_evaluation"),
    }
    lists_root = {**lists_run_1, "best": lambda: runs.find_checkpoint(cfg, "best", "model.model_checkpoint_filename"),
                  "select_runs": lambda: runs.select_runs(cfg, "all", "training_evaluation.runs")}
    iterdir, scandir = pathlib.Path.iterdir, runs.os.scandir
    for fails, denied, searches in (
            (root, PermissionError(errno.EACCES, "Permission denied", str(root)), lists_root),
            (root / "run_1", NotADirectoryError(errno.ENOTDIR, "Not a directory", str(root / "run_1")), lists_run_1)):
        def refuse(path, real, fails=fails, denied=denied):
            if pathlib.Path(path) == fails:
                raise denied
            return real(path)
        monkeypatch.setattr(pathlib.Path, "iterdir", lambda self, refuse=refuse: refuse(self, iterdir))
        monkeypatch.setattr(runs.os, "scandir", lambda path=".", refuse=refuse: refuse(path, scandir))
        for name, search in searches.items():
            with pytest.raises(UserError) as e:
                search()
            assert str(fails) in str(e.value) and denied.strerror in str(e.value), (name, str(e.value))
            assert "saving.save_folder_name" in str(e.value) or "model_checkpoint_filename" in str(e.value) \
                or "training_evaluation.runs" in str(e.value), (name, str(e.value))


def test_an_echoed_value_is_cut_saying_how_much_was_left_out():
    """errors.shown echoes a value's repr up to 100 characters and counts the rest, without writing
    it out: a 10-level alias bomb (a repr of 50 GB) takes no time."""
    def repr_length(levels):  # of alias_bomb(levels): a list of 9 'xxxxxxxx', then lists of 9 of the one before
        lengths = [2 + 9 * 10 + 8 * 2]
        for _ in range(1, levels):
            lengths.append(2 + 9 * lengths[-1] + 8 * 2)
        return 2 + sum(lengths) + 2 * (levels - 1)

    small = yaml.safe_load(alias_bomb(3))
    assert repr_length(3) == len(repr(small))
    assert errors.shown(small) == repr(small)[:100] + f"... ({len(repr(small)) - 100:,} characters left out)"
    huge = errors.shown(yaml.safe_load(alias_bomb(10)))
    assert huge == repr(small)[:100] + f"... ({repr_length(10) - 100:,} characters left out)"
    assert errors.shown("short") == "'short'" and errors.shown([1, (2,), {"a": None}]) == "[1, (2,), {'a': None}]"


def test_yaml_aliases_within_reason_still_load():
    """Only aliases that write out past a million values (or into themselves) are refused."""
    tree = config.parse_yaml("a: &x {b: [1, 2]}\nc: *x\nd: [*x, *x]\n", "x.yaml")
    # values: the 3 top entries, x (its entry b and b's 2) once under a and c, d's 2 entries and x twice
    assert tree["d"] == [{"b": [1, 2]}] * 2 and config.expanded_size(tree) == (3 + 3 + 3 + 2 + 2 * 3, 4)


def test_run_main_cuts_the_middle_out_of_a_message_too_long(capsys):
    def main(argv):
        raise UserError("start " + "x" * 10_000 + " end")

    with pytest.raises(SystemExit) as e:
        errors.run_main(main, [])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: start ") and err.rstrip().endswith(" end")
    assert len(err) < errors.MESSAGE_LIMIT + 100 and "characters left out" in err


@pytest.mark.parametrize("name", ["submodels", "discriminate", "summary", "sources", "keys_net"])
def test_names_of_pynet_attributes_still_name_components_and_submodels(tmp_path, name):
    """Only what torch.nn.ModuleDict holds as an attribute is refused: the flow and PyNet reach
    components and submodels by key, so their own attribute names work."""
    arch = yaml.safe_load((SRC / ARCH_YAML).read_text())
    component_named(name)(arch)
    renamed("disc_cnn", name)(arch)
    arch["model_components"][name]["submodels"] = [name]
    path = tmp_path / "arch.yaml"
    path.write_text(yaml.safe_dump(arch, sort_keys=False))
    model = model_base.PyNet(path)
    assert isinstance(model.model_components[name][name], model_base.Submodel)

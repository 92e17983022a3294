"""Runs are never lost: each from-scratch run gets a folder of its own, a resume continues in its
checkpoint's run, `latest` and checkpoint names find their run, metrics.jsonl is strict JSON, and
each start is recorded (run.json). In-process on run folders made in tmp_path; the end-to-end runs
of train.py (slow) check the same through the real script.
"""
import json
import math

import pytest
import torch

from conftest import CHECKPOINTS, TRAIN_CFG, newest_run, run, run_folder_of
from engine import runs
from engine.errors import UserError
from test_cli import sets, train_args


def fake_cfg(tmp_path, name="exp"):
    """The keys runs.py reads of a training config, with the model folder in tmp_path."""
    flow = tmp_path / "models" / "m" / "m.py"
    flow.parent.mkdir(parents=True, exist_ok=True)
    return {"model": {"model_flow_path": str(flow)}, "config_path": "cfg.yaml",
            "saving": {"save_folder_name": name, "save_filename_prefix": "m", "keep_last": None}}


def save_folder(cfg):
    return runs.checkpoint_dir(cfg)


def checkpoint(folder, epoch, stamp="20261202-100000"):
    """An empty file named as a checkpoint of `folder` (the finders read names only)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"m_epoch{epoch}_{stamp}.pth"
    path.write_bytes(b"")
    return path


def strict_loads(line):
    def refuse(constant):
        raise ValueError(f"non-JSON constant {constant}")
    return json.loads(line, parse_constant=refuse)


# ---- run folders ----------------------------------------------------------------------------------
def test_each_new_run_claims_the_next_free_folder(tmp_path):
    cfg = fake_cfg(tmp_path)
    first, second = runs.Run.new(cfg), runs.Run.new(cfg)
    assert first.folder is None  # nothing is made before the run starts
    assert not save_folder(cfg).exists()
    assert first.claim().name == "run_1" and second.claim().name == "run_2"
    (save_folder(cfg) / "run_7").mkdir()  # numbering goes on past the highest, gaps and all
    assert runs.Run.new(cfg).claim().name == "run_8"
    assert second.results.parts[-3:] == ("m", "exp", "run_2")  # results/<model>/<save_folder_name>/<run>


def test_run_folders_are_numbered_oldest_first_and_legacy_files_count_as_the_oldest(tmp_path):
    cfg = fake_cfg(tmp_path)
    root = save_folder(cfg)
    for n in (10, 2, 1):
        (root / f"run_{n}").mkdir(parents=True)
    (root / "notes").mkdir()
    assert [p.name for p in runs.run_folders(cfg)] == ["run_1", "run_2", "run_10"]
    checkpoint(root, 3)  # written before run folders existed
    assert runs.run_folders(cfg)[0] == root


def test_latest_is_the_newest_checkpoint_of_the_newest_run(tmp_path):
    cfg = fake_cfg(tmp_path)
    root = save_folder(cfg)
    checkpoint(root / "run_1", 5, "20261202-120000")  # a newer stamp, in an older run
    checkpoint(root / "run_2", 0, "20261202-100000")
    newest = checkpoint(root / "run_2", 1, "20261202-110000")
    assert runs.find_checkpoint(cfg, "latest", "where") == newest
    (root / "run_3").mkdir()  # started, no checkpoint yet
    assert runs.find_checkpoint(cfg, "latest", "where") == newest


def test_checkpoint_names_run_folders_and_paths_are_found(tmp_path):
    cfg = fake_cfg(tmp_path)
    root = save_folder(cfg)
    one = checkpoint(root / "run_1", 1)
    two = checkpoint(root / "run_2", 2)
    assert runs.find_checkpoint(cfg, one.name, "where") == one  # a file name, in whichever run holds it
    assert runs.find_checkpoint(cfg, "run_2", "where") == two  # a run folder: its newest
    assert runs.find_checkpoint(cfg, "run_1/" + one.name, "where") == root / "run_1" / one.name
    assert runs.find_checkpoint(cfg, str(two), "where") == two  # a path
    assert runs.find_checkpoint(cfg, None, "where") is None


def test_ambiguous_and_unknown_checkpoints_are_user_errors(tmp_path):
    cfg = fake_cfg(tmp_path)
    root = save_folder(cfg)
    a, _ = checkpoint(root / "run_1", 1), checkpoint(root / "run_2", 1)
    with pytest.raises(UserError, match=r"where: .*several runs: run_1, run_2.*<run>/"):
        runs.find_checkpoint(cfg, a.name, "where")
    with pytest.raises(UserError, match=r"did you mean 'run_2'"):
        runs.find_checkpoint(cfg, "run_22", "where")
    (root / "run_3").mkdir()
    with pytest.raises(UserError, match=r"run_3.*holds no checkpoint"):
        runs.find_checkpoint(cfg, "run_3", "where")
    with pytest.raises(UserError, match=r"'latest' but there is no checkpoint"):
        runs.find_checkpoint(fake_cfg(tmp_path, "other"), "latest", "where")


def test_select_runs_by_all_latest_name_glob_and_list(tmp_path):
    cfg = fake_cfg(tmp_path)
    root = save_folder(cfg)
    for n in (1, 2, 3, 11):
        (root / f"run_{n}").mkdir(parents=True)

    def names(spec):
        return [p.name for p in runs.select_runs(cfg, spec, "te: training_evaluation.runs")]

    assert names("all") == ["run_1", "run_2", "run_3", "run_11"]
    assert names("latest") == ["run_11"]
    assert names("run_1*") == ["run_1", "run_11"]
    assert names(["run_3", "run_1", "run_3"]) == ["run_3", "run_1"]
    with pytest.raises(UserError, match=r"te: training_evaluation.runs: 'run_9' picks no run.*run_1, run_2"):
        names("run_9")


def test_results_follow_the_run_folder(tmp_path):
    cfg = fake_cfg(tmp_path)
    folder = save_folder(cfg) / "run_4"
    assert runs.results_of(cfg, folder) == runs.REPO_ROOT / "results" / "m" / "exp" / "run_4"
    assert runs.results_of(cfg, tmp_path / "elsewhere").parts[-3:] == ("m", "exp", "elsewhere")


# ---- metrics.jsonl and run.json -------------------------------------------------------------------
def test_metrics_are_strict_json_with_nonfinite_values_as_null(tmp_path):
    run_ = runs.Run.of(fake_cfg(tmp_path), tmp_path / "run_1")
    run_.start({"saving": {}, "logging": {}}, 0, {"world_size": 1}, tensorboard=False)
    run_.log([{"epoch": 1, "step": 1, "generator/total": math.nan, "generator/l1": math.inf, "generator/lr": 1e30},
              {"epoch": 1, "step": 2, "generator/total": 0.5, "generator/l1": 0.5, "generator/lr": 1e30}])
    run_.close()
    lines = (tmp_path / "run_1" / "metrics.jsonl").read_text().splitlines()
    rows = [strict_loads(line) for line in lines]
    assert rows[0]["generator/total"] is None and rows[0]["generator/l1"] is None
    assert rows[0]["nonfinite"] == ["generator/total", "generator/l1"]
    assert rows[1]["generator/total"] == 0.5 and "nonfinite" not in rows[1]


def test_resume_drops_rows_past_the_checkpoint_and_appends(tmp_path):
    folder = tmp_path / "run_1"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"epoch": 1, "step": s}) + "\n" for s in (1, 2, 3))
                                          + '{"epoch": 1, "st')  # a line a kill cut short
    run_ = runs.Run.of(fake_cfg(tmp_path), folder)
    run_.start({"saving": {}, "logging": {}}, 2, {}, tensorboard=False)
    run_.log([{"epoch": 1, "step": 3}])
    run_.close()
    assert [r["step"] for r in runs.read_metrics(folder / "metrics.jsonl")] == [1, 2, 3]


def test_each_start_is_recorded_with_command_versions_and_git(tmp_path):
    folder = tmp_path / "run_1"
    for step in (0, 8):
        run_ = runs.Run.of(fake_cfg(tmp_path), folder)
        run_.start({"saving": {}, "logging": {}}, step, {"world_size": 1, "resumed_at_step": step}, tensorboard=False)
        run_.close()
    starts = json.loads((folder / "run.json").read_text())["starts"]
    assert [s["resumed_at_step"] for s in starts] == [0, 8]
    first = starts[0]
    assert first["torch"] == torch.__version__ and first["python"] and first["command"]
    assert first["git"] is None or set(first["git"]) == {"commit", "dirty"}
    assert len(list(folder.glob("training_cfg_*.yaml"))) >= 1


def test_git_state_outside_a_checkout_is_none(tmp_path):
    assert runs.git_state(tmp_path) is None


# ---- end to end ---------------------------------------------------------------------------------
def snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_runs(repo):
    """Two from-scratch runs of one config and save_folder_name, one after the other, and the
    first run's files as they were before the second started."""
    args = train_args("rr_twice", "training.n_epochs=1", "logging.tensorboard=false")
    first = run(repo, *args)
    first_folder = run_folder_of(first)
    before = snapshot(first_folder)
    second = run(repo, *args)
    return repo, first_folder, before, run_folder_of(second)


@pytest.mark.slow
def test_a_second_run_leaves_the_first_runs_files_alone(two_runs):
    _, first, before, second = two_runs
    assert first.parent == second.parent and (first.name, second.name) == ("run_1", "run_2")
    assert snapshot(first) == before  # every byte
    assert runs.read_metrics(second / "metrics.jsonl")  # a metrics file of its own
    assert runs.read_metrics(first / "metrics.jsonl") == [json.loads(line) for line in
                                                          before["metrics.jsonl"].decode().splitlines()]


@pytest.mark.slow
def test_latest_resumes_the_newest_run_in_place(two_runs):
    repo, first, before, second = two_runs
    proc = run(repo, *train_args("rr_twice", "training.n_epochs=2", "logging.tensorboard=false",
                                 "model.model_checkpoint_filename=latest"))
    assert run_folder_of(proc) == second
    assert "resuming example_gan_epoch1_" in proc.stdout
    assert snapshot(first) == before
    rows = runs.read_metrics(second / "metrics.jsonl")
    assert [r["epoch"] for r in rows if "generator/total" in r][-1] == 2
    assert len(json.loads((second / "run.json").read_text())["starts"]) == 2


@pytest.mark.slow
def test_a_refused_run_creates_no_folder(repo):
    proc = run(repo, *train_args("rr_refused", "training.optimizer=Adamm"), check=False)
    assert proc.returncode == 2 and "did you mean 'Adam'" in proc.stderr
    assert not (repo / CHECKPOINTS / "rr_refused").exists()


@pytest.mark.slow
def test_a_diverging_run_writes_only_strict_json(repo):
    proc = run(repo, "train.py", "-t", TRAIN_CFG, *sets(
        "saving.save_folder_name=rr_diverge", "training.n_epochs=1", "training.learning_rate=1e30",
        "adversarial.learning_rate=1e30", "training.on_nonfinite_loss=ignore", "logging.tensorboard=false"))
    folder = newest_run(repo / CHECKPOINTS / "rr_diverge")
    assert run_folder_of(proc) == folder
    rows = [strict_loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    flagged = [row for row in rows if row.get("nonfinite")]
    assert flagged, "a learning rate of 1e30 made no non-finite loss"
    assert all(row[key] is None for row in flagged for key in row["nonfinite"])
    assert {"epoch", "step", "time", "samples_per_s", "generator/total", "generator/lr",
            "discriminator/total", "discriminator/lr"} <= set(rows[0])


@pytest.fixture(scope="module")
def two_learning_rates(repo):
    """Two runs of one save_folder_name that differ only in training.learning_rate (set with
    --set: the run folders' config snapshots are their configs), with TensorBoard."""
    logging = ("training.n_epochs=2", "logging.tensorboard=true", "logging.n_images=4")
    first = run(repo, *train_args("rr_lr", *logging))
    second = run(repo, *train_args("rr_lr", *logging, "training.learning_rate=0.0005"))
    return repo, run_folder_of(first), run_folder_of(second)


@pytest.mark.slow
def test_without_tensorboard_the_sample_grids_are_pngs(two_runs):
    _, first, _, _ = two_runs  # logging.tensorboard: false, 1 epoch
    assert not list(first.glob("events.out.tfevents.*"))
    assert [p.name for p in first.glob("samples_epoch*.png")] == ["samples_epoch1.png"]


@pytest.mark.slow
def test_tensorboard_holds_every_loss_term_an_image_and_the_hparams(two_learning_rates):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, folder = two_learning_rates
    [events] = folder.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    rows = runs.read_metrics(folder / "metrics.jsonl")
    logged = {key for row in rows for key, value in row.items()
              if isinstance(value, float) and key not in ("time", "data_wait", "samples_per_s")}
    assert {"generator/g_adv", "discriminator/d_real", "discriminator/d_fake", "generator/lr"} <= logged
    assert logged <= set(acc.Tags()["scalars"])
    # one point per write of metrics.jsonl (log_interval 10 steps, and an epoch's last ones): the
    # mean of those steps, on the last of them
    steps = [r for r in rows if "generator/g_adv" in r]
    writes = [chunk for epoch in (1, 2) for rows_of in [[r for r in steps if r["epoch"] == epoch]]
              for chunk in (rows_of[i:i + 10] for i in range(0, len(rows_of), 10))]
    g_adv = acc.Scalars("generator/g_adv")
    assert [e.step for e in g_adv] == [chunk[-1]["step"] for chunk in writes] == [10, 16, 26, 32]
    assert [e.value for e in g_adv] == pytest.approx([sum(r["generator/g_adv"] for r in chunk) / len(chunk)
                                                      for chunk in writes])
    assert [e.step for e in acc.Images("samples")] == [16, 32]  # epoch ends
    hparams = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    start = hparams["_hparams_/session_start_info"]
    assert b"training.learning_rate" in start and b"saving.save_folder_name" in start


@pytest.mark.slow
def test_comparing_two_runs_names_the_one_key_that_differs(two_learning_rates):
    repo, first, second = two_learning_rates
    proc = run(repo, "evaluate_training.py", "-te", "configs/example_model/example_training_evaluation_cfg.yaml",
               *sets("training_evaluation.runs=all", "saving.save_folder_name=rr_lr"))
    out = repo / "results/example_model/rr_lr"
    rows = {line.split(",")[0]: line.split(",")[1:]
            for line in (out / "compare_run_1_run_2.csv").read_text().splitlines()}
    assert rows[""] == ["run_1", "run_2"]
    assert [name for name in rows if name.startswith("config: ")] == ["config: training.learning_rate"]
    assert rows["config: training.learning_rate"] == ["0.001", "0.0005"]
    assert rows["steps"] == ["32", "32"]
    assert "| config: training.learning_rate | 0.001 | 0.0005 |" in (out / "compare_run_1_run_2.md").read_text()
    assert (out / "compare_run_1_run_2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "compare_run_1_run_2.png" in proc.stdout

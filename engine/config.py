"""Run configs: load YAML, apply `--set` overrides, fill defaults, validate everything at once.

Every key a config may hold is declared once below with its default and its rule. Validation
collects every problem in the file and reports them together (file, key path, what is valid),
then hands back a plain nested dict with every default filled in; nothing past this module
checks a config again.

Paths inside configs are relative to the repository root (the folder holding this file), so
commands work the same from any directory.
"""
import argparse
import collections
import inspect
import math
import operator
import os
import re
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from engine.errors import UserError, did_you_mean, shown
from engine.registry import (
    SAMPLE_METRICS,
    batch_transforms,
    dataset_functions,
    loss_functions,
    optimizers,
    result_keys,
    schedulers,
    unknown_name,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUIRED = object()


class Key:
    """One config key: its default, accepted types, an optional extra rule and what it does."""

    def __init__(self, default, *types, check=None, doc=""):
        self.default, self.types, self.check, self.doc = default, types, check, doc


# ---- rules -------------------------------------------------------------------------------------
# A rule takes a value of the key's type and returns None or what is wrong with it. Its `text`
# says what it accepts, for docs/config.md; validation only calls it.
def described(text):
    """Decorator: attach `text`, the rule's description in docs/config.md, to a rule."""
    def describe(check):
        check.text = text
        return check
    return describe


def at_least(low):
    @described(f">= {low}")
    def check(v):
        return None if v >= low else f"must be >= {low}"
    return check


def greater_than(low):
    @described(f"> {low}")
    def check(v):
        return None if v > low else f"must be > {low}"
    return check


def between(low, high, brackets, hint=""):
    """low < v <= high and its kin: `brackets` is the interval's notation, '(]', '[]', '[)' or '()';
    `hint` is added to the message (an example of a good value)."""
    interval = f"{brackets[0]}{low}, {high}{brackets[1]}"
    above = {"(": operator.gt, "[": operator.ge}[brackets[0]]
    below = {")": operator.lt, "]": operator.le}[brackets[1]]

    @described(f"in {interval}")
    def check(v):
        return None if above(v, low) and below(v, high) else f"must be in {interval}{hint}"
    return check


def one_of(*choices):
    @described(f"one of: {', '.join(choices)}")
    def check(v):
        return None if v in choices else f"must be one of {', '.join(choices)}{did_you_mean(v, choices)}"
    return check


@described("an existing path")
def existing_path(v):
    try:
        return None if resolve_path(v).exists() else f"path does not exist: {resolve_path(v)}"
    except OSError as e:  # (a name too long for the file system, say)
        return f"cannot be looked up: {e.strerror or e}"


# Room a checkpoint's file name needs beyond its prefix, so that the whole name fits the file
# systems' 255 bytes: "_epoch123456_et_20261203-120430.pth" (35), and while it is written
# files.atomic_write's temporary ".<name>.<8 random>.tmp" (14 more); with a margin.
NAME_MAX = 255
NAME_ROOM = 56


@described("a file name (no /)")
def file_name(v):
    if not v or "/" in v or v in (".", "..") or "\0" in v:
        return "must be a file name: not empty, no /"
    if len(v.encode()) > NAME_MAX - NAME_ROOM:
        return f"is {len(v.encode())} bytes long; at most {NAME_MAX - NAME_ROOM} (file systems allow {NAME_MAX} a name)"
    return None


@described("a folder path")
def folder_name(v):
    parts = [part for part in v.split("/") if part]
    if not parts or "\0" in v:
        return "must name a folder"
    longest = max(parts, key=lambda part: len(part.encode()))
    if len(longest.encode()) > NAME_MAX:
        return f"the name {longest[:40]}... is {len(longest.encode())} bytes long; file systems allow {NAME_MAX}"
    return None


@described("an existing path, or a list of them")
def existing_paths(v):
    """One path or a list of them, every one existing."""
    for path in v if isinstance(v, list) else [v]:
        problem = existing_path(path) if isinstance(path, str) else f"{shown(path)} is not a path"
        if problem:
            return problem
    return None


@described("a Python file")
def python_file(v):
    path = resolve_path(v)
    try:
        if not path.is_file() or path.suffix != ".py":
            state = "missing" if not path.exists() else "not one"
            return f"expected a Python file (models/<model>/<model>.py), {path} is {state}"
    except OSError as e:
        return f"cannot be looked up: {e.strerror or e}"
    return None


def name_in(table_fn, what, text=None):
    """The value names an entry of the registry table `table_fn()`; `what` says what kind of
    name it is, in the message (and, with an article, in the docs unless `text` is given)."""
    @described(text or f"{'an' if what[0] in 'aeiou' else 'a'} {what}")
    def check(v):
        return None if v in table_fn() else unknown_name(v, table_fn(), what)
    return check


def function_names(table_fn, what):
    """One name of the registry table `table_fn()`, or a list of them."""
    one = name_in(table_fn, what)

    @described(f"{one.text}, or a list of them")
    def check(v):
        for name in v if isinstance(v, list) else [v]:
            problem = one(name) if isinstance(name, str) else f"{shown(name)} is not a name"
            if problem:
                return problem
        return None
    return check


@described("[low, high]: two finite numbers, low < high")
def value_range(v):
    if len(v) != 2 or not all(is_number(x) and math.isfinite(x) for x in v):
        return "must be [low, high], two finite numbers, e.g. [-1, 1] or [0, 255]"
    return None if v[0] < v[1] else "low must be below high, e.g. [-1, 1]"


@described("names")
def texts(v):
    bad = [x for x in v if not isinstance(x, str)]
    return f"{shown(bad[0])} is not a name; give each as text" if bad else None


@described("GPU ids (integers >= 0), or auto")
def gpu_list(v):
    if v == "auto":
        return None
    if isinstance(v, str):
        return f"must be auto or a list of GPU ids (e.g. [0]){did_you_mean(v, ['auto'])}"
    if not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in v):
        return "must be a list of GPU ids (non-negative integers), [] for CPU, or auto"
    return None


@described("a list of: " + ", ".join(SAMPLE_METRICS))
def metric_names(v):
    for name in v:
        if name not in SAMPLE_METRICS:
            return (f"{shown(name)} is not a sample metric{did_you_mean(name, SAMPLE_METRICS)}; valid: "
                    f"{', '.join(SAMPLE_METRICS)}")
    if len(set(v)) != len(v):
        return "names a metric twice"
    return None


@described("inception, pixels or checkpoint:&lt;path&gt;")
def feature_extractor(v):
    if v in ("inception", "pixels"):
        return None
    if v.startswith("checkpoint:"):
        return existing_path(v.removeprefix("checkpoint:")) if v != "checkpoint:" else "checkpoint: needs a path"
    return f"must be inception, pixels or checkpoint:<path>{did_you_mean(v, ['inception', 'pixels'])}"


LOSS_TRAINER_ARGS = {"discriminator": "is passed by the trainer (the model's discriminate), not the config"}


# ---- schemas -----------------------------------------------------------------------------------
BATCH_TRANSFORM_WHAT = "function in dataset_functions.py or torchvision.transforms.v2 class"
BATCH_TRANSFORM_TEXT = "a function in dataset_functions.py or a torchvision.transforms.v2 class"
DATASET_FUNCTION = "function in dataset_functions.py"
SEED_RANGE = between(0, 2**32 - 1, "[]")

# The feature extractor of the sample metrics (evaluation, and the training config's sample_metrics).
FEATURE_KEYS = {
    "feature_extractor": Key("inception", str, check=feature_extractor,
                             doc="the features FID, KID and precision/recall compare: inception (Inception v3's, "
                                 "comparable with papers; needs torch-fidelity), pixels (the flattened samples, for "
                                 "tiny images; not comparable with published numbers) or checkpoint:<path> (a "
                                 "network trained with this pipeline, e.g. a classifier of the domain)"),
    "inception_weights": Key(None, str, check=existing_path,
                             doc="a local copy of the Inception weights (null: downloaded once into torch.hub's "
                                 "cache)"),
    "feature_layer": Key(None, str, doc="with checkpoint:<path>: the layer (its name in that architecture) whose "
                                        "input is the feature vector; null: the last layer's"),
}

# One entry of dataset.batch_transforms.
BATCH_TRANSFORM = {
    "transform": Key(REQUIRED, str, check=name_in(batch_transforms, BATCH_TRANSFORM_WHAT, BATCH_TRANSFORM_TEXT),
                     doc="the transform: a dataset_functions.py function fn(batch, generator, **args), run on the "
                         "whole batch, or a torchvision.transforms.v2 class, built from args and run sample by sample"),
    "args": Key({}, dict, doc="its arguments, checked against its signature"),
    "streams": Key(REQUIRED, list, doc="the streams it transforms, all with the same random draws"),
    "in_evaluation": Key(False, bool, doc="also in validation and evaluate.py (a transform that defines the task, "
                                          "e.g. the noise a denoiser removes), not only in training"),
}

STREAM = {
    "n_inputs": Key(None, int, check=at_least(1),
                    doc="samples to use (null: all); required for data_read_type function, which makes this many"),
    "randomize_inputs": Key(False, bool, doc="pick the n_inputs samples at random (drawn from dataset.split_seed, so "
                                             "streams of equal length keep the same ones), not the first ones"),
    "data_read_type": Key(REQUIRED, str, check=one_of("file", "folder", "function", "h5", "class_labels"),
                          doc="how the stream is read: one file through file_reader, every file of a folder through "
                              "file_reader (in name order), made by data_generating_function, an HDF5 dataset, or "
                              "the class index of each sample of a class_folders stream (labels_of)"),
    "data_path": Key(None, str, check=existing_path, doc="file or folder to read (required for file, folder and h5)"),
    "class_folders": Key(False, bool, doc="folder streams: data_path holds one sub-folder per class, "
                                          "<data_path>/<class>/<file> (as torchvision's ImageFolder); classes in "
                                          "sorted folder-name order, files directly in data_path ignored"),
    "labels_of": Key(None, str, doc="with data_read_type class_labels: the class_folders stream whose samples' class "
                                    "indices (int64) this stream holds, sample for sample"),
    "file_reader": Key(None, str, check=name_in(dataset_functions, DATASET_FUNCTION),
                       doc="reads one file: fn(path, **file_reader_args) (required for file and folder)"),
    "file_reader_args": Key({}, dict, doc="the file reader's arguments, e.g. {dtype: float32}"),
    "data_generating_function": Key(None, str, check=name_in(dataset_functions, DATASET_FUNCTION),
                                    doc="makes the samples: fn(n_samples, generator, **args) (required for function)"),
    "data_generating_function_args": Key({}, dict, doc="the generating function's other arguments"),
    "data_read_postprocessing_fn": Key(None, str, list, check=function_names(dataset_functions, DATASET_FUNCTION),
                                       doc="transforms the whole stream once, after n_inputs: fn(data, **args), or a "
                                           "list of them applied in order, e.g. [to_images, scale_to_symmetric] "
                                           "(not with in_memory: false)"),
    "data_read_postprocessing_fn_args": Key({}, dict, list, doc="the postprocessing function's other arguments; for "
                                                                 "a list of functions, a list of one mapping each"),
    "data_batch_transform": Key(None, str, check=name_in(batch_transforms, BATCH_TRANSFORM_WHAT, BATCH_TRANSFORM_TEXT),
                                doc="applied to this stream's training batches only, before dataset.batch_transforms"),
    "data_batch_transform_args": Key({}, dict, doc="the batch transform's arguments"),
    "multiple_samples_per_file": Key(False, bool, doc="the reader returns a stack of samples per file"),
    "in_memory": Key(True, bool,
                     doc="false (folder streams): read files as batches are made, for data larger than memory"),
    "h5_key": Key(None, str, doc="dataset name inside the HDF5 file (required for h5; needs h5py)"),
    "value_range": Key(None, list, check=value_range,
                       doc="[low, high]: the range the stream's values are made in, e.g. [-1, 1]; PSNR and SSIM "
                           "measure against it (peak high - low, outputs clamped to it), and pictures and Inception "
                           "show images on it. null: the range its reader, generating or postprocessing function "
                           "declares (dataset_functions.py), else a guess from its values, which evaluate.py says"),
}

TRAINING = {
    "training": {
        "n_epochs": Key(10, int, check=at_least(1), doc="total epochs of the run (a resumed run ends here too)"),
        "max_steps": Key(None, int, check=at_least(1),
                         doc="stop after this many optimizer steps in all (null: after n_epochs), part way through an "
                             "epoch if need be, saving a checkpoint there; a resume with a larger budget goes on from "
                             "it exactly as an unbroken run would"),
        "learning_rate": Key(2e-4, float, check=at_least(0),
                             doc="the generator's (or the only network's) learning rate"),
        "learning_rate_gamma": Key(1.0, float, check=between(0, 1, "(]"),
                                   doc="StepLR: multiply the learning rate by this every learning_rate_step"),
        "learning_rate_step": Key(1, int, check=at_least(1),
                                  doc="StepLR's period, in epochs (in steps with scheduler_interval: step)"),
        "gpus": Key([], list, str, check=gpu_list,
                    doc="GPU ids; [] trains on the CPU; auto: every visible GPU, one per process (under torchrun, "
                        "GPU i for local rank i; without it, the first), the CPU on a machine without one"),
        "num_threads": Key(None, int, check=between(1, 1024, "[]"),
                           doc="CPU threads of torch's operations in each process; null: torch's default, except "
                               "that the processes of a multi-process CPU run share the cores (cores / processes)"),
        "optimizer": Key("Adam", str, check=name_in(optimizers, "optimizer in torch.optim"),
                         doc="the generator's (or the only network's) optimizer class"),
        "optimizer_args": Key({}, dict, doc="extra optimizer arguments, e.g. {betas: [0.5, 0.999]} (lr comes from "
                                            "learning_rate)"),
        "batch_size": Key(32, int, check=at_least(1), doc="samples per step per process"),
        "seed": Key(0, int, check=SEED_RANGE,
                    doc="seeds python, numpy and torch: same config, same machine, same weights"),
        "scheduler": Key("StepLR", str, check=name_in(schedulers, "scheduler in torch.optim.lr_scheduler"),
                         doc="learning-rate schedule (not the ones that take callables or other schedulers, such as "
                             "LambdaLR); StepLR takes learning_rate_step and learning_rate_gamma"),
        "scheduler_args": Key({}, dict, doc="the scheduler's other arguments, e.g. {T_max: 100} for CosineAnnealingLR; "
                                            "a schedule with a total length (OneCycleLR) gets the run's unless given"),
        "scheduler_interval": Key("epoch", str, check=one_of("epoch", "step"),
                                  doc="advance the schedule after every epoch or after every step (ReduceLROnPlateau: "
                                      "epoch only)"),
        "log_interval": Key(10, int, check=at_least(1),
                            doc="steps between progress-bar loss updates and metrics.jsonl writes"),
        "precision": Key("fp32", str, check=one_of("fp32", "bf16", "fp16"),
                         doc="fp32, or mixed precision with torch.amp: bf16, or fp16 with a gradient scaler per "
                             "network"),
        "grad_clip_norm": Key(None, float, check=greater_than(0),
                              doc="clip the generator's gradient norm to this (null: no clipping)"),
        "grad_accumulation_steps": Key(1, int, check=at_least(1),
                                       doc="batches whose gradients each optimizer step sums (both networks)"),
        "compile": Key(False, bool, doc="torch.compile every submodel (checkpoints keep plain state_dict keys)"),
        "compile_args": Key({}, dict,
                            doc="torch.compile's arguments, e.g. {mode: max-autotune} or {backend: aot_eager}"),
        "cuda_graphs": Key(False, bool, doc="record each training step (every network's forward, loss, backward and "
                                            "optimizer step) once as a CUDA graph and replay it: far fewer kernel "
                                            "launches (one GPU, precision fp32 or bf16, no EMA; docs/gpus.md)"),
        "sync_batchnorm": Key(False, bool, doc="under DDP, BatchNorm layers share their batch statistics across "
                                               "processes (torch.nn.SyncBatchNorm; GPUs only)"),
        "channels_last": Key(False, bool,
                             doc="4-d weights and inputs in channels_last memory format (faster convolutions "
                                              "on recent GPUs with mixed precision)"),
        "ema_decay": Key(None, float, check=between(0, 1, "()", ", e.g. 0.999"),
                         doc="keep an exponential moving average of the generator's weights, which evaluate.py "
                             "and jit_trace_model.py then use (null: none)"),
        "on_nonfinite_loss": Key("stop", str, check=one_of("stop", "skip", "ignore"),
                                 doc="a NaN/inf loss: stop training, skip the update, or do not check (saves a sync "
                                     "per update)"),
    },
    "adversarial": {
        "enable_adversarial_training": Key(False, bool, doc="train a generator against a discriminator (the "
                                                            "architecture needs a discriminator component)"),
        "learning_rate": Key(None, float, check=at_least(0), doc="the discriminator's learning rate"),
        "learning_rate_gamma": Key(None, float, check=between(0, 1, "(]"), doc="the discriminator's StepLR factor"),
        "learning_rate_step": Key(None, int, check=at_least(1), doc="the discriminator's StepLR period"),
        "optimizer": Key(None, str, check=name_in(optimizers, "optimizer in torch.optim"),
                         doc="the discriminator's optimizer"),
        "optimizer_args": Key(None, dict, doc="its extra arguments"),
        "scheduler": Key(None, str, check=name_in(schedulers, "scheduler in torch.optim.lr_scheduler"),
                         doc="the discriminator's learning-rate schedule"),
        "scheduler_args": Key(None, dict, doc="its other arguments"),
        "scheduler_interval": Key(None, str, check=one_of("epoch", "step"), doc="when its schedule advances"),
        "train_disc_first": Key(True, bool, doc="per batch, update the discriminator before the generator"),
        # (bounded: 10**6 updates of every batch is a typo that would look like a hang)
        "n_gen_iterations": Key(1, int, check=between(1, 100, "[]"), doc="generator updates per batch"),
        "n_disc_iterations": Key(1, int, check=between(1, 100, "[]"), doc="discriminator updates per batch"),
        "grad_clip_norm": Key(None, float, check=greater_than(0),
                              doc="clip the discriminator's gradient norm to this (null: no clipping; not copied "
                                  "from training)"),
    },
    "model": {
        "architecture_cfg_path": Key(REQUIRED, str, check=existing_path, doc="the architecture YAML"),
        "model_flow_path": Key(REQUIRED, str, check=python_file,
                               doc="the model flow module, models/<model>/<model>.py; its folder is the model's"),
        "model_checkpoint_filename": Key(None, str, doc="checkpoint to resume, in its run's folder: latest (the newest "
                                                        "of the newest run; none yet: a new run), best "
                                                        "(saving.keep_best's), a run folder (run_3: its newest), a "
                                                        "checkpoint file name of one of the runs, or a path; null: a "
                                                        "new run from scratch"),
    },
    "loss": {
        "loss_fn": Key(None, str, check=name_in(loss_functions, "function in loss.py"),
                       doc="the loss, called per network as fn(network, outputs, targets, fake_scores, real_scores, "
                           "**loss_args); null only for a flow that writes its own step (a `losses` method)"),
        "loss_args": Key({}, dict, doc="its keyword-only arguments, checked against its signature; with a flow's own "
                                       "step, the settings of its terms, checked against the flow's `loss_args`"),
    },
    "saving": {
        "save_epoch_increment": Key(1, int, check=at_least(1),
                                    doc="save a checkpoint every this many epochs (and after the last)"),
        "save_filename_prefix": Key("model", str, check=file_name, doc="start of the checkpoint file names"),
        "save_folder_name": Key("run", str, check=folder_name, doc="the folder of this config's runs under "
                                                "models/<model>/model_checkpoints/ and results/<model>/; each "
                                                "from-scratch run gets its own run_<N> inside it"),
        "keep_last": Key(None, int, check=at_least(1), doc="keep only the newest N checkpoints of the run (null: all)"),
        "keep_best": Key(None, str, doc="also keep the run's best checkpoint by this metrics.jsonl key, logged at "
                                        "epoch ends (sample/fid, validation/generator/total, ...; fid, kid, "
                                        "precision, recall for their sample/ keys), as <save_filename_prefix>_best.pth "
                                        "(never deleted by keep_last; `best` names it like `latest`)"),
        "keep_best_mode": Key(None, str, check=one_of("min", "max"),
                              doc="whether lower (min) or higher (max) is better; null: max for precision, recall, "
                                  "accuracy and PSNR, else min"),
    },
    "sample_metrics": {
        "metrics": Key(["fid", "kid"], list, check=metric_names,
                       doc="the sample metrics computed during training, logged as sample/<key> (sample/fid, "
                           "sample/kid_mean, sample/kid_std, sample/precision, sample/recall)"),
        "every_epochs": Key(None, int, check=at_least(1),
                            doc="compute them after every this many epochs, and before the first (rank 0, with the "
                                "generator's EMA weights when kept; null: never)"),
        "n_samples": Key(2000, int, check=at_least(2),
                         doc="generated and real samples compared: the first ones of the validation samples (or of "
                             "the training samples, without training-only transforms); at most that many"),
        **FEATURE_KEYS,
    },
    "logging": {
        "tensorboard": Key(None, bool, doc="write TensorBoard event files into the run's folder (loss terms, learning "
                                           "rates, validation, sample grids, hparams); null: on when the tensorboard "
                                           "package is installed"),
        "image_every": Key(1, int, check=at_least(1),
                           doc="epochs between grids of the generator's outputs on fixed inputs (in TensorBoard, or "
                               "as samples_epoch<N>.png in the run's folder without it)"),
        "n_images": Key(16, int, check=at_least(1), doc="fixed inputs in each grid (at most the dataset's samples)"),
    },
    "dataset": {
        "data_len_key": Key(REQUIRED, str,
                            doc="the stream whose length is the epoch length; shorter streams wrap around"),
        "validation_fraction": Key(0.0, float, check=between(0, 1, "[)"),
                                   doc="share of the samples held out for a validation loss per epoch and for "
                                       "evaluate.py"),
        "split_seed": Key(0, int, check=SEED_RANGE,
                          doc="which samples are held out; apart from training.seed, so runs with different seeds "
                              "share a split"),
        "batch_transforms": Key([], list, doc="transforms applied to several streams alike (paired augmentation); "
                                              "entries: see below"),
        "num_workers": Key(None, int, check=between(0, 256, "[]"),
                           doc="DataLoader worker processes; null: 0 when batches are tensor indexing, else up to 4"),
        "pin_memory": Key(None, bool,
                          doc="page-locked batches for faster copies to the GPU; null: on when training on a GPU"),
        "persistent_workers": Key(None, bool, doc="keep workers between epochs; null: on when there are workers"),
        "on_device": Key(None, bool,
                         doc="keep every stream on the training GPU and cut batches there (shuffling included), "
                             "with no copies per step; needs in-memory streams and no torchvision transforms; null: "
                             "on a GPU, when that is so and the data takes at most a quarter of its free memory"),
    },
}

# One entry of the training config's `networks` section: a network the flow's own step trains
# (docs/training.md, "Write your own step"). The keys of COPIED_TO_NETWORKS take training's value
# when null, as the adversarial section's do.
NETWORK = {
    "components": Key(REQUIRED, list, check=texts, doc="the architecture's model_components this network trains (one "
                                               "optimizer over all of them; two networks may share a component)"),
    "learning_rate": Key(None, float, check=at_least(0), doc="its learning rate"),
    "learning_rate_gamma": Key(None, float, check=between(0, 1, "(]"), doc="its StepLR factor"),
    "learning_rate_step": Key(None, int, check=at_least(1), doc="its StepLR period"),
    "optimizer": Key(None, str, check=name_in(optimizers, "optimizer in torch.optim"), doc="its optimizer class"),
    "optimizer_args": Key(None, dict, doc="the optimizer's extra arguments"),
    "scheduler": Key(None, str, check=name_in(schedulers, "scheduler in torch.optim.lr_scheduler"),
                     doc="its learning-rate schedule"),
    "scheduler_args": Key(None, dict, doc="the schedule's other arguments"),
    "scheduler_interval": Key(None, str, check=one_of("epoch", "step"), doc="when its schedule advances"),
    "precision": Key(None, str, check=one_of("fp32", "bf16", "fp16"), doc="the precision of its loss terms"),
    "grad_clip_norm": Key(None, float, check=greater_than(0), doc="clip its gradient norm to this (null: no clipping; "
                                                                  "not copied from training)"),
    "ema_decay": Key(None, float, check=between(0, 1, "()", ", e.g. 0.999"),
                     doc="keep a moving average of its weights (null: none; not copied from training)"),
    "updates": Key(1, int, check=between(1, 100, "[]"), doc="its updates per step, one after the other"),
    "every": Key(1, int, check=between(1, 10 ** 6, "[]"),
                 doc="update it on every this-many-th step only (steps 0, k, 2k, ... of the run; WGAN-GP's generator "
                     "every 5th)"),
}
COPIED_TO_NETWORKS = ["learning_rate", "learning_rate_gamma", "learning_rate_step", "optimizer", "optimizer_args",
                      "scheduler", "scheduler_args", "scheduler_interval", "precision"]
NETWORK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

EVALUATION = {
    "evaluation": {
        "model_checkpoint_filename": Key("latest", str, doc="checkpoint to evaluate: latest (the newest of the newest "
                                                            "run), best (saving.keep_best's), a run folder (run_3), a "
                                                            "checkpoint file name, or a path"),
        "n_samples": Key(64, int, check=at_least(1),
                         doc="samples run through the model (the grid shows the first grid_nrow x grid_nrow)"),
        "batch_size": Key(64, int, check=at_least(1), doc="samples per forward pass"),
        "gpus": Key([], list, str, check=gpu_list,
                    doc="GPU to evaluate on (the first id); [] evaluates on the CPU; auto: the first GPU if there "
                        "is one"),
        "grid_nrow": Key(8, int, check=at_least(1), doc="images per row of the saved grid"),
        "use_ema": Key(True, bool, doc="evaluate the generator's EMA weights when the checkpoint has them"),
        "data_split": Key(None, str, check=one_of("validation", "training", "all"),
                          doc="the samples to evaluate; null: validation if the run holds samples out, else all"),
        "sample_metrics": Key([], list, check=metric_names,
                              doc="sample metrics of a generator between its n_samples outputs and as many real "
                                  "samples: any of fid, kid, precision_recall (papers use 10000 samples)"),
        **FEATURE_KEYS,
    },
}

TRAINING_EVALUATION = {
    "training_evaluation": {
        "training_cfg_path": Key(REQUIRED, str, list, check=existing_paths,
                                 doc="the run's training config, or a list of them to compare runs"),
        "runs": Key("latest", str, list,
                    doc="the runs of each training config's save_folder_name to compare: latest, all, a run folder "
                        "(run_3), a glob over run folders (run_1*), or a list of them"),
        "model_checkpoint_filename": Key(None, str, list,
                                         doc="null: each run's whole metrics.jsonl; else curves up to these "
                                             "checkpoints of each run: latest, a file name, a glob such as "
                                             "'*_epoch*0_*.pth', a path, or a list of them"),
        "loss_average_window": Key(10, int, check=at_least(1), doc="steps in the moving average"),
    },
}


# ---- loading -----------------------------------------------------------------------------------
def resolve_path(path):
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key, first, second):
        super().__init__(f"the key {shown(key)} is written twice in one mapping, on lines {first} and {second}; "
                         "YAML would keep only the second: delete one")


class StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """PyYAML's safe loader (libyaml's parser when PyYAML has it: a 500-layer architecture parses
    in a tenth of the time), except that a key written twice in one mapping is an error: PyYAML
    would silently keep the last value, so a second `optimizer:` line would win unseen."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise DuplicateKey(key, seen[key], line)
                    seen[key] = line
                except TypeError:  # an unhashable key (a list): the constructor says so below
                    pass
        return super().construct_mapping(node, deep)


SAFE_LOADER = StrictLoader


def read_yaml(path, what="config"):
    """The YAML file at `path` as a dict, or a UserError naming the file and the line."""
    path = Path(path)
    try:
        if not path.is_file():
            raise UserError(f"{path}: {what} file not found")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file; the {what} must be YAML text (UTF-8)") from None
    except OSError as e:  # a name too long, a folder without permission, ...
        raise UserError(f"{str(path)[:200]}: cannot read the {what} file: {e.strerror or e}") from None
    return parse_yaml(text, path, what)


def parse_yaml(text, source, what="config"):
    """YAML text (read from `source`) as a dict, or a UserError naming the source and the line."""
    try:
        data = load_yaml(text, source, "", SAFE_LOADER)
    except yaml.YAMLError as e:
        raise UserError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{source}: the {what} must be a YAML mapping of keys to values")
    return data


def load_yaml(text, source, where, loader):
    """YAML text (a file's, or a --set value's at key path `where`) as values, refused where it
    nests past MAX_DEPTH, its aliases write out past MAX_VALUES values, or a mapping key is not
    text; a YAMLError (the text is no YAML) is the caller's to word."""
    refuse_deep_nesting(text, source)
    value = yaml.load(text, Loader=loader)
    refuse_alias_bombs(value, source)
    refuse_keys_not_names(value, where, source)
    return value


# A config or an architecture nests a few levels and holds hundreds of values. YAML's loader
# recurses once per level (a few thousand levels overflow the C stack), and an alias (*name) repeats
# its anchor's whole value, so that a few hundred bytes can hold billions of values, which every
# walk over the config (its checks, its copies, its messages) would then visit: both are refused.
MAX_DEPTH = 100
MAX_VALUES = 10 ** 6


def refuse_deep_nesting(text, source):
    """A UserError for YAML text nested deeper than MAX_DEPTH, found in its event stream (which the
    parser makes without recursing) before it is loaded."""
    depth = 0
    for event in yaml.parse(text, Loader=SAFE_LOADER):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise UserError(f"{source}: line {event.start_mark.line + 1}: nested more than {MAX_DEPTH} levels "
                                "deep; a config or an architecture needs a few")
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1


def refuse_alias_bombs(tree, source):
    """A UserError for a loaded YAML tree that, with its aliases written out, holds more than
    MAX_VALUES values or nests deeper than MAX_DEPTH, or holds itself."""
    values, depth = expanded_size(tree)
    if values is None:
        raise UserError(f"{source}: an alias (*name) inside the value it names: written out, it would never end")
    if values > MAX_VALUES or depth > MAX_DEPTH:
        raise UserError(f"{source}: its aliases (*name) repeat their anchors' (&name) values into {values:,} values "
                        f"nested {depth:,} deep, written out; a config or an architecture holds far fewer (at most "
                        f"{MAX_VALUES:,} values, {MAX_DEPTH} levels)")


def expanded_size(tree):
    """(values, depth) of `tree` with every alias written out, or (None, None) where it holds
    itself. Worked out without recursing, each list or mapping once (an alias bomb repeats a few
    many times)."""
    known, started, todo = {}, set(), [(tree, False)]
    while todo:
        node, children_done = todo.pop()
        if not isinstance(node, (dict, list)) or id(node) in known:
            continue
        children = [v for v in (node.values() if isinstance(node, dict) else node) if isinstance(v, (dict, list))]
        if not children_done:
            if id(node) in started:  # (started and not done: one of the nodes it lies in)
                return None, None
            started.add(id(node))
            todo.append((node, True))
            todo += [(child, False) for child in children]
            continue
        started.discard(id(node))
        known[id(node)] = (len(node) + sum(known[id(c)][0] for c in children),
                           1 + max((known[id(c)][1] for c in children), default=0))
    return known.get(id(tree), (0, 0))


def refuse_keys_not_names(tree, where, source):
    """A UserError listing every mapping key in `tree` that is not text: YAML reads `1:`, `1.5:`,
    `yes:`, `~:` and `2024-01-01:` as a number, true, null or a date, and every check after this
    one takes keys for names (of sections, streams, arguments, layers)."""
    problems = key_problems(tree, where)
    if problems:
        more = [f"... and {len(problems) - 10} more"] if len(problems) > 10 else []
        raise UserError(f"{source}: {len(problems)} key(s) that YAML reads as other than text:\n  "
                        + "\n  ".join(problems[:10] + more))


def key_problems(tree, where=""):
    """'<key path>: why' of each mapping key in `tree` that is not text, in the order written. Each
    list or mapping is looked at once: one built of YAML aliases may hold the same one many times.
    The arguments a config gives a function (a key ending in _args) are keyword names, but what
    they hold is the function's to read ({class_weights: {0: 2.0}}): not looked into."""
    problems, seen, todo = [], set(), collections.deque([(where, tree, not where.endswith("_args"))])
    while todo:
        path, node, deep = todo.popleft()
        if not isinstance(node, (dict, list)) or id(node) in seen:
            continue
        seen.add(id(node))
        items = node.items() if isinstance(node, dict) else ((f"[{i}]", v) for i, v in enumerate(node))
        for key, value in items:
            name = key if isinstance(key, str) else default_text(key)  # (as YAML writes it: null, true)
            at = f"{path}{name}" if isinstance(node, list) else f"{path}.{name}" if path else name
            if isinstance(node, dict) and not isinstance(key, str):
                problems.append(f"{at}: {key_kind(key)}")
            if deep and isinstance(value, (dict, list)):
                todo.append((at, value, not (isinstance(key, str) and key.endswith("_args"))))
    return problems


def key_kind(key):
    """Why a key that is not text is no name, and how to write the name meant."""
    if key is None:
        return "this key is null (empty, ~ or null), not a name; give it one"
    kind = "true or false (YAML reads yes, no, on, off, true and false so)" if isinstance(key, bool) else \
        "a number" if is_number(key) else f"a {type(key).__name__}"
    example = "'on'" if isinstance(key, bool) else f"'{default_text(key)}'"
    return f"this key is {kind}, not a name; keys are names: write it in quotes ({example}) if it is meant"


def apply_overrides(raw, overrides, source):
    """Apply `--set a.b.c=value` overrides (value parsed as YAML) to the raw config dict; a list
    entry is set by its index, `--set dataset.batch_transforms[1].args.std=0.2`."""
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {shown(item)}: expected KEY.PATH=VALUE, e.g. --set training.n_epochs=3")
        try:
            value = load_yaml(text, f"{source}: --set {key}", key, yaml.SafeLoader)
        except yaml.YAMLError as e:
            raise UserError(f"--set {shown(item)}: value is not valid YAML: {e}") from None
        node, path = raw, override_path(key, source)
        for step, following in zip(path, path[1:]):
            if isinstance(node, dict) and node.get(step) is None and isinstance(following, str):
                node[step] = {}  # a section left out or written as null
            node = child(node, step, key, source)
        if isinstance(path[-1], int):
            child(node, path[-1], key, source)  # the entry must exist
        elif not isinstance(node, dict):
            raise UserError(f"{source}: --set {key}: the part before '{path[-1]}' is not a section")
        node[path[-1]] = value
    return raw


def override_path(key, source):
    """'a.b[1].c' as ['a', 'b', 1, 'c']."""
    path = []
    for part in key.split("."):
        match = re.fullmatch(r"([^\[\]]+)((?:\[\d+\])*)", part)
        if not match:
            raise UserError(f"{source}: --set {key}: '{part}' is not a key name, optionally followed by [index]")
        path += [match[1], *(int(i) for i in re.findall(r"\d+", match[2]))]
    return path


def child(node, step, key, source):
    """node[step] for one step of an override's path, or a user error saying why not."""
    if isinstance(step, int):
        if not isinstance(node, list) or step >= len(node):
            size = f"a list of {len(node)} entr{'y' if len(node) == 1 else 'ies'}" if isinstance(node, list) \
                else "not a list"
            raise UserError(f"{source}: --set {key}: no entry [{step}] ({size})")
    elif not isinstance(node, dict):
        raise UserError(f"{source}: --set {key}: '{step}' is inside something that is not a section")
    elif step not in node:
        raise UserError(f"{source}: --set {key}: the config has no '{step}' to take an entry of")
    return node[step]


def type_ok(value, types):
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return True  # 1 is a fine float; True is not
    if int in types and isinstance(value, bool):
        return False
    return isinstance(value, types)


def type_name(types):
    return " or ".join({int: "an integer", float: "a number", bool: "true/false", str: "a string",
                        list: "a list", dict: "a mapping"}[t] for t in types)


def defaults(schema):
    """The schema's defaults (None for required keys)."""
    return {k: defaults(r) if isinstance(r, dict) else None if r.default is REQUIRED else _copy(r.default)
            for k, r in schema.items()}


def check_section(raw, schema, where, errors, also_valid=()):
    """Validate `raw` against `schema`; return it with defaults filled. Problems go to `errors`.
    `also_valid`: keys the caller checks itself."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{where}: {shown(raw)} is not a mapping of keys; valid keys: {', '.join(schema)}")
        return defaults(schema)
    out = {}
    valid = [*schema, *also_valid]
    for key in raw:
        if key not in valid:
            errors.append(f"{where}.{key}".lstrip(".") + f": unknown key{did_you_mean(key, valid)}; "
                          f"valid: {', '.join(valid)}")
    for key, rule in schema.items():
        path = f"{where}.{key}".lstrip(".")
        value = raw.get(key)
        if isinstance(rule, dict):
            out[key] = check_section(value, rule, path, errors)
            continue
        if float in rule.types and isinstance(value, str):
            value = _as_float(value)  # PyYAML reads 2e-4 (no dot) as a string
        if value is None:
            if rule.default is REQUIRED:
                errors.append(f"{path}: required key is missing")
            out[key] = None if rule.default is REQUIRED else _copy(rule.default)
            continue
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{path}: {value} is not a finite number")
        elif not type_ok(value, rule.types):
            errors.append(f"{path}: {shown(value)} is not {type_name(rule.types)}")
        elif rule.check and (problem := rule.check(value)):
            errors.append(f"{path}: {shown(value)}: {problem}")
        else:
            out[key] = value
            continue
        out[key] = None if rule.default is REQUIRED else _copy(rule.default)  # later checks see a valid value
    return out


def _as_float(text):
    try:
        return float(text)
    except ValueError:
        return text


def _copy(value):
    return type(value)(value) if isinstance(value, (list, dict)) else value


def check_function_args(fn, args, where, errors, passed=0, keyword_only=False, filled=None):
    """Every key of `args` must be a parameter of `fn` other than the first `passed` ones and the
    `filled` ones ({name: what sets it}), which the pipeline fills in itself (and a keyword-only
    one, if asked); every parameter without a default that the pipeline does not fill must be in
    `args`."""
    filled = filled or {}
    params = list(inspect.signature(fn).parameters.values())
    settable = [p for p in params[passed:] if p.name not in filled and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                and (p.kind is p.KEYWORD_ONLY or not keyword_only)]
    valid = [p.name for p in settable]
    for name in args:
        if name in filled:
            errors.append(f"{where}.{name}: {filled[name]}")
        elif name not in valid and not any(p.kind is p.VAR_KEYWORD for p in params):
            errors.append(f"{where}.{name}: not an argument of {fn.__name__} that a config sets"
                          f"{did_you_mean(name, valid)}; valid: {', '.join(valid) or 'none'}")
    for p in settable:
        if p.default is p.empty and p.name not in args:
            errors.append(f"{where}: {fn.__name__} needs {p.name} (no default)")
        elif p.name in args:
            # torch's and torchvision's numbers often take one per group or a (min, max) pair too
            wrong = unlike_default(args[p.name], p.default, getattr(fn, "__module__", "").startswith("torch"))
            if wrong:
                errors.append(f"{where}.{p.name}: {shown(args[p.name])} {wrong}")


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def unlike_default(value, default, pairs=False):
    """Why `value` cannot stand where a function's parameter has `default` (None: it can, or the
    default says nothing): a number for a number, a flag for a flag, text for text, a list of
    numbers for a tuple or list of numbers. An argument of the wrong kind would otherwise fail
    deep inside the function, or at the first step, after a run was started. `pairs`: a list of
    numbers may stand for a number."""
    if default is None or default is inspect.Parameter.empty or value is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "is not true or false"
    if is_number(default):
        if is_number(value) or pairs and isinstance(value, (list, tuple)) and all(map(is_number, value)):
            return None
        hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(value, str) and is_float_text(value) and \
            "." not in value.lower().partition("e")[0] and "e" in value.lower() else \
            " (in quotes, it is text: write it without them)" if isinstance(value, str) and is_float_text(value) else ""
        return f"is not a number, as {default!r} (the default) is{hint}"
    if isinstance(default, str):
        return None if isinstance(value, str) else f"is not text, as {default!r} (the default) is"
    if isinstance(default, (tuple, list)) and default and all(is_number(x) for x in default):
        if not isinstance(value, (list, tuple)) or not all(is_number(x) for x in value):
            return f"is not a list of numbers, as {list(default)} (the default) is"
    return None


def is_float_text(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def check_dataset(raw, where, errors):
    """The dataset section: data_len_key plus one sub-section per named data stream."""
    if raw is not None and not isinstance(raw, dict):
        errors.append(f"{where}: {shown(raw)} is not a mapping of data streams")
        raw = None
    raw = dict(raw or {})
    fixed = {k: raw.pop(k, None) for k in TRAINING["dataset"]}
    out = check_section(fixed, TRAINING["dataset"], where, errors)
    if not raw:
        errors.append(f"{where}: no data streams; add one, e.g. {where}.gen_inputs: {{data_read_type: function, ...}}")
    for name, stream in raw.items():
        path = f"{where}.{name}"
        out[name] = check_section(stream, STREAM, path, errors)
        check_stream(out[name], path, errors)
    check_labels_of({name: out[name] for name in raw}, where, errors)
    if out["data_len_key"] is not None and raw and out["data_len_key"] not in raw:
        errors.append(f"{where}.data_len_key: {shown(out['data_len_key'])} is not a stream"
                      f"{did_you_mean(out['data_len_key'], raw)}; streams: {', '.join(raw)}")
    entries = out["batch_transforms"] if isinstance(out["batch_transforms"], list) else []
    out["batch_transforms"] = [check_batch_transform(entry, f"{where}.batch_transforms[{i}]", list(raw), errors)
                               for i, entry in enumerate(entries)]
    return out


def stream_configs(dataset_cfg):
    """{stream name: its config} of a validated dataset section (without its own keys)."""
    return {k: v for k, v in dataset_cfg.items() if k not in TRAINING["dataset"]}


def check_batch_transform(entry, where, streams, errors):
    out = check_section(entry, BATCH_TRANSFORM, where, errors)
    if out["streams"] == []:
        errors.append(f"{where}.streams: empty; list the streams to transform, e.g. [inputs, targets]")
    for name in out["streams"] if isinstance(out["streams"], list) else []:
        if name not in streams:
            errors.append(f"{where}.streams: {shown(name)} is not a stream{did_you_mean(name, streams)}; "
                          f"streams: {', '.join(streams)}")
    if out["transform"] in batch_transforms() and isinstance(out["args"], dict):
        check_transform_args(out["transform"], out["args"], f"{where}.args", errors)
    return out


def check_transform_args(name, args, where, errors):
    """A dataset_functions transform gets (batch, generator) from the pipeline; a v2 class is
    built from the args alone."""
    fn = batch_transforms()[name]
    check_function_args(fn, args, where, errors, passed=0 if isinstance(fn, type) else 2)


# The functions a stream names, and how many leading arguments the pipeline passes them itself
# (file_reader(path), data_generating_function(n_samples, generator), ...).
STREAM_FUNCTIONS = {"file_reader": 1, "data_generating_function": 2,
                    "data_batch_transform": 2}  # a torchvision class as data_batch_transform: check_transform_args


# The keys each data_read_type needs (function streams also need n_inputs, which reading checks).
READ_TYPE_NEEDS = {"file": ["data_path", "file_reader"], "folder": ["data_path", "file_reader"],
                   "function": ["data_generating_function"], "h5": ["data_path", "h5_key"],
                   "class_labels": ["labels_of"]}


def postprocessing_steps(s):
    """[(function name, its args)] of a stream's data_read_postprocessing_fn, one name or a list
    of them (with data_read_postprocessing_fn_args one mapping, or a list of one per name)."""
    names, args = s["data_read_postprocessing_fn"], s["data_read_postprocessing_fn_args"]
    if names is None:
        return []
    if not isinstance(names, list):
        return [(names, args)]
    return list(zip(names, args if isinstance(args, list) else [args or {}] * len(names)))


def check_postprocessing(s, where, errors):
    names, args = s["data_read_postprocessing_fn"], s["data_read_postprocessing_fn_args"]
    key = f"{where}.data_read_postprocessing_fn_args"
    if isinstance(args, list) and not isinstance(names, list):
        errors.append(f"{key}: a list is for a list of functions; {shown(names)} takes one mapping")
        return
    if isinstance(names, list) and isinstance(args, list) and len(args) != len(names):
        errors.append(f"{key}: {len(args)} mapping(s) for {len(names)} functions; give one per function, in order "
                      "({} for none)")
        return
    if isinstance(names, list) and isinstance(args, dict) and args:
        errors.append(f"{key}: for a list of functions, give a list of one mapping each, e.g. "
                      f"[{', '.join('{}' for _ in names)}]")
        return
    fns = dataset_functions()
    for i, (name, fn_args) in enumerate(postprocessing_steps(s)):
        at = key + (f"[{i}]" if isinstance(names, list) else "")
        if not isinstance(fn_args, dict):
            errors.append(f"{at}: {shown(fn_args)} is not a mapping of {name}'s arguments")
        elif isinstance(name, str) and name in fns:
            check_function_args(fns[name], fn_args, at, errors, passed=1)


def check_class_streams(s, where, errors):
    """class_folders on a folder stream; a class_labels stream takes nothing but labels_of (its
    samples are those of that stream, chosen by its n_inputs)."""
    if s["class_folders"] and s["data_read_type"] != "folder":
        errors.append(f"{where}.class_folders: for data_read_type folder (one sub-folder per class); this stream is "
                      f"{s['data_read_type']}")
    if s["class_folders"] and s["multiple_samples_per_file"]:
        errors.append(f"{where}.class_folders: one sample per file, whose class is its folder's "
                      "(multiple_samples_per_file: false)")
    if s["data_read_type"] != "class_labels":
        if s["labels_of"] is not None:
            errors.append(f"{where}.labels_of: for data_read_type class_labels only")
        return
    for key in ("data_path", "file_reader", "data_generating_function", "data_read_postprocessing_fn", "n_inputs",
                "h5_key"):
        if s[key] is not None:
            errors.append(f"{where}.{key}: a class_labels stream holds the classes of labels_of's samples; set "
                          f"{key} on that stream (n_inputs there picks the samples of both)")
    if s["randomize_inputs"]:
        errors.append(f"{where}.randomize_inputs: set it on labels_of's stream, which picks the samples of both")


def check_labels_of(streams, where, errors):
    """Each class_labels stream's labels_of names a folder stream with class_folders: true."""
    for name, s in streams.items():
        source = s["labels_of"]
        if s["data_read_type"] != "class_labels" or not isinstance(source, str):
            continue
        target = streams.get(source)
        if target is None:
            folders = [n for n, t in streams.items() if t["class_folders"]]
            errors.append(f"{where}.{name}.labels_of: {shown(source)} is not a stream{did_you_mean(source, streams)}; "
                          f"class_folders streams: {', '.join(folders) or 'none'}")
        elif not target["class_folders"]:
            errors.append(f"{where}.{name}.labels_of: {source} is not read from class folders; set "
                          f"{where}.{source}.class_folders: true (data_read_type folder, <data_path>/<class>/<file>)")


def check_stream(s, where, errors):
    kind = s["data_read_type"]
    for key in READ_TYPE_NEEDS.get(kind, []):
        if s[key] is None:
            errors.append(f"{where}.{key}: required when data_read_type is {kind}")
    path = resolve_path(s["data_path"]) if isinstance(s["data_path"], str) else None
    if path is not None and kind == "folder" and path.is_file():
        errors.append(f"{where}.data_path: {path} is a file, but data_read_type folder reads every file in a "
                      "folder; use data_read_type: file")
    if path is not None and kind in ("file", "h5") and path.is_dir():
        errors.append(f"{where}.data_path: {path} is a folder; use data_read_type: folder")
    if s["in_memory"] is False:
        if kind != "folder":
            errors.append(f"{where}.in_memory: false reads a folder's files as batches are made; "
                          f"data_read_type {kind} is read into memory")
        elif s["multiple_samples_per_file"]:
            errors.append(f"{where}.in_memory: false needs one sample per file (multiple_samples_per_file: false)")
        if s["data_read_postprocessing_fn"]:
            errors.append(f"{where}.data_read_postprocessing_fn: transforms the whole stream in memory, which "
                          "in_memory: false does not hold; use an entry of dataset.batch_transforms with "
                          "in_evaluation: true instead")
    check_class_streams(s, where, errors)
    check_postprocessing(s, where, errors)
    fns = dataset_functions()
    for fn_key, passed in STREAM_FUNCTIONS.items():
        args_key = f"{fn_key}_args"
        if isinstance(s[fn_key], str) and s[fn_key] in fns and isinstance(s[args_key], dict):
            check_function_args(fns[s[fn_key]], s[args_key], f"{where}.{args_key}", errors, passed)
    name, args = s["data_batch_transform"], s["data_batch_transform_args"]
    if name in batch_transforms() and name not in fns and isinstance(args, dict):
        check_transform_args(name, args, f"{where}.data_batch_transform_args", errors)


# adversarial keys that copy training's value when null (the discriminator's optimizer and schedule)
COPIED_TO_ADVERSARIAL = ["learning_rate", "learning_rate_gamma", "learning_rate_step", "optimizer", "optimizer_args",
                         "scheduler", "scheduler_args", "scheduler_interval"]


def check_schedule(s, section, errors, copied=()):
    """optimizer_args and scheduler_args of `s`, the section at key path `section`, against their
    classes' signatures. The learning rate, and StepLR's step and gamma, have keys of their own;
    resuming sets last_epoch. A group of keys all `copied` from training's is not checked again."""

    def check(keys, fn, args_key, filled):
        if set(keys) <= set(copied):
            return
        found = []
        check_function_args(fn, s[args_key], f"{section}.{args_key}", found, passed=1, filled=filled)
        note = ", ".join(f"{section}.{k}" for k in keys if k in copied)
        errors.extend(f"{e} ({note}: null, so training's)" if note else e for e in found)

    if s["optimizer"] in optimizers() and isinstance(s["optimizer_args"], dict):
        check(("optimizer", "optimizer_args"), optimizers()[s["optimizer"]], "optimizer_args",
              {"lr": f"comes from {section}.learning_rate"})
    name = s["scheduler"]
    if name in schedulers() and isinstance(s["scheduler_args"], dict):
        filled = {"last_epoch": "is set when resuming, from the checkpoint"}
        if name == "StepLR":
            filled |= {"step_size": f"comes from {section}.learning_rate_step",
                       "gamma": f"comes from {section}.learning_rate_gamma"}
        check(("scheduler", "scheduler_args"), schedulers()[name], "scheduler_args", filled)
    if name == "ReduceLROnPlateau" and s["scheduler_interval"] != "epoch" \
            and not {"scheduler", "scheduler_interval"} <= set(copied):
        errors.append(f"{section}.scheduler_interval: ReduceLROnPlateau follows the epoch's mean loss; use epoch")


def raise_if(errors, source):
    if errors:
        lines = "\n  ".join(errors)
        raise UserError(f"{source}: {len(errors)} problem{'s' * (len(errors) > 1)}:\n  {lines}")


def load_training_config(path, overrides=None):
    """Load, override, validate and fill the training config at `path`; return a plain dict."""
    raw = apply_overrides(read_yaml(path, "training config"), overrides, path)
    errors = []
    schema = {k: v for k, v in TRAINING.items() if k != "dataset"}
    cfg = check_section({k: v for k, v in raw.items() if k not in ("dataset", "networks")}, schema, "", errors,
                        also_valid=["dataset", "networks"])
    cfg["dataset"] = check_dataset(raw.get("dataset"), "dataset", errors)
    cfg["networks"] = check_networks(raw.get("networks"), cfg, errors)
    if cfg["loss"]["loss_fn"] in loss_functions():
        # keyword-only: the rest are the tensors the trainer passes
        check_function_args(loss_functions()[cfg["loss"]["loss_fn"]], cfg["loss"]["loss_args"], "loss.loss_args",
                            errors, keyword_only=True, filled=LOSS_TRAINER_ARGS)
    adv, train = cfg["adversarial"], cfg["training"]
    copied = [key for key in COPIED_TO_ADVERSARIAL if adv[key] is None]
    for key in copied:
        adv[key] = _copy(train[key])
    check_schedule(train, "training", errors)
    if isinstance(train["compile_args"], dict):
        check_function_args(torch.compile, train["compile_args"], "training.compile_args", errors, passed=1)
    if adv["enable_adversarial_training"]:
        check_schedule(adv, "adversarial", errors, copied)
    check_keep_best(cfg, errors)
    raise_if(errors, path)
    cfg["config_path"] = str(path)
    return cfg


def check_networks(raw, cfg, errors):
    """The `networks` section ({} when left out): {name: its settings, in update order}, the keys
    of COPIED_TO_NETWORKS filled from training's where null. With it the flow's own step trains
    these networks, and the adversarial section's generator/discriminator pair is not used."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        errors.append(f"networks: {shown(raw)} is not a mapping of networks, e.g. networks: {{generator: {{components: "
                      "[generator]}, discriminator: {components: [discriminator]}}")
        return {}
    if cfg["adversarial"]["enable_adversarial_training"]:
        errors.append("networks: a flow's own step trains the networks listed here; adversarial."
                      "enable_adversarial_training (the built-in GAN step's pair) must then be false")
    out = {}
    for name, entry in raw.items():
        if not isinstance(name, str) or not NETWORK_NAME.fullmatch(name):
            errors.append(f"networks.{name}: a network's name is a Python identifier (it names metrics.jsonl's "
                          "<network>/<term> keys)")
            continue
        net = out[name] = check_section(entry, NETWORK, f"networks.{name}", errors)
        copied = [key for key in COPIED_TO_NETWORKS if net[key] is None]
        for key in copied:
            net[key] = _copy(cfg["training"][key])
        if net["components"] == []:
            errors.append(f"networks.{name}.components: empty; list the model_components it trains")
        check_schedule(net, f"networks.{name}", errors, copied)
    return out


# keep_best's short names, and the last parts of keys where higher is better
BEST_ALIASES = {"fid": "sample/fid", "kid": "sample/kid_mean", "kid_mean": "sample/kid_mean",
                "precision": "sample/precision", "recall": "sample/recall"}
HIGHER_IS_BETTER = {"precision", "recall", "accuracy", "top5_accuracy", "psnr", "psnr_db", "ssim"}


def keep_best(cfg):
    """(metrics.jsonl key, "min" or "max") that saving.keep_best picks the best checkpoint by, or None."""
    saving = cfg["saving"]
    if saving["keep_best"] is None:
        return None
    key = BEST_ALIASES.get(saving["keep_best"], saving["keep_best"])
    return key, saving["keep_best_mode"] or ("max" if key.rsplit("/", 1)[-1] in HIGHER_IS_BETTER else "min")


def check_keep_best(cfg, errors):
    """saving.keep_best names a key that this run logs at its epochs' ends: sample/<key> of a
    sample metric it computes, or validation/<network>/<term> with samples held out (whose term
    check_step confirms once the loss has run)."""
    if cfg["saving"]["keep_best"] is None:
        return
    key, _ = keep_best(cfg)
    where = f"saving.keep_best: {shown(cfg['saving']['keep_best'])}"
    samples = cfg["sample_metrics"]
    computed = [m for m in samples["metrics"] if m in SAMPLE_METRICS] if samples["every_epochs"] else []
    logged = [f"sample/{k}" for k in result_keys(computed)]
    networks = ["generator", "discriminator"] if cfg["adversarial"]["enable_adversarial_training"] else ["generator"]
    if key.startswith("sample/"):
        if key not in logged:
            errors.append(f"{where}: {key} is not computed; sample_metrics.every_epochs must be set and "
                          f"sample_metrics.metrics must give it (it gives: {', '.join(logged) or 'nothing'})")
    elif key.startswith("validation/"):
        parts = key.split("/")
        if not cfg["dataset"]["validation_fraction"]:
            errors.append(f"{where}: validation losses need held-out samples; set dataset.validation_fraction "
                          "(e.g. 0.1)")
        elif len(parts) != 3 or parts[1] not in networks:
            errors.append(f"{where}: expected validation/<network>/<term> with network "
                          f"{' or '.join(networks)}, e.g. validation/generator/total")
    else:
        examples = logged + [f"validation/{n}/total" for n in networks if cfg["dataset"]["validation_fraction"]]
        none = "none (set sample_metrics.every_epochs or dataset.validation_fraction)"
        errors.append(f"{where}: the best checkpoint is judged at an epoch's end, by a sample/ or validation/ "
                      f"key of metrics.jsonl{did_you_mean(key, examples)}; this run logs: "
                      f"{', '.join(examples) or none}")


def load_config(path, schema, overrides=None, what="config"):
    """Load, override and validate a config with a plain schema (evaluation configs)."""
    raw = apply_overrides(read_yaml(path, what), overrides, path)
    errors = []
    cfg = check_section(raw, schema, "", errors)
    raise_if(errors, path)
    return cfg


def model_dir(cfg):
    """models/<model>/: the folder of the model flow module."""
    return resolve_path(cfg["model"]["model_flow_path"]).parent


def checkpoint_dir(cfg):
    """models/<model>/model_checkpoints/<save_folder_name>/."""
    return model_dir(cfg) / "model_checkpoints" / cfg["saving"]["save_folder_name"]


def results_dir(cfg):
    """results/<model>/<save_folder_name>/."""
    return REPO_ROOT / "results" / model_dir(cfg).name / cfg["saving"]["save_folder_name"]


def to_yaml(cfg):
    """The config as YAML text (for the run's snapshot and for checkpoints)."""
    return yaml.safe_dump({k: v for k, v in cfg.items() if k != "config_path"}, sort_keys=False)


def flat_config(cfg, prefix=""):
    """{"training.learning_rate": 0.0002, ...}: every leaf of a config by its key path."""
    flat = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and value:
            flat |= flat_config(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(old, new):
    """['key.path: old -> new', ...] between two configs (dicts), ignoring where each was loaded
    from and which checkpoint it resumes."""
    a, b = flat_config(old), flat_config(new)
    ignored = {"config_path", "model.model_checkpoint_filename"}
    def show(d, key):
        return "(not set)" if key not in d else "null" if d[key] is None else d[key]

    return [f"{key}: {show(a, key)} -> {show(b, key)}"
            for key in sorted(a.keys() | b.keys()) if key not in ignored and a.get(key) != b.get(key)]


# ---- the reference: docs/config.md -------------------------------------------------------------
DOCS_PATH = REPO_ROOT / "docs" / "config.md"
DOCS_COMMAND = "python -m engine.config --write-docs"
DOCS_INTRO = f"""# Config reference

<!-- Generated from engine/config.py by `{DOCS_COMMAND}`: edit the schemas there, not this file. -->

Every key of every config file, generated from the schemas in `engine/config.py` (each key's `Key(default,
*types, check=..., doc=...)`). To change this file, change `engine/config.py` and regenerate it:

```
{DOCS_COMMAND}
```

(`python -m engine.config` prints it instead; `tests/test_configs.py` fails while the two disagree.)

A key left out or `null` takes its default; a required key has none. An unknown key, a wrong type, a
value its rule refuses, a name that is not defined or a path that does not exist is an error, and every
problem in a file is reported at once. Paths inside configs are relative to the repository root. Any
key can be set from the command line, e.g. `--set training.n_epochs=3` (see the README)."""

TRAINING_TEXT = "`python train.py -t <training config>`; evaluate.py, evaluate_training.py and " \
    "jit_trace_model.py read it too."
ADVERSARIAL_TEXT = "The discriminator's settings. These keys copy training's value when null: " + \
    ", ".join(f"`{key}`" for key in COPIED_TO_ADVERSARIAL) + "."
STREAM_TEXT = "One section per data stream; its key is the stream's name in the batch (e.g. `gen_inputs`). " \
    "What each `data_read_type` needs: " + \
    "; ".join(f"`{kind}`: " + ", ".join(f"`{k}`" for k in keys) for kind, keys in READ_TYPE_NEEDS.items()) + \
    "; a `function` stream also needs `n_inputs`, the number of samples to make."
NETWORKS_TEXT = "Optional: the networks a flow's own step trains (its `losses` method; docs/training.md, " \
    "\"Write your own step\"), one entry per network, updated in the order listed. Left out, the networks are " \
    "the generator (`training.*`) and, in adversarial training, the discriminator (`adversarial.*`). These keys " \
    "copy training's value when null: " + ", ".join(f"`{key}`" for key in COPIED_TO_NETWORKS) + "."
BATCH_TRANSFORM_DOC_TEXT = "Each entry of `dataset.batch_transforms` is one step, run in list order after the " \
    "streams' own `data_batch_transform`s. Training batches get every step; validation and evaluate.py only " \
    "the entries with `in_evaluation: true`."

# (heading, key-path prefix, schema, text) of each table; a heading with no schema starts a config file.
DOC_SECTIONS = [
    ("## Training config", None, None, TRAINING_TEXT),
    *((f"### {name}", name, TRAINING[name], ADVERSARIAL_TEXT if name == "adversarial" else "") for name in TRAINING),
    ("### networks.&lt;name&gt;", "networks.<name>", NETWORK, NETWORKS_TEXT),
    ("### dataset.&lt;stream&gt;", "dataset.<stream>", STREAM, STREAM_TEXT),
    ("### dataset.batch_transforms[i]", "dataset.batch_transforms[i]", BATCH_TRANSFORM, BATCH_TRANSFORM_DOC_TEXT),
    ("## Evaluation config", None, None, "`python evaluate.py -t <training config> -e <evaluation config>`."),
    ("### evaluation", "evaluation", EVALUATION["evaluation"], ""),
    ("## Training-evaluation config", None, None, "`python evaluate_training.py -te <training-evaluation config>`."),
    ("### training_evaluation", "training_evaluation", TRAINING_EVALUATION["training_evaluation"], ""),
]
DOC_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string", list: "list", dict: "mapping"}


def config_reference():
    """docs/config.md: the Markdown reference of every config key, generated from the schemas."""
    parts = [DOCS_INTRO]
    for heading, prefix, schema, text in DOC_SECTIONS:
        parts.append("\n\n".join(p for p in (heading, text, schema and key_table(prefix, schema)) if p))
    return "\n\n".join(parts) + "\n"


def key_table(prefix, schema):
    """A Markdown table of `schema`'s keys, with their paths under `prefix`."""
    rows = ["| key | type | default | rule | description |", "|---|---|---|---|---|"]
    for key, rule in schema.items():
        copied = prefix == "adversarial" and key in COPIED_TO_ADVERSARIAL or \
            prefix == "networks.<name>" and key in COPIED_TO_NETWORKS
        doc = rule.doc + (f" (null: training.{key})" if copied else "")
        default = "**required**" if rule.default is REQUIRED else f"`{default_text(rule.default)}`"
        cells = [f"`{prefix}.{key}`", " or ".join(DOC_TYPES[t] for t in rule.types), default,
                 rule.check.text if rule.check else "", doc]
        rows.append("| " + " | ".join(cells[:3] + [markdown_text(cell) for cell in cells[3:]]) + " |")
    return "\n".join(rows)


def markdown_text(text):
    """`text` in a table cell, as written: no HTML tags (<model>), emphasis (**args) or cell breaks."""
    return text.replace("|", "\\|").replace("*", "\\*").replace("<", "&lt;")


def default_text(value):
    """A default as the YAML that sets it: null, true, [], 0.0002, Adam."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("...\n").strip()


def write_docs(path=DOCS_PATH):
    """Write the reference to `path` atomically (a temp file in the same folder, then os.replace)."""
    text = config_reference()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        temp = Path(f.name)
        try:
            f.write(text)
        except BaseException:
            f.close()
            temp.unlink()
            raise
    temp.chmod(0o644)  # a temp file is private; the docs are not
    os.replace(temp, path)


def main(argv):
    parser = argparse.ArgumentParser(
        description="Print the reference of every config key (Markdown, generated from this module's schemas), "
                    f"or write it to {DOCS_PATH.relative_to(REPO_ROOT)}.",
        epilog=f"example:\n  {DOCS_COMMAND}", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-docs", action="store_true",
                        help=f"write {DOCS_PATH.relative_to(REPO_ROOT)} instead of printing it")
    args = parser.parse_args(argv)
    if args.write_docs:
        write_docs()
    else:
        sys.stdout.write(config_reference())


if __name__ == "__main__":
    main(sys.argv[1:])

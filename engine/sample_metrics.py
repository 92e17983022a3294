"""How good a generator's samples are, as GAN papers measure it: FID, KID, precision and recall.

Each metric compares the features of generated samples with those of as many real ones:
- FID (Heusel et al. 2017): the Frechet distance between two Gaussians fitted to the two feature
  sets, |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)). 0 for identical sets; lower is better.
- KID (Binkowski et al. 2018): the squared maximum mean discrepancy under the cubic polynomial
  kernel, averaged over random subsets (mean and standard deviation). Unbiased, so it can come out
  slightly below 0 for matching sets; lower is better, and it is fairer than FID at small sample counts.
- Precision and recall (Kynkaanniemi et al. 2019): the share of generated samples inside the real
  samples' manifold (each real sample's ball reaching its k-th nearest real neighbour), and the
  share of real samples inside the generated samples' one. Precision is quality, recall is
  coverage (a collapsed GAN has high precision, low recall); higher is better, both in [0, 1].

FID and KID come from torchmetrics, the Inception network from torch-fidelity (both optional,
imported only when asked for); precision/recall is written here from the paper (k = 3).

The features (`feature_extractor`):
- `inception`: torch-fidelity's port of the TensorFlow Inception v3 that FID was defined with
  (2048-d pool features), so that numbers compare with papers. Images are mapped from the real
  samples' stream's range (dataset_base.value_range) to 0..255, values beyond it clipped (grey
  repeated to RGB), and resized to 299x299 as torchmetrics does.
- `pixels`: the flattened samples. For tiny images (the toy GAN's 4x4) where Inception means
  nothing; its numbers compare only with other pixel numbers of the same data.
- `checkpoint:<path>`: a network trained with this pipeline (a classifier of the domain); the
  input of its last layer (or of `feature_layer`, a layer named as in its architecture YAML).
"""
import contextlib
import importlib
import math
import warnings
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from engine.config import resolve_path
from engine.errors import UserError, did_you_mean
from engine.model_base import architecture_text_for, build_model
from engine.registry import EXTRACTORS
from engine.runs import load_checkpoint, load_weights

MAX_PIXEL_FEATURES = 4096  # FID's covariances are D x D: beyond this, slow and memory-hungry
NEIGHBOURHOOD = 3  # precision/recall's k, as in the paper and torch-fidelity
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torchmetrics' defaults
# torch-fidelity's Inception weights (converted from TensorFlow's), and where torch.hub keeps them
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
BATCH = 64  # samples per feature-extraction pass


def optional(module, pip, why):
    """Import `module`, or a user error saying which pip command installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{why} needs the {module} package, which is not installed: pip install {pip}") from None


# ---- features ----------------------------------------------------------------------------------
class Features:
    """A feature extractor: `extract(images)` gives [N, D] float64 features on the CPU."""

    def __init__(self, name, network, device, prepare=lambda x: x):
        self.name, self.network, self.device, self.prepare = name, network, device, prepare

    @torch.no_grad()
    def extract(self, samples, desc="features"):
        batches = range(0, len(samples), BATCH)
        show = len(batches) > 4 and self.network is not None
        out = [self.network_features(samples[i:i + BATCH]) for i in tqdm(batches, desc=desc, unit="batch",
                                                                           leave=False, disable=not show)]
        return torch.cat(out).double().cpu()

    def network_features(self, batch):
        x = self.prepare(batch.to(self.device))
        return (self.network(x) if self.network is not None else x).flatten(1)


def build_features(spec, where, real, inception_weights=None, feature_layer=None, device="cpu", value_range=None):
    """The extractor `spec` names (inception, pixels or checkpoint:<path>) for samples like the
    `real` ones; checked, and its weights loaded, before any sample is generated. `where`: the
    config key path of `spec`, for messages; `value_range`: the real samples' range
    (dataset_base.ValueRange), which inception maps to 0..255."""
    shape = tuple(real.shape[1:])
    if spec == "pixels":
        n = math.prod(shape)
        if n > MAX_PIXEL_FEATURES:
            raise UserError(f"{where}: pixels gives {n} features per sample ({list(shape)}); FID's covariance "
                            f"matrices would be {n}x{n}. Use pixels for samples of at most {MAX_PIXEL_FEATURES} "
                            "values, else inception or checkpoint:<path>")
        return Features("pixels", None, device)
    if spec == "inception":
        return inception_features(where, shape, inception_weights, value_range, device)
    if spec.startswith("checkpoint:"):
        return checkpoint_features(spec.removeprefix("checkpoint:"), where, shape, feature_layer, device)
    raise UserError(f"{where}: {spec!r} is not a feature extractor{did_you_mean(spec, EXTRACTORS)}; "
                    f"valid: {', '.join(EXTRACTORS)}")


def inception_weights_path(given, where):
    """The Inception weights file: `given` (evaluation.inception_weights), else torch.hub's cached
    copy, downloaded there on first use; a user error, naming the file and where it goes, when
    neither can be had."""
    if given is not None:
        path = resolve_path(given)
        if not path.is_file():
            raise UserError(f"{where}: inception_weights: {path} is not a file; download {INCEPTION_URL}")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]
    if cached.is_file():
        return cached
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_URL, str(cached), progress=True)
    except Exception as e:  # any network or disk failure (URLError, OSError, SSL, HTTP errors)
        raise UserError(f"{where}: inception: its weights could not be downloaded ({type(e).__name__}: {e}). "
                        f"Fetch {INCEPTION_URL} and put it at {cached}, or name the downloaded file with "
                        "inception_weights: <path>") from None
    return cached


def inception_features(where, shape, weights, value_range, device):
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise UserError(f"{where}: inception takes images of 1 or 3 channels ([C, H, W]), but the samples are "
                        f"{list(shape)}; use pixels or checkpoint:<path>")
    optional("torch_fidelity", "torch-fidelity", f"{where}: inception")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if value_range is None or not value_range.known:
        raise UserError(f"{where}: inception maps the real samples from their range to 0..255, but that range is "
                        f"{value_range.how if value_range is not None else 'not known'}")
    path = inception_weights_path(weights, where)
    try:
        torch.load(path, map_location="cpu", weights_only=True)  # plain tensors (torch-fidelity loads it unchecked)
        network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    except Exception as e:  # not a weights file, or weights of another network
        raise UserError(f"{where}: inception_weights: {path} is not the Inception weights file {INCEPTION_URL} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    low, high = value_range.low, value_range.high

    def to_uint8(x):  # the data's range to 0..255, grey to RGB
        x = ((x.float() - low) / (high - low) * 255).round().clamp(0, 255).to(torch.uint8)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def network_features(x):
        return network(x)[0]

    network.to(device)
    return Features(f"inception-v3 (2048, images in [{low:g}, {high:g}], {value_range.how})", network_features,
                    device, to_uint8)


def checkpoint_features(path_text, where, shape, feature_layer, device):
    """A network trained with this pipeline as the feature extractor: its generator (the only
    network of a classifier), cut at the input of `feature_layer` (default: its last layer)."""
    path = resolve_path(path_text)
    state = load_checkpoint(path)
    if not isinstance(state, dict) or not isinstance(state.get("config"), str):
        raise UserError(f"{where}: {path} is not a checkpoint of this pipeline (no config in it)")
    model_cfg = yaml.safe_load(state["config"])["model"]
    saved = state.get("architecture")
    with architecture_text_for(model_cfg["architecture_cfg_path"], saved) if saved else contextlib.nullcontext():
        model = build_model(model_cfg)
    load_weights(model, state, path)
    if len(model.input_keys) > 1:  # (the samples are all a feature extractor is given)
        raise UserError(f"{where}: {path} reads {len(model.input_keys)} data streams ({', '.join(model.input_keys)}); "
                        "a feature extractor reads one, the samples: use a network trained on samples alone")
    if tuple(model.input_size) != shape:
        raise UserError(f"{where}: {path} takes inputs of shape {list(model.input_size)}, but the samples are "
                        f"{list(shape)}; use a network trained on samples like these")
    layers = {name: layer for sub in model.submodels.values() for name, layer in sub.layers.items()}
    name = feature_layer or model.last_layer("generator")[2]
    if name not in layers:
        raise UserError(f"{where}: feature_layer: {name!r} is not a layer of {path}'s architecture"
                        f"{did_you_mean(name, layers)}; its layers: {', '.join(layers)}")
    model = model.to(device).eval()
    caught = {}
    layers[name].register_forward_pre_hook(lambda module, args: caught.update(x=args[0]))

    def network_features(x):
        model(x)
        if "x" not in caught:  # e.g. a discriminator's layer: forward never runs it
            raise UserError(f"{where}: feature_layer: {name} is not on {path}'s inference path (its forward)")
        return caught.pop("x")

    return Features(f"checkpoint:{path_text} (input of {name})", network_features, device)


# ---- the metrics -------------------------------------------------------------------------------
class Identity(torch.nn.Module):
    """Features in, features out: how torchmetrics' FID and KID take features made elsewhere."""

    def __init__(self, num_features):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x


def measure(metrics, real, generated, where="sample_metrics"):
    """{result key: value} of `metrics` between real and generated features ([N, D] each).
    Deterministic: KID's random subsets are drawn from a fixed seed, apart from the caller's
    random numbers."""
    least = NEIGHBOURHOOD + 1 if "precision_recall" in metrics else 2  # (a sample and its k neighbours)
    if len(real) < least or len(generated) < least:
        raise UserError(f"{where}: {', '.join(metrics)} need at least {least} real and {least} generated samples, "
                        f"got {len(real)} and {len(generated)}; raise n_samples")
    out = {}
    if "fid" in metrics:
        out["fid"] = fid(real, generated)
    if "kid" in metrics:
        out["kid_mean"], out["kid_std"] = kid(real, generated)
    if "precision_recall" in metrics:
        out["precision"], out["recall"] = precision_recall(real, generated)
    return out


def fid(real, generated):
    return float(torchmetrics_compute("FrechetInceptionDistance", real, generated))


def kid(real, generated, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE):
    """(mean, standard deviation) over `subsets` random subsets of subset_size samples, or of half
    the samples where there are fewer than twice that (subsets of all of them would all agree)."""
    size = min(subset_size, max(2, len(real) // 2), max(2, len(generated) // 2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mean, std = torchmetrics_compute("KernelInceptionDistance", real, generated, subsets=subsets, subset_size=size)
    return float(mean), float(std)


def torchmetrics_compute(name, real, generated, **args):
    """torchmetrics.image's metric `name` between two feature sets (given through Identity)."""
    metric_class = getattr(optional("torchmetrics", "torchmetrics", f"sample metric {name}").image, name)
    with warnings.catch_warnings():  # (KID's that it keeps every feature: these are all it is given)
        warnings.simplefilter("ignore")
        metric = metric_class(feature=Identity(real.shape[1]), sync_on_compute=False, **args)
    metric.update(real.double(), real=True)
    metric.update(generated.double(), real=False)
    return metric.compute()


def precision_recall(real, generated, k=NEIGHBOURHOOD):
    """(precision, recall) of Kynkaanniemi et al. 2019: a sample is inside a set's manifold when
    it lies within some member's distance to that member's k-th nearest neighbour in the set."""
    real_radii, generated_radii = knn_radii(real, k), knn_radii(generated, k)
    return inside(generated, real, real_radii), inside(real, generated, generated_radii)


def knn_radii(features, k, chunk=2048):
    """Each sample's distance to its k-th nearest other sample of the same set."""
    return torch.cat([torch.cdist(part, features).kthvalue(k + 1, dim=1).values for part in features.split(chunk)])


def inside(samples, members, radii, chunk=2048):
    """The share of `samples` within radii[j] of some members[j]."""
    hits = [(torch.cdist(part, members) <= radii).any(1) for part in samples.split(chunk)]
    return torch.cat(hits).double().mean().item()


# ---- generated and real samples ----------------------------------------------------------------
class SampleMetrics:
    """The sample metrics of one config section on fixed real samples, whose features are
    computed once (on first use) and reused for every measurement of a run; `inputs`: the
    generator's inputs that make the generated samples, where the caller keeps them here."""

    def __init__(self, metrics, features, real, inputs=None):
        if {"fid", "kid"} & set(metrics):  # missing, it is said now, before any sample is generated
            optional("torchmetrics", "torchmetrics", f"sample metric{'s' * (len(metrics) > 1)} {', '.join(metrics)}")
        self.metrics, self.features, self.real, self.inputs = metrics, features, real, inputs
        self.real_features = None

    def __call__(self, generated, where="sample_metrics"):
        """{result key: value} of the generated samples against the real ones."""
        if generated.shape[1:] != self.real.shape[1:]:
            raise UserError(f"{where}: the generated samples are {list(generated.shape[1:])} each, the real samples "
                            f"{list(self.real.shape[1:])}; sample metrics compare the two")
        if self.real_features is None:
            self.real_features = self.features.extract(self.real, desc="real features")
        found = self.features.extract(generated, desc="generated features")
        return measure(self.metrics, self.real_features, found, where)


def prepare(metrics, settings, real, where, device, inputs=None, value_range=None):
    """SampleMetrics of `metrics` on the `real` samples (None: the flow names no target stream),
    with the feature extractor that `settings` (feature_extractor, inception_weights and
    feature_layer of a config section at `where`) names, loaded; `value_range`: the real
    samples' (dataset_base.value_range)."""
    if real is None:
        raise UserError(f"{where}: sample metrics compare generated with real samples, but the model's flow sets "
                        "no target_key (the data stream holding them)")
    real = real.float()
    features = build_features(settings["feature_extractor"], f"{where}.feature_extractor", real,
                              settings["inception_weights"], settings["feature_layer"], device, value_range)
    return SampleMetrics(metrics, features, real, inputs)


@contextlib.contextmanager
def weights_of(module, state_dict):
    """Within this block `module` holds `state_dict` (the generator's EMA weights); its own after."""
    if state_dict is None:
        yield
        return
    own = {k: v.clone() for k, v in module.state_dict().items()}
    module.load_state_dict(state_dict)
    try:
        yield
    finally:
        module.load_state_dict(own)

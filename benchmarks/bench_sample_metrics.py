"""What FID and KID cost on this machine, and what dominates: the features or the metrics.

    python benchmarks/bench_sample_metrics.py               # 2,000 and 10,000 samples (about 5 min on 2 cores)
    python benchmarks/bench_sample_metrics.py --samples 2000 --rounds 5

For each sample count N, FID and KID (sample_metrics.measure: torchmetrics' FID, and KID over 100
subsets of 1,000) between N real and N generated feature vectors of two sizes: 16 values (the
pixels of the toy GAN's 4x4 images) and 2,048 (Inception v3's pool features). Each is timed
--rounds times; printed: the median and quartiles, in seconds. Then Inception v3 itself (random
weights: the same arithmetic as the real ones) on 32x32 RGB images, which it resizes to 299x299:
images per second, and what extracting the features of N real plus N generated samples takes at
that rate. (Pixel features cost nothing: a reshape.)
"""
import argparse
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from engine.sample_metrics import measure  # noqa: E402


def timed(metric, real, generated, rounds):
    """Seconds of each of `rounds` calls of measure([metric], real, generated)."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        measure([metric], real, generated)
        times.append(time.perf_counter() - start)
    return times


def quartiles(times):
    if len(times) < 2:
        return times[0], times[0], times[0]
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q1, median, q3


def show(label, times):
    q1, median, q3 = quartiles(times)
    print(f"  {label:<28} {median:8.2f} s   (quartiles {q1:.2f} .. {q3:.2f}, {len(times)} rounds)")
    return median


def inception_rate(images, batch):
    """Images per second through torch-fidelity's Inception v3 (random weights, no download)."""
    from torch_fidelity import feature_extractor_inceptionv3 as inception

    with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        network = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        network(x[:2])  # warm-up
        start = time.perf_counter()
        for _ in range(images // batch):
            network(x)
    return images // batch * batch / (time.perf_counter() - start)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[2000, 10000], help="sample counts N")
    parser.add_argument("--rounds", type=int, default=3, help="timings of each (median and quartiles)")
    parser.add_argument("--inception-images", type=int, default=64, help="images timed through Inception")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    g = torch.Generator().manual_seed(0)
    metric_time = {}
    for n in args.samples:
        for dim in (16, 2048):
            real = torch.randn(n, dim, generator=g, dtype=torch.float64)
            generated = torch.randn(n, dim, generator=g, dtype=torch.float64) * 1.1 + 0.1
            measure(["fid"], real[:10], generated[:10])  # imports torchmetrics outside the timing
            print(f"N = {n:,} real and generated samples, {dim} features each:")
            fid = show("FID", timed("fid", real, generated, args.rounds))
            kid = show("KID (100 subsets of 1,000)", timed("kid", real, generated, args.rounds))
            metric_time[n, dim] = fid + kid
    rate = inception_rate(args.inception_images, 16)
    print(f"Inception v3 on 32x32 RGB images (resized to 299x299): {rate:.1f} images/s")
    for n in args.samples:
        extract = 2 * n / rate
        print(f"  N = {n:,}: features of 2N images {extract:7.1f} s; FID + KID on them {metric_time[n, 2048]:6.1f} s;"
              f" pixels (16 values): FID + KID {metric_time[n, 16]:.2f} s")


if __name__ == "__main__":
    main(sys.argv[1:])

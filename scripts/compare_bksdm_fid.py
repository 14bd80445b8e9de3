"""Compare koala's `coco30k-bksdm` FID with pytorch-fid's own code: `python scripts/compare_bksdm_fid.py`.

Needs `make setup` (pytorch-fid 0.3.0 in .venv/parity; tests/reference_code.py says why it lives there). Writes 5
generated PNGs and 4 real JPEGs (one grayscale) in a temporary folder, BK-SDM's im256 / val2014_im256 files from them
with BK-SDM's PIL calls, loads random FID-Inception weights (seed 0) into both networks, and prints whether the
features are bit-identical, both FIDs, the FID with torch-fidelity's input instead, and both Fréchet formulas on
full-rank 2048-d statistics. The steps are those of tests/test_protocols.py, whose helpers it uses.
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from reference_code import import_reference_code  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from koala.evaluation.inception import random_fid_inception_state  # noqa: E402
from koala.evaluation.metrics import feature_stats, frechet_distance  # noqa: E402
from koala.evaluation.registry import MetricContext, Sample, build_metric  # noqa: E402


def main() -> None:
    """Run both implementations on the same files and weights and print the comparison."""
    import_reference_code()
    import test_protocols as t
    from pytorch_fid import inception
    from pytorch_fid.fid_score import calculate_activation_statistics, calculate_frechet_distance, get_activations

    tmp = Path(tempfile.mkdtemp())
    weights = tmp / "inception.safetensors"
    save_file(random_fid_inception_state(0), str(weights))
    samples, val = t.write_samples(tmp / "gen", 5, seed=4), t.write_val2014(tmp / "val2014", 4, seed=5)
    im256, real256 = t.bksdm_files(samples, val, tmp / "bksdm")
    state = load_file(str(weights))
    inception.load_state_dict_from_url = lambda *a, **k: dict(state)  # pytorch-fid's download, replaced
    net = inception.InceptionV3([3]).eval()
    metric = build_metric("fid", weights, MetricContext("cpu", t.bksdm_protocol(tmp / "val2014"), tmp / "eval"))
    ours = metric.features_of(samples, metric.prep.generated)
    theirs = torch.from_numpy(get_activations(im256, net, 50, 2048, "cpu", 0))
    real_same = torch.equal(
        metric.reference_features(), torch.from_numpy(get_activations(real256, net, 50, 2048, "cpu", 0))
    )
    print(f"features bit-identical: generated {torch.equal(ours, theirs)}, real {real_same}")
    stats = [calculate_activation_statistics(files, net, 50, 2048, "cpu", 0) for files in (im256, real256)]
    expected = calculate_frechet_distance(*stats[0], *stats[1])
    fid = metric([Sample(f, "") for f in samples])["fid"]
    print(f"FID: koala {fid:.6f}, pytorch-fid {expected:.6f}, relative difference {abs(fid - expected) / expected:.1e}")
    other = t.bksdm_protocol(tmp / "val2014", fid_input="torch-fidelity")
    tf = build_metric("fid", weights, MetricContext("cpu", other, tmp / "eval-tf"))([Sample(f, "") for f in samples])
    print(f"FID of the same images with torch-fidelity's input: {tf['fid']:.6f}")
    rng = np.random.default_rng(0)
    scales = rng.uniform(0.1, 3.0, 2048)
    a, b = rng.normal(size=(3000, 2048)) * scales, rng.normal(size=(3000, 2048)) * scales[::-1] + 0.05
    full = (*feature_stats(torch.from_numpy(a)), *feature_stats(torch.from_numpy(b)))
    k, p = frechet_distance(*full), calculate_frechet_distance(*full)
    print(
        f"full-rank 2048-d statistics (3,000 samples each): koala {k:.9f}, pytorch-fid {p:.9f}, |diff| {abs(k - p):.1e}"
    )


if __name__ == "__main__":
    main()

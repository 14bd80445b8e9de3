"""Compare koala's FID Inception with torch-fidelity's on random weights: `python scripts/compare_fid_inception.py DIR`.

DIR is an unpacked torch-fidelity package folder (e.g. `pip download --no-deps torch-fidelity==0.4.0` and unzip; the
folder holding feature_extractor_inceptionv3.py). Its package __init__ imports torchvision, so only the Inception
module and its helpers are imported, under an empty package. Prints whether the features are bit-identical and the
reference values tests/test_evaluate.py keeps.
"""

import importlib
import sys
import tempfile
import types
from pathlib import Path

import torch

from koala.evaluation.inception import FIDInception, random_fid_inception_state


def main(folder: str) -> None:
    """Load both networks with random_fid_inception_state(0), run two fixed images, print the comparison."""
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = [str(Path(folder).resolve())]
    sys.modules["torch_fidelity"] = pkg
    ref_module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    state = random_fid_inception_state(0)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp) / "w.pth")
        ref = ref_module.FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(Path(tmp) / "w.pth")
        )
    ours = FIDInception()
    ours.load_state_dict(state, strict=False)
    ours.eval()
    images = torch.randint(0, 256, (2, 3, 64, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(images), ref(images)[0]
    print(f"bit-identical: {torch.equal(a, b)}; max abs difference {(a - b).abs().max().item():.3g}")
    print("first8", [round(v, 6) for v in b[0, :8].tolist()])
    print("sums", b.sum(1).tolist(), "norms", b.norm(dim=1).tolist())


if __name__ == "__main__":
    main(sys.argv[1])

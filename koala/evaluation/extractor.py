"""What a set of Fréchet statistics was extracted with, written into every `.npz` koala saves and checked on reading.

A Fréchet distance compares two Gaussians only when both came from the same feature extractor: the same network,
the same way of bringing images to its input, the same squash size and the same JPEG round trips. Statistics from
elsewhere (BK-SDM's `real_im256.npz` is pytorch-fid's statistics of 256 px JPEGs) carry no record, so they are
refused unless `protocol.reference_extractor=` says what they are; a record that differs from the extractor in use
is refused: one FID never mixes two extractors. Refusals are `ConfigError`s: one `error:` line, exit 2, before any model
loads (koala.evaluation.registry.check_metrics reads the record).

The record is one string, `<network>/<input>/<size>/<jpeg>`, e.g. `inception-2015-12-05/pytorch-fid/256/jpeg75`:
  network  `inception-2015-12-05` (the TF FID graph) or `clip-<folder name>` (fd_clip)
  input    how uint8 images reach the network: `torch-fidelity` or `pytorch-fid` (koala.evaluation.inception), `clip`
  size     the side every image is squashed to first (PIL bicubic), or `full`
  jpeg     `jpeg<quality>` for BK-SDM's JPEG round trips (koala.evaluation.images), or `nojpeg`
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from koala.errors import ConfigError

INCEPTION = "inception-2015-12-05"


@dataclass(frozen=True)
class Extractor:
    """Network, input handling, squash size and JPEG quality of a feature extractor (see the module docstring)."""

    network: str
    input: str
    size: Optional[int] = None
    jpeg: Optional[int] = None

    def __str__(self) -> str:
        return f"{self.network}/{self.input}/{self.size or 'full'}/{f'jpeg{self.jpeg}' if self.jpeg else 'nojpeg'}"

    @classmethod
    def parse(cls, text: str, key: str = "protocol.reference_extractor") -> Extractor:
        """An extractor from its string form, or a one-line error showing the form."""
        parts = str(text).strip().split("/")
        size, jpeg = (parts + ["", "", "", ""])[2:4]
        ok = len(parts) == 4 and (size == "full" or size.isdigit())
        ok = ok and (jpeg == "nojpeg" or (jpeg.startswith("jpeg") and jpeg[4:].isdigit()))
        if not ok:
            raise ConfigError(
                f"{key}={text!r} is not an extractor: expected <network>/<input>/<size|full>/<jpeg<quality>|nojpeg>, "
                f"e.g. {INCEPTION}/pytorch-fid/256/jpeg75"
            )
        return cls(
            parts[0], parts[1], None if size == "full" else int(size), None if jpeg == "nojpeg" else int(jpeg[4:])
        )


def write_stats(path: Path, mu: np.ndarray, sigma: np.ndarray, extractor: Extractor) -> Path:
    """mu, sigma and the extractor record as an .npz, written atomically (temp name, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, extractor=np.array(str(extractor)))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def stats_extractor(path: Path) -> Optional[str]:
    """The extractor record of an .npz of statistics, or None where it has none (written elsewhere)."""
    with np.load(path, allow_pickle=False) as z:
        if "mu" not in z or "sigma" not in z:
            raise ConfigError(f"protocol.reference={path} holds {sorted(z.files)}, not FID statistics (mu, sigma)")
        return str(z["extractor"]) if "extractor" in z else None


def check_stats(path: Path, expected: Extractor, declared: Optional[str], metric: str) -> None:
    """Refuse statistics whose extractor is unknown (no record, none declared) or differs from `expected`."""
    recorded = stats_extractor(path)
    if recorded is None and not declared:
        raise ConfigError(
            f"protocol.reference={path} records no extractor, so {metric} cannot tell whether it was computed as "
            f"this protocol's {metric} is ({expected}); if it was, say so: protocol.reference_extractor={expected} "
            f"(BK-SDM's real_im256.npz is {INCEPTION}/pytorch-fid/256/jpeg75), or pass the real images' folder"
        )
    if recorded is not None and declared and Extractor.parse(declared) != Extractor.parse(recorded):
        raise ConfigError(
            f"protocol.reference={path} records extractor {recorded} but protocol.reference_extractor={declared}; "
            "remove the override or pass the right file"
        )
    found = Extractor.parse(recorded or declared)
    if found != expected:
        source = "records" if recorded is not None else "is declared (protocol.reference_extractor) as"
        raise ConfigError(
            f"protocol.reference={path} {source} statistics of {found}, but this protocol's {metric} extracts "
            f"{expected}: one Fréchet distance cannot mix two extractors; pass statistics made the same way, or the "
            "real images' folder"
        )


def read_stats(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of an .npz of statistics (checked with check_stats first)."""
    with np.load(path, allow_pickle=False) as z:
        return z["mu"], z["sigma"]

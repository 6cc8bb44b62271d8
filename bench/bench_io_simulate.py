"""Reading a 512x512x300 CT volume and simulating one kernel for it: seconds, not minutes, on 2 cores.

Prints figures; asserts nothing. Run with `make bench`.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path


from radiomicgan.io import read_volume, write_volume
from radiomicgan.kernels import PRESETS, rekernel, simulate_kernels
from radiomicgan.phantom import make_chest_phantom
from radiomicgan.volume import CTMetadata, CTVolume

SIZE, SLICES = 512, 300


def timed(label: str, fn):
    start = time.perf_counter()
    result = fn()
    print(f"{label:<52}{time.perf_counter() - start:8.2f} s")
    return result


def main() -> None:
    print(f"machine: {os.cpu_count()} cores; volume {SIZE}x{SIZE}x{SLICES}")
    phantom = timed("phantom anatomy", lambda: make_chest_phantom(SIZE, SLICES, seed=0))
    (b30,) = timed("simulate one kernel (B30)", lambda: simulate_kernels(phantom.hu, (0.7, 0.7), [PRESETS["B30"]]))
    timed("simulate a pair (B30 + B50, one noise realisation)",
          lambda: simulate_kernels(phantom.hu, (0.7, 0.7), [PRESETS["B30"], PRESETS["B50"]]))
    timed("re-kernel a scan (B30 -> B50)", lambda: rekernel(b30, (0.7, 0.7), PRESETS["B30"], PRESETS["B50"]))
    volume = CTVolume(hu=b30, spacing=(0.7, 0.7, 1.0), meta=CTMetadata(kernel="B30f"))
    with tempfile.TemporaryDirectory() as tmp:
        timed("write DICOM series (300 files)", lambda: write_volume(volume, Path(tmp) / "dicom"))
        timed("read DICOM series (300 files)", lambda: read_volume(Path(tmp) / "dicom"))
        timed("write NRRD (gzip)", lambda: write_volume(volume, Path(tmp) / "ct.nrrd"))
        timed("read NRRD", lambda: read_volume(Path(tmp) / "ct.nrrd"))
    print(f"peak resident memory: {_peak_rss_gib():.1f} GiB")


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


if __name__ == "__main__":
    main()

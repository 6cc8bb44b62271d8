"""Python packages the core needs beyond what Slicer ships (numpy, SimpleITK).

Installed only after the user agrees, never at import time, and never SimpleITK (Slicer has its own).
"""

from __future__ import annotations

import importlib
import importlib.util

# import name -> pip requirement
REQUIREMENTS = {
    "pydicom": "pydicom>=2.4",  # Slicer ships 2.4.x; its DICOM module needs it: never upgraded by us
    "scipy": "scipy>=1.10",
    "skimage": "scikit-image>=0.22",
    "matplotlib": "matplotlib>=3.7",
    "tqdm": "tqdm>=4.60",
}


def missing_requirements() -> list[str]:
    """pip requirements of the packages that cannot be imported here."""
    return [req for name, req in REQUIREMENTS.items() if importlib.util.find_spec(name) is None]


def ensure_dependencies(confirm, install) -> bool:
    """Ask with ``confirm(text) -> bool``, then ``install("req1 req2")``; True when everything imports."""
    missing = missing_requirements()
    if not missing:
        return True
    text = (
        "RadiomicGAN needs these Python packages, which are not installed yet:\n  " + "\n  ".join(missing)
        + "\nInstall them now? (This can take a few minutes.)"
    )
    if not confirm(text):
        return False
    install(" ".join(missing))
    importlib.invalidate_caches()
    return not missing_requirements()

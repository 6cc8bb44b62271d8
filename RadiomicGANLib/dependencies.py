"""Python packages the core needs beyond what Slicer ships (numpy, SimpleITK, pydicom 2.4).

Checked when the user presses Apply, never at import or module set-up; installed only after the user agreed,
with ONE question; nothing is installed in testing mode. torch comes through the PyTorch extension
(``PyTorchUtilsLogic().installTorch``, which picks the wheel for the computer's CUDA); pyradiomics, needed by the
comparison only, is taken from the SlicerRadiomics extension when that is installed (it ships it), and otherwise
pip-installed in the same question, without its dependency list (which names SimpleITK) plus its other
dependencies; the rest with pip and version checks. The extension declares no dependency on SlicerRadiomics,
which has no macOS package. Slicer's own packages are never replaced: SimpleITK is never requested, and numpy is
pinned to the installed version in every pip call so a dependency cannot upgrade it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from typing import Callable

TORCH_REQUIREMENT = ">=2.4"
TORCHVISION_REQUIREMENT = ">=0.19"
# import name -> pip requirement (distribution name first)
REQUIREMENTS = {
    "scipy": "scipy>=1.10",
    "skimage": "scikit-image>=0.22",
    "matplotlib": "matplotlib>=3.7",
    "tqdm": "tqdm>=4.60",
    "pydicom": "pydicom>=2.4",  # Slicer ships 2.4.x; its DICOM module needs it: never upgraded by us
}
RADIOMICS_REQUIREMENT = "pyradiomics>=3.0"
RADIOMICS_MODULE = "radiomics"
# pyradiomics' own dependencies but SimpleITK and numpy (Slicer's): installed beside it, as pyradiomics is
# installed with --no-deps so that pip never replaces Slicer's SimpleITK
RADIOMICS_DEPENDENCIES = ("PyWavelets>=1.0", "pykwalify>=1.6", "six>=1.10")
NEVER_INSTALLED = ("simpleitk", "numpy")  # Slicer's own builds; replacing them breaks Slicer
KEPT = ("numpy",)  # pinned to the installed version in pip calls


def _distribution(requirement: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(requirement).name


def satisfied(import_name: str, requirement: str) -> bool:
    """Importable and, when its version is known, within the requirement."""
    if importlib.util.find_spec(import_name) is None:
        return False
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    try:
        installed = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        return True  # importable without metadata (e.g. built into the application): accept it
    return req.specifier.contains(installed, prereleases=True)


def missing_requirements(requirements: dict | None = None) -> list[str]:
    """pip requirements of the packages that are absent or too old here."""
    requirements = REQUIREMENTS if requirements is None else requirements
    return [req for name, req in requirements.items() if not satisfied(name, req)]


@dataclass
class Plan:
    """What is missing and how each part would be installed."""

    torch: bool = False  # torch/torchvision through PyTorchUtils
    pip: list[str] = field(default_factory=list)
    radiomics: bool = False  # pyradiomics (not from SlicerRadiomics): pip, without its dependency list
    no_pytorch_extension: bool = False

    @property
    def empty(self) -> bool:
        return not (self.torch or self.pip or self.radiomics)

    def describe(self) -> str:
        items = []
        if self.torch:
            items.append(f"torch {TORCH_REQUIREMENT} and torchvision {TORCHVISION_REQUIREMENT} (through the PyTorch extension)")
        items += self.pip
        if self.radiomics:
            items.append(f"{RADIOMICS_REQUIREMENT} (or install the SlicerRadiomics extension, which ships it)")
        return "RadiomicGAN needs these Python packages, which are missing or too old:\n  " + "\n  ".join(items) if items else ""


def plan(torch_logic=None, *, need_radiomics: bool = False, requirements: dict | None = None) -> Plan:
    """``torch_logic``: a ``PyTorchUtils.PyTorchUtilsLogic()``, or None when the PyTorch extension is absent."""
    result = Plan(pip=missing_requirements(requirements))
    if not (satisfied("torch", "torch" + TORCH_REQUIREMENT) and satisfied("torchvision", "torchvision" + TORCHVISION_REQUIREMENT)):
        result.torch = True
        result.no_pytorch_extension = torch_logic is None
    result.radiomics = need_radiomics and importlib.util.find_spec(RADIOMICS_MODULE) is None
    return result


def _import_name(requirement: str) -> str:
    return {"pywavelets": "pywt"}.get(_distribution(requirement).lower(), _distribution(requirement).lower())


def _pins() -> list[str]:
    pins = []
    for name in KEPT:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return pins


def ensure_dependencies(confirm: Callable[[str], bool], pip_install: Callable[[str], None], torch_logic=None, *,
                        testing: bool = False, need_radiomics: bool = False, requirements: dict | None = None) -> tuple[bool, str]:
    """Install what is missing after one question. Returns (everything importable, message for the user).

    ``confirm(text) -> bool`` asks (``slicer.util.confirmOkCancelDisplay``); ``pip_install("req req")`` is
    ``slicer.util.pip_install``. When torch is the only thing missing, PyTorchUtils asks itself (its question
    names the wheel it chose); otherwise we ask once for everything and it installs without asking again.
    """
    todo = plan(torch_logic, need_radiomics=need_radiomics, requirements=requirements)
    if todo.empty:
        return True, ""
    if todo.torch and todo.no_pytorch_extension:
        return False, "torch is missing: install the PyTorch extension from the Extensions Manager and restart Slicer."
    if testing:
        return False, todo.describe() + "\n(testing mode: nothing installed)"
    for requirement in todo.pip:
        if _distribution(requirement).lower() in NEVER_INSTALLED:
            raise ValueError(f"refusing to pip-install {requirement}: Slicer ships its own")
    torch_alone = todo.torch and not todo.pip and not todo.radiomics
    if not torch_alone and not confirm(todo.describe() + "\n\nInstall them now? (This can take a few minutes.)"):
        return False, "Installation declined; " + todo.describe()
    if todo.torch:
        torch = torch_logic.installTorch(askConfirmation=torch_alone, torchVersionRequirement=TORCH_REQUIREMENT,
                                         torchvisionVersionRequirement=TORCHVISION_REQUIREMENT)
        if torch is None:
            return False, "torch was not installed; " + todo.describe()
    if todo.radiomics:
        todo.pip += [r for r in RADIOMICS_DEPENDENCIES if not satisfied(_import_name(r), r)]
    if todo.pip:
        pip_install(" ".join(todo.pip + _pins()))
    if todo.radiomics:
        pip_install(f"{RADIOMICS_REQUIREMENT} --no-deps")
    importlib.invalidate_caches()
    left = plan(torch_logic, need_radiomics=need_radiomics, requirements=requirements)
    if left.empty:
        return True, ""
    return False, "Still missing after installation (restart Slicer and try again): " + left.describe()


def ensure_in_slicer(need_radiomics: bool = False) -> tuple[bool, str]:
    """``ensure_dependencies`` wired to Slicer's dialogs, pip and the PyTorch extension (inside Slicer only)."""
    import slicer

    try:
        import PyTorchUtils

        torch_logic = PyTorchUtils.PyTorchUtilsLogic()
    except ImportError:
        torch_logic = None

    def pip_install(requirements: str) -> None:
        with slicer.util.WaitCursor():
            slicer.util.pip_install(requirements)

    return ensure_dependencies(slicer.util.confirmOkCancelDisplay, pip_install, torch_logic,
                               testing=bool(slicer.app.commandOptions().testingEnabled), need_radiomics=need_radiomics)

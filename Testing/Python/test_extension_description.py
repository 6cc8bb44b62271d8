"""The rules the Slicer Extensions Index applies to an extension's description (its check of description files and
of the repository it points to), written out here so a change that the index would reject fails this suite:

- the description file (``RadiomicGAN.json``, named like the extension) is JSON with a ``$schema``, a known
  ``category``, an ``scm_url`` of scheme git or https whose repository name contains "slicer", an
  ``scm_revision``, and ``build_dependencies`` naming extensions of the index;
- the top-level CMakeLists.txt declares ``project(<extension name>)``, an ``EXTENSION_ICONURL`` and at least one
  ``EXTENSION_SCREENSHOTURLS`` entry, each an http(s) URL of a PNG, JPEG or GIF image (the index downloads them);
- the repository root holds a license file.

The index downloads the images; offline, each raw URL must name this repository and a file of it that is such an
image (the icon 128x128 pixels, as the .s4ext says). The older .s4ext and the CMake variables must agree."""

from __future__ import annotations

import json
import re
import struct
from urllib.parse import urlsplit

import pytest
from helpers import REPO

# the index's accepted categories (its ACCEPTED_EXTENSION_CATEGORIES), of which this extension may use any
CATEGORIES = {
    "Active Learning", "Analysis", "BigImage", "Cardiac", "Chest Imaging Platform", "Converters", "DICOM", "Developer Tools",
    "Diffusion", "Examples", "Exporter", "Filtering", "Filtering.Morphology", "Filtering.Vesselness", "IGT", "Informatics",
    "Neuroimaging", "Nuclear Medicine", "Pipelines", "Planning", "Quantification", "Radiotherapy", "Registration",
    "Rendering", "Segmentation", "Sequences", "Simulation", "Spectral Imaging", "Tomographic Reconstruction", "Training",
    "Utilities",
}
KNOWN_EXTENSIONS = {"PyTorch", "SlicerRadiomics", "SlicerElastix", "MONAIAuto3DSeg", "NNUNet"}  # index names used here
LICENSE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")
IMAGE_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg", b"GIF87a": "gif", b"GIF89a": "gif"}


def description():
    files = [p for p in REPO.glob("*.json") if p.name != "package.json"]
    assert len(files) == 1, files
    return files[0].stem, json.loads(files[0].read_text())


def cmake_variable(name: str) -> str | None:
    """The value of ``set(NAME "value")`` as the index's regular expressions read it (no space before ``)``)."""
    match = re.search(r'set\s*\(' + name + r'\s*"([^"]*)"\)', (REPO / "CMakeLists.txt").read_text(), re.I)
    return match.group(1) if match else None


def image_in_this_repository(url: str, scm_url: str):
    """The repository file a raw.githubusercontent.com URL names, checked to be an image; (path, kind, size)."""
    assert url.startswith("https://"), url
    parts = urlsplit(url)
    assert parts.netloc == "raw.githubusercontent.com", url
    owner, repo, _branch, *path = parts.path.strip("/").split("/")
    scm_owner, scm_repo = urlsplit(scm_url).path.strip("/").removesuffix(".git").split("/")[-2:]
    assert (owner, repo) == (scm_owner, scm_repo), f"{url}: not this repository ({scm_url})"
    file = REPO.joinpath(*path)
    assert file.is_file(), f"{url}: {file.relative_to(REPO)} is not in the repository"
    head = file.read_bytes()[:32]
    kind = next((k for signature, k in IMAGE_SIGNATURES.items() if head.startswith(signature)), None)
    assert kind, f"{url}: not a PNG, JPEG or GIF image"
    size = struct.unpack(">II", head[16:24]) if kind == "png" else None
    return file, kind, size


def test_description_file():
    name, entry = description()
    assert entry.get("$schema", "").startswith("https://"), "$schema"
    assert entry.get("category") in CATEGORIES, entry.get("category")
    scm = entry.get("scm_url", "")
    assert "://" in scm and urlsplit(scm).scheme in ("git", "https"), scm
    assert "slicer" in urlsplit(scm).path.split("/")[-1].lower(), "the index asks for Slicer in the repository name"
    assert entry.get("scm_revision"), "scm_revision"
    dependencies = entry.get("build_dependencies", [])
    assert isinstance(dependencies, list) and all(isinstance(d, str) and d for d in dependencies)
    assert set(dependencies) <= KNOWN_EXTENSIONS, set(dependencies) - KNOWN_EXTENSIONS


def test_cmakelists_names_the_extension_its_icon_and_screenshots():
    name, entry = description()
    project = re.search(r"project\s*\(\s*([^\s)]+)", (REPO / "CMakeLists.txt").read_text(), re.I)
    assert project and project.group(1).strip("\"'") == name
    icon = cmake_variable("EXTENSION_ICONURL")
    assert icon and icon.startswith("http"), icon
    file, kind, size = image_in_this_repository(icon, entry["scm_url"])
    assert kind == "png" and size == (128, 128), (file, size)
    screenshots = (cmake_variable("EXTENSION_SCREENSHOTURLS") or "").split()
    assert screenshots, "EXTENSION_SCREENSHOTURLS is empty"
    for url in screenshots:
        assert url.startswith("http"), url
        image_in_this_repository(url, entry["scm_url"])
    dependencies = (cmake_variable("EXTENSION_DEPENDS") or "").split()
    assert dependencies == entry.get("build_dependencies", []) or dependencies == ["NA"] and not entry.get("build_dependencies")


def test_license_file_in_the_repository_root_matches_the_declared_license():
    found = [n for n in LICENSE_NAMES if (REPO / n).is_file()]
    assert found, "no license file in the repository root"
    text = (REPO / found[0]).read_text()
    declared = re.search(r'^license = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert declared == "Apache-2.0" and "Apache License" in text and "Version 2.0" in text


def test_s4ext_agrees_with_the_cmake_description():
    s4ext = {}
    for line in (REPO / "RadiomicGAN.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            s4ext[key] = value.strip()
    assert s4ext["iconurl"] == cmake_variable("EXTENSION_ICONURL")
    assert s4ext["screenshoturls"].split() == (cmake_variable("EXTENSION_SCREENSHOTURLS") or "").split()
    assert s4ext["depends"].split() == (cmake_variable("EXTENSION_DEPENDS") or "").split()
    assert s4ext["category"] == cmake_variable("EXTENSION_CATEGORY") == description()[1]["category"]
    assert s4ext["homepage"] == cmake_variable("EXTENSION_HOMEPAGE")


@pytest.mark.parametrize("url", ["http://example.org/icon.png", "https://raw.githubusercontent.com/Other/Repo/main/x.png",
                                 "https://raw.githubusercontent.com/RadiomicGAN/SlicerRadiomicGAN/main/README.md"])
def test_the_image_check_refuses_what_the_index_would(url):
    with pytest.raises(AssertionError):
        image_in_this_repository(url, description()[1]["scm_url"])

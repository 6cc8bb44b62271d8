"""What the Slicer modules' widget and self-test code must do, read from the code (the Slicer application and its Qt
widgets cannot run here; test_module_ui.py loads the .ui files with Qt's own reader, and the logic they call is
tested against slicer-core): dependency checks inside the error dialog, self-tests that skip where a fresh
Slicer lacks torch or pyradiomics, widgets that build without a parent, the user's views left alone."""

from __future__ import annotations

import ast

import pytest
from helpers import REPO

MODULES = ("RadiomicGANHarmonize", "RadiomicGANTrain")
CORE_CALLS = {"train", "compare", "process", "BackgroundProcess"}  # calls that run the core (torch, pyradiomics)
DEPENDENCY_CALLS = {"ensureDependencies", "_ensureDependencies", "ensure_in_slicer", "dependenciesMissing"}


def _tree(module):
    return ast.parse((REPO / module / f"{module}.py").read_text())


def _called(node) -> str | None:
    if isinstance(node, ast.Call):
        return getattr(node.func, "attr", getattr(node.func, "id", None))
    return None


def _classes(tree, suffix):
    return [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith(suffix)]


def _methods(cls):
    return {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}


@pytest.mark.parametrize("module", MODULES)
def test_dependency_checks_of_the_widgets_run_inside_the_error_dialog(module):
    """A failed installation (pip error, PyTorchUtils error) must show a dialog, not a console traceback."""
    widget = _classes(_tree(module), "Widget")[0]
    checked = 0
    for method in _methods(widget).values():
        guarded = set()
        for node in ast.walk(method):
            if isinstance(node, ast.With) and any(_called(item.context_expr) == "tryWithErrorDisplay" for item in node.items):
                guarded |= {id(n) for n in ast.walk(node)}
        for node in ast.walk(method):
            if _called(node) in DEPENDENCY_CALLS:
                checked += 1
                assert id(node) in guarded, f"{module}.{method.name} line {node.lineno}: outside tryWithErrorDisplay"
    assert checked


@pytest.mark.parametrize("module", MODULES)
def test_self_tests_check_dependencies_before_running_the_core(module):
    """On a fresh Slicer (testing mode installs nothing) a self-test that needs torch or pyradiomics skips."""
    test_class = _classes(_tree(module), "Test")[0]
    for name, method in _methods(test_class).items():
        calls = sorted((n.lineno, _called(n)) for n in ast.walk(method) if _called(n))
        core = [line for line, called in calls if called in CORE_CALLS]
        if not core:
            continue
        checks = [line for line, called in calls if called in DEPENDENCY_CALLS]
        assert checks and min(checks) < min(core), f"{module}Test.{name} runs the core without checking dependencies"


@pytest.mark.parametrize("module", MODULES)
def test_widget_sets_what_setup_uses_before_the_base_constructor(module):
    """``Widget(logic=...)`` without a parent: ScriptedLoadableModuleWidget.__init__ then makes a parent and calls
    ``setup()`` at once, so every attribute and the observation mixin must be ready before it."""
    init = _methods(_classes(_tree(module), "Widget")[0])["__init__"]
    statements = [ast.unparse(s) for s in init.body if not isinstance(s, ast.Expr) or not isinstance(s.value, ast.Constant)]
    assert statements[-1].startswith("ScriptedLoadableModuleWidget.__init__(self"), statements[-1]
    assert any(s.startswith("VTKObservationMixin.__init__(self)") for s in statements[:-1])


def test_cam_samples_replace_the_views_only_on_request():
    """The Grad-CAM samples are shown when the user presses the button, not after every epoch."""
    widget = _classes(_tree("RadiomicGANTrain"), "Widget")[0]
    callers = {name for name, method in _methods(widget).items()
               for node in ast.walk(method) if _called(node) == "_showCamSamples"}
    assert callers == {"onShowCamSamples"}
    setup = ast.unparse(_methods(widget)["setup"])
    assert "showCamSamplesButton.connect('clicked(bool)', self.onShowCamSamples)" in setup

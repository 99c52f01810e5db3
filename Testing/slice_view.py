"""Off-screen rendering of a real Slicer slice view (slice logic + segmentation displayable manager).

This is the picture a user sees in the Red/Yellow/Green views, made headless with slicer-core and
VTK's EGL render window: the background volume through `vtkMRMLSliceLogic` and every visible
segmentation through `vtkMRMLSegmentationsDisplayableManager2D`. Used by the visual tests and by
`Testing/make_screenshot.py` for `Resources/Screenshots/`.
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk
from vtk.util.numpy_support import vtk_to_numpy

_DISPLAYABLE_MANAGERS = ("vtkMRMLSegmentationsDisplayableManager2D",)
_ORIENTATION_NAMES = {"axial": "Axial", "coronal": "Coronal", "sagittal": "Sagittal"}


class OffscreenSliceView:
    """One slice view (background volume + segmentations) rendered into a numpy RGB image."""

    def __init__(self, scene, app_logic, name: str = "Red", size: tuple[int, int] = (512, 512)) -> None:
        self.size = size
        self.window = vtk.vtkRenderWindow()
        self.window.SetOffScreenRendering(1)
        self.window.SetMultiSamples(0)
        self.window.SetSize(*size)
        self.renderer = vtk.vtkRenderer()
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.window.AddRenderer(self.renderer)
        # The displayable managers expect a view with an interactor, as in the Slicer app.
        self.interactor = vtk.vtkRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.window)
        self.interactor.Initialize()

        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        factory.SetMRMLApplicationLogic(app_logic)
        for manager in _DISPLAYABLE_MANAGERS:
            if not factory.IsDisplayableManagerRegistered(manager):
                factory.RegisterDisplayableManager(manager)
        self.managers = slicer.vtkMRMLDisplayableManagerGroup()
        self.managers.Initialize(factory, self.renderer)

        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(app_logic)
        self.logic.SetMRMLScene(scene)
        self.slice_node = self.logic.AddSliceNode(name)
        self.managers.SetMRMLDisplayableNode(self.slice_node)

        # The background image: the slice logic's blended RGBA output, drawn behind everything.
        self._mapper = vtk.vtkImageMapper()
        self._mapper.SetColorWindow(255)
        self._mapper.SetColorLevel(127.5)
        self._image_actor = vtk.vtkActor2D()
        self._image_actor.SetMapper(self._mapper)
        self._image_actor.GetProperty().SetDisplayLocationToBackground()
        self.renderer.AddViewProp(self._image_actor)

    def show_volume(self, volume_node, orientation: str) -> None:
        """Put `volume_node` in the background and turn the view to `orientation`, fitted."""
        if orientation not in _ORIENTATION_NAMES:
            raise ValueError(f"orientation must be one of {sorted(_ORIENTATION_NAMES)}, not {orientation!r}")
        self.slice_node.SetOrientation(_ORIENTATION_NAMES[orientation])
        self.logic.GetSliceCompositeNode().SetBackgroundVolumeID(volume_node.GetID())
        self.logic.ResizeSliceNode(*self.size)
        self.logic.FitSliceToBackground()
        self.logic.SnapSliceOffsetToIJK()
        self._mapper.SetInputConnection(self.logic.GetImageDataConnection())

    def jump_to(self, ras: tuple[float, float, float]) -> None:
        """Move the slice to the plane through `ras`."""
        self.slice_node.JumpSliceByOffsetting(*ras)

    def render(self) -> np.ndarray:
        """The view as an (H, W, 3) uint8 image, top row first."""
        self.managers.RequestRender()
        self.window.Render()
        self.window.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.window)
        grab.SetInputBufferTypeToRGB()
        grab.ReadFrontBufferOff()
        grab.Update()
        output = grab.GetOutput()
        width, height, _ = output.GetDimensions()
        pixels = vtk_to_numpy(output.GetPointData().GetScalars()).reshape(height, width, -1)
        return np.ascontiguousarray(pixels[::-1, :, :3])

    def close(self) -> None:
        """Release the render window."""
        self.managers.SetMRMLDisplayableNode(None)
        self.window.Finalize()

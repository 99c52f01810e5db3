"""MRML bridge: volume ↔ 2-D slice images, the candidate preview, commits with Slicer's undo.

The only place in the Lib that imports ``slicer``. It works in the Slicer app and headless with the
``slicer-core`` wheel. Import what you need from its modules (nothing is re-exported here):

- :mod:`.geometry`: slice planes as Slicer's views show them, RAS ↔ pixel, boxes from RAS or a ROI.
- :mod:`.segments`: read and commit segment voxels, SPA's DICOM tags and terminology, Slicer's undo.
- :mod:`.overlay`: the preview of a round's candidates in its own segmentation node, and its colours.
- :mod:`.session`: :class:`~.session.SceneSession`, one interactive segmentation in a scene.
"""

"""SPA: preference-aligned interactive medical image segmentation.

The backend of the SPA 3D Slicer extension. Front ends (the ``spa`` command, the Slicer module)
talk to :class:`~SPASegmentationLib.session.Session`; numpy in, numpy out.
"""

__version__ = "0.1.0"

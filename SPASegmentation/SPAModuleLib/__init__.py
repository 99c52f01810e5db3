"""The SPA Segmentation module's parts besides the panel: the Qt-free Logic and the dependency installer.

``logic`` needs only MRML (``slicer``), numpy and ``requests``: tests import it on the headless
slicer-core runtime. ``installer`` talks to the user through Slicer's application (dialogs, pip).
"""

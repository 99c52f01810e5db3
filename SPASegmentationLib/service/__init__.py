"""``spa serve`` and its client: model work in its own process, one HTTP protocol for a local and a team server.

``protocol`` and ``client`` need only numpy and ``requests`` (the Slicer module's remote mode imports
nothing else); ``app`` and ``server`` hold the model.
"""

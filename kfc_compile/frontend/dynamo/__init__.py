"""The ``kfc`` torch.compile backend.

Per-graph scanning (``scan``), the live registry of a compiled model (``registry``), and the backend that rewrites
each dynamo graph and hands it to inductor (``backend``).
"""

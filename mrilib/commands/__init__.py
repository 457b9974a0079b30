"""One module per ``python -m mrilib`` command (see :mod:`mrilib.cli`)."""

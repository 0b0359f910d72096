"""Fast unit tests of ``rig`` itself; a package so shared modules import as ``tests.<name>``."""

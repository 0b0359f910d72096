"""Root pytest wiring: the rig's fixtures are plugins under ``fixtures/``.

Suites (``suites/``) and the rig's own tests (``tests/``) share these options:
``--boards FILE`` and ``--board NAME`` (repeatable). See ``fixtures/`` for each part.
"""

pytest_plugins = [
    "fixtures.lab",
    "fixtures.markers",
    "fixtures.farm",
    "fixtures.firmware",
    "fixtures.cloud",
    "fixtures.node",
    "fixtures.evidence",
    "fixtures.ota",
    "fixtures.anti_rollback",
    "fixtures.capture",
    "fixtures.impostor",
]

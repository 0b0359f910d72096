"""The provisioning wire protocol (ESP-IDF protocomm), both ends of the link.

* :mod:`~rig.protocomm.proto` — a field-list proto3 codec; :mod:`~rig.protocomm.messages` — every message;
* :mod:`~rig.protocomm.srp6a` — SRP6a for security 2; :mod:`~rig.protocomm.security` — security 0/1/2 sessions;
* :mod:`~rig.protocomm.endpoints` — the device's endpoint registry; :mod:`~rig.protocomm.httpd` — its SoftAP HTTP server.

The client transport (the phone-app role) is :mod:`rig.prov.transport_http`.
"""

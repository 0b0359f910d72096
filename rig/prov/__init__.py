"""The phone-app role: transports to a device's provisioning endpoints, and the flows built on them.

:mod:`rig.prov.transport_http` is the SoftAP HTTP transport (what esp-rainmaker-cli and the phone
apps use over the device's access point); the security sessions themselves are in
:mod:`rig.protocomm.security`. :mod:`rig.prov.session` is what the provisioning and
local-control clients share (transport, PoP, one session); :mod:`rig.prov.polling` how the app
waits on peers that never push.
"""

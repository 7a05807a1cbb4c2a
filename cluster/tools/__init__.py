"""Layer ``tools``: client-side tools that talk to a running cluster with the shim's client.

- ``admin``: admin requests (keys, concepts, intents, membership, replacing a member);
- ``demo``: the seed walkthrough through real ``tether`` processes.

Imports ``shim`` and everything below it; only ``cli`` imports it.
"""

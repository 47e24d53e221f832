"""gRPC for Surge (``services/surge.proto``, package ``surge.v1``).

* ``client``: what an external solver (or a prediction client) imports; needs only grpc and numpy.
* ``server``: the server a study runs when its config has ``ingest.enabled`` (and ``surge run`` /
  ``surge serve`` with ``--grpc-port``): Ingest, Study and Predict services on one port.
* ``predict``: the Predict service, serving the gateway's models with the REST checks.
* ``surge_pb2*``: generated stubs (``python -m services.ingest.generate``); not edited by hand.

Nothing is imported here, so that a client does not pay for the server's imports (Ray, torch).
"""

"""gRPC for Surge (``services/surge.proto``, package ``surge.v1``).

* ``client``: what an external solver (or a prediction client) imports; needs only grpc and numpy.
* ``server``: the server a study runs when its config has ``ingest.enabled`` (and ``surge run`` /
  ``surge serve`` with ``--grpc-port``): Ingest, Study and Predict services on one port, the token
  check, ``serve`` / ``release`` per port. What a study does with the calls:

  * ``feed``: ``StudyFeed``, a study as its external clients see it; ties the following together.
  * ``leases``: the simulations handed out to external clients, until each is settled once.
  * ``chunks``: what a client must send, and the check of one chunk against the problem spec.
  * ``credit``: a stream's credit window (bytes a client may send before the next Ack).
  * ``staging``: the memory of simulations being received, and the commit of a complete one into the buffer.
  * ``capacity``: the server's threads shared so that streams waiting for the trainer cannot take Predict's.
  * ``tls``: the port's certificate and key, a client's root certificate (PEM files, ``SURGE_GRPC_TLS_*``).
  * ``errors``: ``Reject``, how a call ends with a status and a message.
* ``predict``: the Predict service, serving the gateway's models with the REST checks.
* ``surge_pb2*``: generated stubs (``python -m services.ingest.generate``); not edited by hand.

Nothing is imported here, so that a client does not pay for the server's imports (Ray, torch).
"""

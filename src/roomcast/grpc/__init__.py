"""Stubs of the gRPC protocol, generated from ``proto/client_to_agent.proto``.

``client_to_agent_pb2`` (messages) and ``client_to_agent_pb2_grpc`` (services) are written
by ``scripts/build-proto.sh`` (``make proto``) and never edited by hand; the door that
serves them is :mod:`roomcast.transports.grpc`.
"""

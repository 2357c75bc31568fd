"""The front doors: Socket.IO, HTTP and gRPC. They translate the wire into ChatService
calls and back, and nothing more."""

"""roomcast's benchmarks: ``python -m bench`` (``make bench``).

roomcast against python-socketio and Node Socket.IO, started side by side on this machine's
loopback and driven by one lean load generator (``bench.generator``); the targets
(``bench.targets``), the scenarios A-E (``bench.scenarios``) and the report written into
docs/benchmarks.md (``bench.report``). See docs/benchmarks.md.
"""

#!/usr/bin/env bash
# Generate the gRPC stubs of roomcast's gRPC door from proto/client_to_agent.proto.
#
#   bash scripts/build-proto.sh [PYTHON]      (default: python3; needs grpcio-tools)
#
# The outputs land in src/roomcast/grpc/ (gitignored) and import as
# roomcast.grpc.client_to_agent_pb2 / client_to_agent_pb2_grpc. The proto path mapping
# -Iroomcast/grpc=proto makes protoc see the file as roomcast/grpc/client_to_agent.proto,
# so the generated import lines are package-qualified and no output is edited afterwards.
# Nothing is regenerated while every output is newer than the proto.
set -euo pipefail

python="${1:-python3}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

proto="proto/client_to_agent.proto"
out_dir="src/roomcast/grpc"
outputs=(
    "$out_dir/client_to_agent_pb2.py"
    "$out_dir/client_to_agent_pb2.pyi"
    "$out_dir/client_to_agent_pb2_grpc.py"
)

fresh=1
for output in "${outputs[@]}"; do
    if [[ ! -f "$output" || "$proto" -nt "$output" ]]; then
        fresh=0
    fi
done
if [[ "$fresh" == 1 ]]; then
    exit 0
fi

if ! "$python" -c 'import grpc_tools.protoc' >/dev/null 2>&1; then
    echo "build-proto: $python cannot import grpc_tools (pip install grpcio-tools)" >&2
    exit 1
fi

echo "build-proto: generating the gRPC stubs from $proto"
"$python" -m grpc_tools.protoc \
    -Iroomcast/grpc=proto \
    --python_out=src \
    --pyi_out=src \
    --grpc_python_out=src \
    "$proto"

for output in "${outputs[@]}"; do
    if [[ ! -f "$output" ]]; then
        echo "build-proto: protoc did not write $output" >&2
        exit 1
    fi
    touch "$output"
done

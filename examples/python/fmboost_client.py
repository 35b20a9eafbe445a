"""A small fmboost client in Python: submit -> watch -> result over the Pipeline gRPC API.

Stubs are generated from the repository's proto/ with grpcio-tools at run time, into a
temporary directory; the services are listed with grpc.reflection.v1alpha (what
grpcio-reflection's client speaks). It follows the API's retry contract (pipeline.proto):
Submit carries an idempotency key, so UNAVAILABLE and DEADLINE_EXCEEDED are retried with it;
a Watch that ends with UNAVAILABLE, or before a terminal event, is opened again.

    examples/python/run.sh --addr 127.0.0.1:50051 --out out.png [--token-file F]

Exits non-zero, saying why, on any failure.
"""

import argparse
import importlib
import struct
import subprocess
import sys
import tempfile
import time
import uuid

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

# Codes the contract lets a client retry Submit on, given the same idempotency key.
SUBMIT_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
ATTEMPTS = 30


def generate_stubs(proto_dir, out_dir):
    """pipeline_pb2 and pipeline_pb2_grpc for proto_dir/fmboost/v1/pipeline.proto."""
    command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}", f"--python_out={out_dir}",
               f"--grpc_python_out={out_dir}", "fmboost/v1/pipeline.proto"]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"python client: protoc failed ({run.returncode}): {run.stderr}")
    sys.path.insert(0, out_dir)
    return importlib.import_module("fmboost.v1.pipeline_pb2"), importlib.import_module("fmboost.v1.pipeline_pb2_grpc")


def list_services(channel):
    """Service names through grpc.reflection.v1alpha."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    for response in stub.ServerReflectionInfo(iter([request]), timeout=10):
        return sorted(service.name for service in response.list_services_response.service)
    raise SystemExit("python client: reflection gave no answer")


def _crc32c_table():
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


CRC32C_TABLE = _crc32c_table()


def crc32c(data):
    """CRC32C (Castagnoli), as in fmboost's Tensor.crc32c (the stdlib has only CRC-32)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def submit(stub, pb, spec, metadata):
    """Submits with retries that the idempotency key makes safe; the job id."""
    for attempt in range(ATTEMPTS):
        try:
            response = stub.Submit(pb.SubmitRequest(spec=spec), metadata=metadata, timeout=10)
            return response.job_id
        except grpc.RpcError as err:
            if err.code() not in SUBMIT_RETRYABLE or attempt == ATTEMPTS - 1:
                raise
            print(f"submit: {err.code().name}: {err.details()}; retrying with the same idempotency key", file=sys.stderr)
            time.sleep(min(0.2 * 2 ** attempt, 2.0))
    raise AssertionError("unreachable")


def watch(stub, pb, job_id, metadata):
    """Follows the job to its terminal event, watching again when a stream is cut."""
    for attempt in range(ATTEMPTS):
        try:
            for event in stub.Watch(pb.WatchRequest(job_id=job_id), metadata=metadata, timeout=120):
                kind = event.WhichOneof("event")
                if kind == "step":
                    continue
                print(f"watch: {kind}")
                if kind in ("completed", "failed", "cancelled"):
                    return event
            print("watch: the stream ended early; watching again", file=sys.stderr)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            print(f"watch: UNAVAILABLE: {err.details()}; watching again", file=sys.stderr)
        time.sleep(min(0.2 * 2 ** attempt, 2.0))
    raise SystemExit(f"python client: could not follow job {job_id}")


def get_result(stub, pb, job_id, metadata):
    """The PNG and the final latent (dtype, shape, data), chunks checked and joined."""
    png, latent, header = bytearray(), bytearray(), None
    request = pb.GetResultRequest(job_id=job_id, include_latent=True, chunk_bytes=16384)
    for chunk in stub.GetResult(request, metadata=metadata, timeout=60):
        part = chunk.WhichOneof("part")
        if part == "png":
            if chunk.png.offset != len(png):
                raise SystemExit(f"python client: PNG chunk at {chunk.png.offset} after {len(png)} bytes")
            png += chunk.png.data
        elif part == "latent":
            if chunk.latent.offset != len(latent):
                raise SystemExit(f"python client: latent chunk at {chunk.latent.offset} after {len(latent)} bytes")
            header = (chunk.latent.dtype, list(chunk.latent.shape), chunk.latent.crc32c)
            latent += chunk.latent.data
    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        raise SystemExit("python client: the result is not a PNG")
    if header is None or crc32c(bytes(latent)) != header[2]:
        raise SystemExit("python client: the latent is missing or fails its CRC32C")
    return bytes(png), header[1]


def png_size(png):
    width, height = struct.unpack(">II", png[16:24])
    return width, height


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", required=True, help="coordinator host:port")
    parser.add_argument("--proto-dir", required=True, help="the repository's proto/proto directory")
    parser.add_argument("--out", required=True, help="where to write the PNG")
    parser.add_argument("--token-file", help="bearer token file, when the coordinator wants one")
    parser.add_argument("--profile", default="sleep")
    args = parser.parse_args()

    metadata = []
    if args.token_file:
        with open(args.token_file) as f:
            metadata.append(("authorization", f"Bearer {f.read().strip()}"))

    with tempfile.TemporaryDirectory(prefix="fmboost-stubs-") as stubs:
        pb, pb_grpc = generate_stubs(args.proto_dir, stubs)
        with grpc.insecure_channel(args.addr) as channel:
            grpc.channel_ready_future(channel).result(timeout=20)
            services = list_services(channel)
            print("reflection (v1alpha): " + " ".join(services))
            if "fmboost.v1.Pipeline" not in services:
                raise SystemExit(f"python client: fmboost.v1.Pipeline not listed: {services}")
            stub = pb_grpc.PipelineStub(channel)

            # Bad input gets INVALID_ARGUMENT naming the field.
            bad = pb.JobSpec(text=pb.TextSource(prompt="x"), profile=args.profile, base=pb.BaseSettings(steps=0))
            try:
                stub.Submit(pb.SubmitRequest(spec=bad), metadata=metadata, timeout=10)
                raise SystemExit("python client: steps 0 was admitted")
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.INVALID_ARGUMENT or not err.details().startswith("base.steps"):
                    raise SystemExit(f"python client: steps 0 answered {err.code().name}: {err.details()}")

            # Unset optional fields take the profile's defaults.
            spec = pb.JobSpec(
                text=pb.TextSource(prompt="a lighthouse at dusk"),
                seed=7,
                profile=args.profile,
                base=pb.BaseSettings(width=64, height=64, steps=4),
                cfm=pb.CfmSettings(hops=1, steps=2),
                idempotency_key=f"python-example-{uuid.uuid4()}",
            )
            job_id = submit(stub, pb, spec, metadata)
            print(f"submitted {job_id}")
            # The same key returns the same job.
            again = stub.Submit(pb.SubmitRequest(spec=spec), metadata=metadata, timeout=10)
            if again.job_id != job_id or again.created:
                raise SystemExit(f"python client: resubmitting with the key gave {again}")
            event = watch(stub, pb, job_id, metadata)
            if event.WhichOneof("event") != "completed":
                raise SystemExit(f"python client: job {job_id} ended {event}")
            png, shape = get_result(stub, pb, job_id, metadata)
            if len(png) != event.completed.png_bytes:
                raise SystemExit(f"python client: {len(png)} PNG bytes, Completed said {event.completed.png_bytes}")
            with open(args.out, "wb") as f:
                f.write(png)
            width, height = png_size(png)
            print(f"python client: ok job={job_id} png={len(png)} bytes {width}x{height} latent={shape} crc32c=ok")


if __name__ == "__main__":
    try:
        main()
    except grpc.RpcError as err:
        raise SystemExit(f"python client: {err.code().name}: {err.details()}")

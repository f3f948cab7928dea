#!/usr/bin/env python3
"""An independent gRPC client (Python grpcio) for the FreeKV services.

Calls grpc.health.v1.Health/Check and lists the services through server reflection
(grpc.reflection.v1 and v1alpha), with a hand-written protobuf codec so it needs nothing but
grpcio. Prints one JSON object: {"health": "SERVING", "services": [...], "reflection": "v1"}.

    python3 grpc_probe.py 127.0.0.1:50051
"""
import json
import sys

import grpc


def varint(buf, i):
    shift = 0
    val = 0
    while True:
        b = buf[i]
        i += 1
        val |= (b & 0x7F) << shift
        if b < 0x80:
            return val, i
        shift += 7


def fields(buf):
    """Yields (field number, wire type, value) of a protobuf message."""
    i = 0
    while i < len(buf):
        key, i = varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, i = varint(buf, i)
        elif wt == 2:
            n, i = varint(buf, i)
            val = buf[i : i + n]
            i += n
        elif wt == 1:
            val = buf[i : i + 8]
            i += 8
        elif wt == 5:
            val = buf[i : i + 4]
            i += 4
        else:
            raise ValueError("unsupported wire type %d" % wt)
        yield num, wt, val


HEALTH = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def health(channel):
    call = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None, response_deserializer=None)
    resp = call(b"", timeout=5)  # HealthCheckRequest{service: ""} encodes to nothing
    status = 0
    for num, _, val in fields(resp):
        if num == 1:
            status = val
    return HEALTH.get(status, str(status))


def list_services(channel):
    # ServerReflectionRequest{list_services: ""}: field 7, length-delimited, empty.
    req = bytes([0x3A, 0x00])
    for version in ("v1", "v1alpha"):
        method = "/grpc.reflection.%s.ServerReflection/ServerReflectionInfo" % version
        call = channel.stream_stream(method, request_serializer=None, response_deserializer=None)
        try:
            for resp in call(iter([req]), timeout=5):
                names = []
                for num, _, val in fields(resp):
                    if num == 6:  # list_services_response
                        for n2, _, svc in fields(val):
                            if n2 == 1:  # repeated ServiceResponse service
                                for n3, _, name in fields(svc):
                                    if n3 == 1:
                                        names.append(name.decode())
                return sorted(names), version
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                continue
            raise
    return [], None


def main():
    target = sys.argv[1]
    with grpc.insecure_channel(target) as channel:
        h = health(channel)
        services, version = list_services(channel)
    print(json.dumps({"health": h, "services": services, "reflection": version}))


if __name__ == "__main__":
    main()

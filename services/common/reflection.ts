/**
 * Server reflection (grpc.reflection.v1 and v1alpha) over the project's .proto files, loaded
 * from proto/ at run time, plus grpc.health.v1, so grpcurl or any other language's client can
 * discover the services without our sources.
 */
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";
import * as protoLoader from "@grpc/proto-loader";
import { ReflectionService } from "@grpc/reflection";
import type { Server } from "@grpc/grpc-js";

/** The repository's proto/ folder, from services/common (tsx) or dist/services/common. */
export function protoRoot(): string {
  const here = dirname(fileURLToPath(import.meta.url));
  for (const c of [join(here, "..", "..", "proto"), join(here, "..", "..", "..", "proto")]) {
    if (existsSync(join(c, "freekv", "v1", "common.proto"))) return c;
  }
  throw new Error(`proto/ not found near ${here}`);
}

function healthProtoPath(): string {
  const require = createRequire(import.meta.url);
  return (require("grpc-health-check") as { protoPath: string }).protoPath;
}

/** Loads `files` (relative to proto/, e.g. "freekv/v1/compute.proto") and grpc.health.v1. */
export function loadPackageDefinition(files: string[]): protoLoader.PackageDefinition {
  const root = protoRoot();
  const health = healthProtoPath();
  return protoLoader.loadSync([...files, health], {
    includeDirs: [root, dirname(health)],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
}

/**
 * Reflection over `files`; with `services`, only those (and grpc.health.v1.Health) are listed, so
 * a service of an imported file that this server does not serve (compute.proto imports
 * kvstore.proto for the session-transfer messages) is not advertised.
 */
export function addReflection(server: Server, files: string[], services?: string[]): void {
  new ReflectionService(loadPackageDefinition(files), services ? { services: [...services, "grpc.health.v1.Health"] } : undefined).addToServer(server);
}

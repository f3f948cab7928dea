/**
 * Health (Check, Watch) and server reflection (grpc.reflection.v1 ListServices) over raw
 * grpc-js clients built from the upstream .proto files: what any other client would do.
 */
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const require = createRequire(import.meta.url);

function load(file: string, includeDir: string): grpc.GrpcObject {
  const def = protoLoader.loadSync(file, { includeDirs: [includeDir], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true });
  return grpc.loadPackageDefinition(def);
}

type Ctor = new (addr: string, creds: grpc.ChannelCredentials) => grpc.Client;

function healthCtor(): Ctor {
  const protoPath = (require("grpc-health-check") as { protoPath: string }).protoPath;
  const pkg = load(protoPath, dirname(protoPath)) as unknown as { grpc: { health: { v1: { Health: Ctor } } } };
  return pkg.grpc.health.v1.Health;
}

function reflectionCtor(): Ctor {
  const root = join(dirname(require.resolve("@grpc/reflection/package.json")), "build", "proto");
  const pkg = load("grpc/reflection/v1/reflection.proto", root) as unknown as { grpc: { reflection: { v1: { ServerReflection: Ctor } } } };
  return pkg.grpc.reflection.v1.ServerReflection;
}

export async function healthCheck(address: string, service = ""): Promise<string> {
  const client = new (healthCtor())(address, grpc.credentials.createInsecure()) as grpc.Client & Record<string, Function>;
  try {
    return await new Promise((resolve, reject) =>
      client.Check({ service }, { deadline: Date.now() + 5000 }, (err: grpc.ServiceError | null, res: { status: string }) => (err ? reject(err) : resolve(res.status))),
    );
  } finally {
    client.close();
  }
}

export interface HealthWatch {
  statuses: string[];
  /** Resolves when `status` has been seen. */
  waitFor(status: string, ms?: number): Promise<void>;
  ended: Promise<{ code?: number }>;
  cancel(): void;
}

export function healthWatch(address: string, service = ""): HealthWatch {
  const client = new (healthCtor())(address, grpc.credentials.createInsecure()) as grpc.Client & Record<string, Function>;
  const call = client.Watch({ service }) as grpc.ClientReadableStream<{ status: string }>;
  const statuses: string[] = [];
  const waiters: Array<() => void> = [];
  call.on("data", (m: { status: string }) => {
    statuses.push(m.status);
    for (const w of waiters.splice(0)) w();
  });
  const ended = new Promise<{ code?: number }>((resolve) => {
    call.on("error", (e: grpc.ServiceError) => resolve({ code: e.code }));
    call.on("end", () => resolve({}));
  });
  return {
    statuses,
    ended,
    waitFor(status: string, ms = 10_000) {
      return new Promise<void>((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`health Watch did not report ${status} (saw ${statuses.join(",")})`)), ms);
        const check = () => {
          if (statuses.includes(status)) {
            clearTimeout(t);
            resolve();
          } else waiters.push(check);
        };
        check();
      });
    },
    cancel() {
      call.cancel();
      client.close();
    },
  };
}

/** Service names listed by grpc.reflection.v1. */
export async function reflectionServices(address: string): Promise<string[]> {
  const client = new (reflectionCtor())(address, grpc.credentials.createInsecure()) as grpc.Client & Record<string, Function>;
  try {
    return await new Promise((resolve, reject) => {
      const call = client.ServerReflectionInfo({ deadline: Date.now() + 5000 }) as grpc.ClientDuplexStream<unknown, { list_services_response?: { service: Array<{ name: string }> } }>;
      call.on("data", (m) => {
        resolve((m.list_services_response?.service ?? []).map((s: { name: string }) => s.name).sort());
        call.end();
      });
      call.on("error", reject);
      call.write({ list_services: "*" });
    });
  } finally {
    client.close();
  }
}

/** Whether reflection can resolve a symbol (file_containing_symbol) to its file descriptor. */
export async function reflectionHasSymbol(address: string, symbol: string): Promise<boolean> {
  const client = new (reflectionCtor())(address, grpc.credentials.createInsecure()) as grpc.Client & Record<string, Function>;
  try {
    return await new Promise((resolve, reject) => {
      const call = client.ServerReflectionInfo({ deadline: Date.now() + 5000 }) as grpc.ClientDuplexStream<unknown, { file_descriptor_response?: { file_descriptor_proto: Buffer[] }; error_response?: unknown }>;
      call.on("data", (m) => {
        resolve((m.file_descriptor_response?.file_descriptor_proto.length ?? 0) > 0);
        call.end();
      });
      call.on("error", reject);
      call.write({ file_containing_symbol: symbol });
    });
  } finally {
    client.close();
  }
}

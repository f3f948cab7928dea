/** grpc.health.v1 Check from outside a service (the demo's view of an operator's probe). */
import { createRequire } from "node:module";
import { dirname } from "node:path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

export async function healthCheck(address: string, service = ""): Promise<string> {
  const protoPath = (createRequire(import.meta.url)("grpc-health-check") as { protoPath: string }).protoPath;
  const def = protoLoader.loadSync(protoPath, { includeDirs: [dirname(protoPath)], enums: String, defaults: true });
  const Health = (grpc.loadPackageDefinition(def) as unknown as { grpc: { health: { v1: { Health: new (a: string, c: grpc.ChannelCredentials) => grpc.Client & Record<string, Function> } } } }).grpc.health.v1.Health;
  const client = new Health(address, grpc.credentials.createInsecure());
  try {
    return await new Promise((resolve, reject) =>
      client.Check({ service }, { deadline: Date.now() + 5000 }, (err: grpc.ServiceError | null, res: { status: string }) => (err ? reject(err) : resolve(res.status))),
    );
  } finally {
    client.close();
  }
}

/**
 * As a command (an exec probe for a server bound to the pod's loopback, which the kubelet's own
 * gRPC probe cannot reach): `node dist/tools/dev/health-probe.js HOST:PORT [SERVICE]` exits 0
 * when the service reports SERVING, 1 otherwise (the status or the error on stderr).
 */
if (process.argv[1] && import.meta.url === new URL(`file://${process.argv[1]}`).href) {
  const [address, service = ""] = process.argv.slice(2);
  if (!address) {
    process.stderr.write("usage: health-probe HOST:PORT [SERVICE]\n");
    process.exit(2);
  }
  healthCheck(address, service).then(
    (status) => {
      if (status !== "SERVING") process.stderr.write(`${address} ${service || "(server)"}: ${status}\n`);
      process.exit(status === "SERVING" ? 0 : 1);
    },
    (e: unknown) => {
      process.stderr.write(`${address} ${service || "(server)"}: ${(e as Error).message}\n`);
      process.exit(1);
    },
  );
}

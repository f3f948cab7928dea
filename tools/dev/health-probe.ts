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

/**
 * TLS by configuration: a server with a certificate and key serves TLS (with a client CA, it
 * requires and checks client certificates: mutual TLS); a client with a CA file checks the
 * server's certificate against it (with its own certificate and key, it presents them). Without
 * the files, plaintext (a pod's loopback, or a mesh that encrypts). Files are read once at start;
 * a missing or unreadable file stops the process with the setting's name.
 */
import { readFileSync } from "node:fs";
import type { ServerOptions as HttpsOptions } from "node:https";
import { credentials, ServerCredentials, type ChannelCredentials } from "@grpc/grpc-js";

function read(setting: string, path: string): Buffer {
  try {
    return readFileSync(path);
  } catch (e) {
    throw new Error(`${setting}=${path}: ${(e as Error).message}`);
  }
}

export interface ServerTls {
  cert?: string;
  key?: string;
  clientCa?: string;
}

/** Server credentials from `<prefix>_TLS_CERT_FILE`, `_KEY_FILE`, `_CLIENT_CA_FILE` (paths). */
export function serverCredentials(prefix: string, tls: ServerTls): ServerCredentials {
  if (!tls.cert && !tls.key && !tls.clientCa) return ServerCredentials.createInsecure();
  if (!tls.cert || !tls.key) throw new Error(`${prefix}_TLS_CERT_FILE and ${prefix}_TLS_KEY_FILE go together`);
  const ca = tls.clientCa ? read(`${prefix}_TLS_CLIENT_CA_FILE`, tls.clientCa) : null;
  return ServerCredentials.createSsl(ca, [{ cert_chain: read(`${prefix}_TLS_CERT_FILE`, tls.cert), private_key: read(`${prefix}_TLS_KEY_FILE`, tls.key) }], !!ca);
}

/**
 * The same settings for an HTTPS server (the OpenAI front beside the gRPC port): undefined without
 * them (plaintext); with a client CA, client certificates are required and checked.
 */
export function httpsOptions(prefix: string, tls: ServerTls): HttpsOptions | undefined {
  if (!tls.cert && !tls.key && !tls.clientCa) return undefined;
  if (!tls.cert || !tls.key) throw new Error(`${prefix}_TLS_CERT_FILE and ${prefix}_TLS_KEY_FILE go together`);
  const ca = tls.clientCa ? read(`${prefix}_TLS_CLIENT_CA_FILE`, tls.clientCa) : undefined;
  return { cert: read(`${prefix}_TLS_CERT_FILE`, tls.cert), key: read(`${prefix}_TLS_KEY_FILE`, tls.key), ...(ca ? { ca, requestCert: true, rejectUnauthorized: true } : {}) };
}

export interface ClientTls {
  ca?: string;
  cert?: string;
  key?: string;
}

/** Channel credentials from `<prefix>_TLS_CA_FILE` and, for mutual TLS, `_TLS_CLIENT_CERT_FILE` / `_TLS_CLIENT_KEY_FILE`. */
export function channelCredentials(prefix: string, tls: ClientTls): ChannelCredentials {
  if (!tls.ca && !tls.cert && !tls.key) return credentials.createInsecure();
  if (!tls.ca) throw new Error(`${prefix}_TLS_CA_FILE is needed with a client certificate`);
  if (!!tls.cert !== !!tls.key) throw new Error(`${prefix}_TLS_CLIENT_CERT_FILE and ${prefix}_TLS_CLIENT_KEY_FILE go together`);
  return credentials.createSsl(
    read(`${prefix}_TLS_CA_FILE`, tls.ca),
    tls.key ? read(`${prefix}_TLS_CLIENT_KEY_FILE`, tls.key) : null,
    tls.cert ? read(`${prefix}_TLS_CLIENT_CERT_FILE`, tls.cert) : null,
  );
}

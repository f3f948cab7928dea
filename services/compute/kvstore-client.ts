/**
 * The kvstore's gRPC client as compute uses it: promise-returning calls with a deadline,
 * aborted with the caller's AbortSignal.
 */
import {
  credentials,
  Metadata,
  type ChannelCredentials,
  type CallOptions,
  type ClientReadableStream,
  type ClientUnaryCall,
  type ClientWritableStream,
  type ServiceError as GrpcError,
} from "@grpc/grpc-js";
import {
  KvStoreServiceClient,
  KvStoreTransferServiceClient,
  type ExportSessionResponse,
  type ImportSessionRequest,
  type ImportSessionResponse,
  type AttachSessionRequest,
  type AttachSessionResponse,
  type CommitPagesRequest,
  type CommitPagesResponse,
  type GetStatsResponse,
  type ListSessionsResponse,
  type ReleaseSessionResponse,
  type ReserveContextRequest,
  type ReserveContextResponse,
} from "../../proto/gen/freekv/v1/kvstore.js";

type Unary<Req, Res> = (req: Req, md: Metadata, opts: Partial<CallOptions>, cb: (err: GrpcError | null, res: Res) => void) => ClientUnaryCall;

export class KvStoreClient {
  private readonly raw: KvStoreServiceClient;
  /** Session transfer (export, import) for moves between pods; the same channel settings. */
  private readonly transfer: KvStoreTransferServiceClient;

  constructor(
    readonly address: string,
    private readonly deadlineMs = 10_000,
    creds: ChannelCredentials = credentials.createInsecure(),
  ) {
    this.raw = new KvStoreServiceClient(address, creds, { "grpc.max_receive_message_length": 64 << 20 });
    this.transfer = new KvStoreTransferServiceClient(address, creds, { "grpc.max_receive_message_length": 64 << 20, "grpc.max_send_message_length": 64 << 20 });
  }

  private call<Req, Res>(fn: Unary<Req, Res>, req: Req, signal?: AbortSignal): Promise<Res> {
    return new Promise((resolve, reject) => {
      // The cancel listener goes with the call: a session's many commits share its call's signal.
      const onAbort = () => c.cancel();
      const c = fn.call(this.raw, req, new Metadata(), { deadline: Date.now() + this.deadlineMs }, (err, res) => {
        signal?.removeEventListener("abort", onAbort);
        if (err) reject(err);
        else resolve(res);
      });
      signal?.addEventListener("abort", onAbort, { once: true });
      if (signal?.aborted) c.cancel();
    });
  }

  attach(req: Partial<AttachSessionRequest> & { sessionId: string }, signal?: AbortSignal): Promise<AttachSessionResponse> {
    const full: AttachSessionRequest = { geometry: undefined, retrieval: undefined, maxContextTokens: 0, metadata: Buffer.alloc(0), callerCommits: false, creationToken: "", createOnly: false, ...req };
    return this.call(this.raw.attachSession as Unary<AttachSessionRequest, AttachSessionResponse>, full, signal);
  }
  commit(req: CommitPagesRequest, signal?: AbortSignal): Promise<CommitPagesResponse> {
    return this.call(this.raw.commitPages as Unary<CommitPagesRequest, CommitPagesResponse>, req, signal);
  }
  /** Commits memory for `tokens` tokens of the session's context (ReserveContext); `callerCommits`: see ReserveContextRequest. */
  reserve(sessionId: string, tokens: number, signal?: AbortSignal, callerCommits = false): Promise<ReserveContextResponse> {
    return this.call(this.raw.reserveContext as Unary<ReserveContextRequest, ReserveContextResponse>, { sessionId, tokens, callerCommits }, signal);
  }
  /** `creationToken`: release only the session that an attach with this token created, if nobody opened it since (ReleaseSessionRequest). */
  release(sessionId: string, signal?: AbortSignal, creationToken = ""): Promise<ReleaseSessionResponse> {
    return this.call(this.raw.releaseSession as Unary<{ sessionId: string; creationToken: string }, ReleaseSessionResponse>, { sessionId, creationToken }, signal);
  }
  stats(signal?: AbortSignal): Promise<GetStatsResponse> {
    return this.call(this.raw.getStats as Unary<object, GetStatsResponse>, {}, signal);
  }
  list(signal?: AbortSignal): Promise<ListSessionsResponse> {
    return this.call(this.raw.listSessions as Unary<object, ListSessionsResponse>, {}, signal);
  }

  /** The session's export stream (header, chunks, digest), ending by `deadline` (ms since the epoch); `moveId` goes into its header. */
  exportSession(sessionId: string, chunkBytes: number, deadline: number, moveId?: string): ClientReadableStream<ExportSessionResponse> {
    return this.transfer.exportSession({ sessionId, chunkBytes, moveId }, new Metadata(), { deadline });
  }

  /** An import stream; `done` settles with the kvstore's answer once the stream ended (or failed). */
  importSession(deadline: number): { stream: ClientWritableStream<ImportSessionRequest>; done: Promise<ImportSessionResponse> } {
    let stream!: ClientWritableStream<ImportSessionRequest>;
    const done = new Promise<ImportSessionResponse>((resolve, reject) => {
      stream = this.transfer.importSession(new Metadata(), { deadline }, (err, res) => (err ? reject(err) : resolve(res!)));
    });
    done.catch(() => {});
    return { stream, done };
  }

  /** Resolves once the channel is connected (the kvstore is up), or rejects after `ms`. */
  waitForReady(ms: number): Promise<void> {
    return new Promise((resolve, reject) => this.raw.waitForReady(Date.now() + ms, (err) => (err ? reject(err) : resolve())));
  }

  close(): void {
    this.raw.close();
    this.transfer.close();
  }
}

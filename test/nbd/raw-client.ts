/**
 * A minimal raw NBD test client: bytes in, bytes out, no protocol logic, so
 * tests can send anything (malformed handshakes, garbage requests) and read
 * exactly what the server answers.
 */
import net from 'node:net';

export class Raw {
  private chunks: Buffer[] = [];
  private length = 0;
  closed = false;
  private wake: (() => void) | null = null;
  readonly closedPromise: Promise<void>;

  private constructor(readonly socket: net.Socket) {
    socket.setNoDelay(true);
    socket.on('data', (c: Buffer) => {
      this.chunks.push(c);
      this.length += c.length;
      this.poke();
    });
    socket.on('error', () => {});
    this.closedPromise = new Promise((r) =>
      socket.on('close', () => {
        this.closed = true;
        this.poke();
        r();
      }),
    );
  }

  static connect(port: number, allowHalfOpen = false): Promise<Raw> {
    return new Promise((resolve, reject) => {
      const s = net.connect({ host: '127.0.0.1', port, allowHalfOpen }, () => {
        s.off('error', reject);
        resolve(new Raw(s));
      });
      s.once('error', reject);
    });
  }

  private poke(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  get available(): number {
    return this.length;
  }

  /** Forget what was received so far (replies to garbage are not examined). */
  discard(): void {
    this.chunks = [];
    this.length = 0;
  }

  write(b: Buffer): void {
    if (!this.socket.destroyed) this.socket.write(b);
  }

  async read(n: number, timeoutMs = 10_000): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.length < n) {
      if (this.closed) throw new Error(`connection closed with ${this.length} of ${n} bytes`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${n} bytes (have ${this.length})`);
      await new Promise<void>((r) => {
        const t = setTimeout(r, left);
        this.wake = () => {
          clearTimeout(t);
          r();
        };
      });
    }
    const all = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks);
    const out = Buffer.from(all.subarray(0, n));
    const rest = all.subarray(n);
    this.chunks = rest.length ? [rest] : [];
    this.length = rest.length;
    return out;
  }

  async waitClosed(timeoutMs = 2000): Promise<boolean> {
    let t: NodeJS.Timeout | undefined;
    const r = await Promise.race([this.closedPromise.then(() => true), new Promise<boolean>((res) => (t = setTimeout(() => res(false), timeoutMs)))]);
    clearTimeout(t);
    return r;
  }

  destroy(): void {
    this.socket.destroy();
  }
}

/**
 * Bytes received from a socket, kept as the chunks that arrived (no copy)
 * until a reader needs a contiguous run that spans chunks.
 */
const EMPTY = Buffer.alloc(0);

export class ByteQueue {
  private chunks: Buffer[] = [];
  /** Read position inside chunks[0]. */
  private head = 0;
  length = 0;

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.length += chunk.length;
  }

  /**
   * Make the first `n` bytes contiguous and return [buffer, position] where
   * they start. The caller must check `length >= n` first.
   */
  contiguous(n: number): [Buffer, number] {
    if (this.chunks.length === 0) return [EMPTY, 0];
    const first = this.chunks[0];
    if (first.length - this.head >= n) return [first, this.head];
    // Merge just enough leading chunks to cover n bytes.
    let have = first.length - this.head;
    let count = 1;
    while (have < n) have += this.chunks[count++].length;
    const merged = Buffer.allocUnsafe(have);
    let pos = first.copy(merged, 0, this.head);
    for (let i = 1; i < count; i++) pos += this.chunks[i].copy(merged, pos);
    this.chunks.splice(0, count, merged);
    this.head = 0;
    return [merged, 0];
  }

  /** Drop n bytes from the front. */
  skip(n: number): void {
    this.length -= n;
    while (n > 0) {
      const first = this.chunks[0];
      const left = first.length - this.head;
      if (n < left) {
        this.head += n;
        return;
      }
      n -= left;
      this.chunks.shift();
      this.head = 0;
    }
  }

  /** Remove and return the first n bytes (a view when they sit in one chunk). */
  take(n: number): Buffer {
    if (n === 0) return EMPTY;
    const [buf, pos] = this.contiguous(n);
    const out = buf.subarray(pos, pos + n);
    this.skip(n);
    return out;
  }

  clear(): void {
    this.chunks = [];
    this.head = 0;
    this.length = 0;
  }
}

/**
 * Progress of a long command (resync, verify, send/receive, rejoin,
 * migrate) on stderr, never stdout: stdout carries the result, a --json
 * document or a send stream. On a terminal: a bar with rate and ETA
 * (cli-progress), redrawn in place. Elsewhere (a log, a pipe): a plain line
 * every few seconds. With --json: nothing, so a script reads only the JSON.
 */
import cliProgress from 'cli-progress';
import { formatSize } from '../util/size.js';

export interface Sample {
  done: number;
  /** 0 or undefined: not known (a send stream's length). */
  total?: number;
  /** Bytes a second; computed from the samples when not given. */
  rate?: number;
  /** A word after the numbers ("3 MiB out of sync"). */
  note?: string;
}

/**
 * Plain lines (not a terminal): the first after this long, then one each
 * this long (DUET_PROGRESS_EVERY_MS); a command that ends sooner prints
 * none, so a quick refusal is still the one line on stderr it always was.
 */
function plainEveryMs(): number {
  const v = Number(process.env.DUET_PROGRESS_EVERY_MS);
  return Number.isFinite(v) && v >= 0 ? v : 3000;
}

export function eta(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return '?';
  if (seconds < 60) return `${Math.ceil(seconds)}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m${String(Math.round(seconds % 60)).padStart(2, '0')}s`;
  return `${Math.floor(seconds / 3600)}h${String(Math.round((seconds % 3600) / 60)).padStart(2, '0')}m`;
}

export class ProgressView {
  private bar: cliProgress.SingleBar | undefined;
  private readonly createdAt = Date.now();
  private lastPlain = 0;
  private first: { at: number; done: number } | undefined;
  private stopped = false;

  constructor(
    private readonly title: string,
    private readonly mode: 'tty' | 'plain' | 'off',
    private readonly stream: NodeJS.WriteStream = process.stderr,
  ) {}

  /** The mode for a command: off with --json, a bar on a terminal, lines otherwise. */
  static for(title: string, o: { json?: boolean; stream?: NodeJS.WriteStream } = {}): ProgressView {
    const stream = o.stream ?? process.stderr;
    return new ProgressView(title, o.json ? 'off' : stream.isTTY ? 'tty' : 'plain', stream);
  }

  update(s: Sample): void {
    if (this.stopped || this.mode === 'off') return;
    const now = Date.now();
    if (!this.first) this.first = { at: now, done: s.done };
    const rate = s.rate ?? (now > this.first.at ? ((s.done - this.first.done) * 1000) / (now - this.first.at) : 0);
    const total = s.total && s.total > 0 ? s.total : 0;
    const left = total > 0 && rate > 0 ? (total - s.done) / rate : NaN;
    const payload = { doneH: formatSize(s.done), totalH: total ? formatSize(total) : '?', rateH: `${formatSize(Math.round(rate))}/s`, etaH: eta(left), note: s.note ? `, ${s.note}` : '' };
    if (this.mode === 'tty') {
      if (!this.bar) {
        this.bar = new cliProgress.SingleBar(
          {
            stream: this.stream,
            format: total ? `${this.title} [{bar}] {percentage}% | {doneH} of {totalH} | {rateH} | ETA {etaH}{note}` : `${this.title} {doneH} | {rateH}{note}`,
            hideCursor: true,
            clearOnComplete: false,
            barsize: 30,
            etaBuffer: 20,
            fps: 5,
          },
          cliProgress.Presets.shades_classic,
        );
        this.bar.start(total || 1, 0, payload);
      }
      if (total) this.bar.setTotal(total);
      this.bar.update(total ? Math.min(s.done, total) : 0, payload);
      return;
    }
    const every = plainEveryMs();
    if (now - this.createdAt < every || now - this.lastPlain < every) return;
    this.lastPlain = now;
    const pct = total ? `${Math.floor((100 * s.done) / total)}% (${payload.doneH} of ${payload.totalH}), ` : `${payload.doneH}, `;
    this.stream.write(`${this.title}: ${pct}${payload.rateH}${total ? `, ETA ${payload.etaH}` : ''}${payload.note}\n`);
  }

  stop(): void {
    if (this.stopped) return;
    this.stopped = true;
    this.bar?.stop();
  }
}

/**
 * Show the progress of `work` while it runs: `sample` is asked every
 * `everyMs` (undefined: nothing to show now). A failing sample is skipped:
 * the command itself reports what matters.
 */
export async function withProgress<T>(view: ProgressView, work: Promise<T>, sample: () => Promise<Sample | undefined>, everyMs = 1000): Promise<T> {
  let done = false;
  // The pause between samples ends early when the work does (an unref'd timer would let the process
  // exit while the result waits to be printed).
  let wake: () => void = () => undefined;
  let timer: NodeJS.Timeout | undefined;
  const watch = (async () => {
    while (!done) {
      await new Promise<void>((resolve) => {
        wake = resolve;
        timer = setTimeout(resolve, everyMs);
      });
      if (done) break;
      try {
        const s = await sample();
        if (s && !done) view.update(s);
      } catch {
        // The node is busy or restarting.
      }
    }
  })();
  try {
    return await work;
  } finally {
    done = true;
    clearTimeout(timer);
    wake();
    view.stop();
    await watch;
  }
}

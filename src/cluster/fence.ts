/**
 * The fence command of the cluster file (`fence: {command, timeout}`): a
 * script the admin provides that powers a node off for good (IPMI, a smart
 * plug, a hypervisor's API), as Pacemaker's fence agents do. duet runs
 *
 *     sh -c 'COMMAND "$1" "$2"' duet-fence NODE ACTION
 *
 * with ACTION `off` before a takeover, or `status` for `duet fence test`
 * (a dry run: the script should only check that it can reach the fence
 * device). The node and action are also in DUET_FENCE_NODE and
 * DUET_FENCE_ACTION. Exit 0 means done; anything else, or no exit within
 * the timeout (the whole process group is killed then), is a failure that
 * blocks the takeover: a node that may still be writing must never have
 * its VMs booted elsewhere.
 */
import { spawn } from 'node:child_process';

export interface FenceResult {
  ok: boolean;
  exitCode: number | null;
  signal: string | null;
  timedOut: boolean;
  ms: number;
  /** The last lines the command printed (stdout and stderr), at most OUTPUT_MAX bytes. */
  output: string;
  /** One line for people. */
  message: string;
}

const OUTPUT_MAX = 2000;

export function runFence(command: string, node: string, action: 'off' | 'status', timeoutMs: number, env: Record<string, string> = {}): Promise<FenceResult> {
  const t0 = Date.now();
  return new Promise((resolve) => {
    let output = '';
    const keep = (b: Buffer): void => {
      output = (output + b.toString('utf8')).slice(-OUTPUT_MAX);
    };
    let child;
    try {
      child = spawn('/bin/sh', ['-c', `${command} "$1" "$2"`, 'duet-fence', node, action], {
        env: { ...process.env, ...env, DUET_FENCE_NODE: node, DUET_FENCE_ACTION: action },
        stdio: ['ignore', 'pipe', 'pipe'],
        // Its own process group: a timeout kills whatever it started too.
        detached: true,
      });
    } catch (err) {
      resolve({ ok: false, exitCode: null, signal: null, timedOut: false, ms: 0, output: '', message: `fence command could not start: ${(err as Error).message}` });
      return;
    }
    child.stdout.on('data', keep);
    child.stderr.on('data', keep);
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      try {
        process.kill(-child.pid!, 'SIGKILL');
      } catch {
        child.kill('SIGKILL');
      }
    }, timeoutMs);
    child.once('error', (err) => {
      clearTimeout(timer);
      resolve({ ok: false, exitCode: null, signal: null, timedOut: false, ms: Date.now() - t0, output, message: `fence command could not start: ${err.message}` });
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      const ms = Date.now() - t0;
      const last = output.trim().split('\n').pop()?.slice(0, 200) ?? '';
      const ok = code === 0 && !timedOut;
      const what = timedOut ? `did not finish within ${Math.round(timeoutMs / 1000)} s (killed)` : code === 0 ? `succeeded in ${ms} ms` : signal ? `was killed by ${signal}` : `failed with exit code ${code}`;
      resolve({ ok, exitCode: code, signal, timedOut, ms, output, message: `fence command (${action} ${node}) ${what}${last ? `: ${last}` : ''}` });
    });
  });
}

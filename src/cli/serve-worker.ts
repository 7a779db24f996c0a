/** Entry point of a `duet serve` worker thread (see serve-workers.ts). */
import { parentPort, threadId, workerData } from 'node:worker_threads';
import { StaticExports } from '../nbd/exports.js';
import { NbdServer } from '../nbd/server.js';
import { createLogger } from '../util/log.js';
import { openExports, tlsSettingsOf } from './serve.js';
import type { FromWorker, ToWorker, WorkerSetup } from './serve-workers.js';

const port = parentPort!;
const setup = workerData as WorkerSetup;
const log = createLogger('duet-serve').child({ worker: threadId });
const post = (m: FromWorker): void => port.postMessage(m);

async function main(): Promise<void> {
  let opened;
  try {
    // The main thread holds the disks' claims for the whole process.
    opened = await openExports(setup.exports, setup.readOnly, false);
  } catch (err) {
    post({ type: 'failed', message: (err as Error).message });
    port.close();
    return;
  }
  const { devices, exports } = opened;
  const server = new NbdServer({
    exports: new StaticExports(exports),
    log,
    tls: setup.tls ? tlsSettingsOf(setup.tls) : undefined,
    onConnections: (connections) => post({ type: 'load', connections }),
  });
  port.on('message', (m: ToWorker) => {
    if (m.type === 'connection') {
      server.adopt(m.fd, m.peer);
      return;
    }
    void (async () => {
      await server.close();
      for (const d of devices) {
        if (!d.capabilities.readOnly) await d.flush();
        await d.close();
      }
      post({ type: 'stopped', stats: server.stats });
      port.close();
    })();
  });
  post({ type: 'ready' });
}

void main();

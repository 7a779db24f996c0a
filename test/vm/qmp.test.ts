/**
 * The QMP client against a scripted QMP server on a unix socket: the
 * greeting and capabilities (oob enabled only when offered), answers matched
 * by id whatever their order, events, an answer after its command timed out
 * ignored, a connection that closes failing what is pending, QEMU's errors
 * as QmpError.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { QmpClient, QmpError } from '../../src/vm/qmp.js';

type Script = (msg: Record<string, unknown>, send: (m: unknown) => void, socket: net.Socket) => void;

async function fakeQemu(t: { after(fn: () => unknown): void }, oob: boolean, script: Script): Promise<string> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-qmp-'));
  const sock = path.join(dir, 'qmp.sock');
  const server = net.createServer((s) => {
    const send = (m: unknown): void => void s.write(`${JSON.stringify(m)}\r\n`);
    send({ QMP: { version: { qemu: { major: 7, minor: 2, micro: 0 } }, capabilities: oob ? ['oob'] : [] } });
    let buf = '';
    s.on('data', (b) => {
      buf += b.toString();
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const m = JSON.parse(buf.slice(0, nl)) as Record<string, unknown>;
        buf = buf.slice(nl + 1);
        if (m.execute === 'qmp_capabilities') send({ return: {}, id: m.id, enabled: (m.arguments as { enable?: string[] } | undefined)?.enable ?? [] });
        else script(m, send, s);
      }
    });
    s.on('error', () => undefined);
  });
  await new Promise<void>((resolve) => server.listen(sock, resolve));
  t.after(() => {
    server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return sock;
}

test('answers are matched by id in any order; events reach listeners; errors are QmpErrors; oob only when offered', async (t) => {
  const held: { m: Record<string, unknown>; send: (m: unknown) => void }[] = [];
  const sock = await fakeQemu(t, true, (m, send) => {
    if (m.execute === 'slow' || m.execute === 'fast') {
      held.push({ m, send });
      if (held.length === 2) {
        // Answer the second first, with an event between.
        send({ return: { who: held[1].m.execute }, id: held[1].m.id });
        send({ event: 'RESUME', data: {}, timestamp: { seconds: 1, microseconds: 0 } });
        send({ return: { who: held[0].m.execute }, id: held[0].m.id });
      }
    } else if (m.execute === 'bad') send({ error: { class: 'GenericError', desc: 'no such thing' }, id: m.id });
    else if (m['exec-oob'] === 'yank') send({ return: {}, id: m.id });
  });
  const qmp = await QmpClient.connect(sock);
  t.after(() => qmp.close());
  assert.equal(qmp.oob, true);
  assert.equal(qmp.version, '7.2.0');
  const events: string[] = [];
  qmp.on('event', (e) => events.push(e.event));
  const [a, b] = await Promise.all([qmp.execute<{ who: string }>('slow'), qmp.execute<{ who: string }>('fast')]);
  assert.deepEqual([a.who, b.who], ['slow', 'fast']);
  assert.deepEqual(events, ['RESUME']);
  await assert.rejects(qmp.execute('bad'), (err: Error) => err instanceof QmpError && err.desc === 'no such thing');
  await qmp.execute('yank', { instances: [] }, { oob: true });
});

test('an answer after its command timed out is ignored; a closed connection fails what is pending and what comes after', async (t) => {
  let late: (() => void) | undefined;
  let sockRef: net.Socket | undefined;
  const sock = await fakeQemu(t, false, (m, send, s) => {
    sockRef = s;
    if (m.execute === 'stuck') late = () => send({ return: { late: true }, id: m.id });
    if (m.execute === 'next') send({ return: { next: true }, id: m.id });
  });
  const qmp = await QmpClient.connect(sock);
  assert.equal(qmp.oob, false);
  await assert.rejects(qmp.execute('stuck', undefined, { timeoutMs: 100 }), /no answer from QEMU within 100 ms/);
  late!();
  assert.deepEqual(await qmp.execute('next'), { next: true });
  const pending = qmp.execute('stuck', undefined, { timeoutMs: 5000 });
  const closed = new Promise<void>((resolve) => qmp.once('close', resolve));
  sockRef!.destroy();
  await assert.rejects(pending, /connection to QEMU closed|ECONNRESET/);
  await closed;
  await assert.rejects(qmp.execute('next'), /closed/);
});

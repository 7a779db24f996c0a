/**
 * A CLI call that waits long for its answer (a verify, a migration) has
 * nothing in flight: if the node loses power, TCP alone would wait forever
 * on the half-open connection. Keepalive probes end the wait with a clear
 * error; a node that is up answers them, however long its command runs.
 * The power cut is an iptables rule dropping everything the node sends
 * (its kernel's answers to the probes included).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { execFileSync } from 'node:child_process';
import { callApi, type ApiTarget } from '../../src/api/client.js';
import { UserError } from '../../src/util/errors.js';
import { iptablesSkip } from '../e2e/cluster-harness.js';

const CLIENT = '127.0.0.71';
const NODE = '127.0.0.72';

/** A node whose commands never answer until `answer()`; `received` once the request is in. */
async function silentNode(t: { after: (fn: () => Promise<void> | void) => void }): Promise<{ port: number; received: Promise<void>; answer: () => void }> {
  let answer = (): void => undefined;
  let gotIt = (): void => undefined;
  const received = new Promise<void>((resolve) => (gotIt = resolve));
  const server = http.createServer((req, res) => {
    req.resume();
    req.on('end', () => {
      gotIt();
      answer = () => res.writeHead(200, { 'content-type': 'application/json' }).end('{"answered":true}');
    });
  });
  await new Promise<void>((resolve) => server.listen(0, NODE, resolve));
  t.after(() => new Promise<void>((resolve) => (server.closeAllConnections(), server.close(() => resolve()))));
  return { port: (server.address() as AddressInfo).port, received, answer: () => answer() };
}

function target(port: number): ApiTarget {
  return { host: NODE, port, token: 'x'.repeat(43), localAddress: CLIENT, what: 'node alpha' };
}

const outcome = (p: Promise<unknown>): Promise<string> =>
  p.then(
    (v) => `answered ${JSON.stringify(v)}`,
    (err: Error) => `${err instanceof UserError ? 'UserError' : err.name}: ${err.message}`,
  );

test('a node that loses power while the CLI waits for a long command: the call ends with a clear error, not never', { skip: iptablesSkip(), timeout: 60_000 }, async (t) => {
  const node = await silentNode(t);
  const call = outcome(callApi(target(node.port), { cmd: 'resource.verify', resource: 'r0' }, { keepAliveMs: 1000 }));
  await node.received;
  const rule = ['OUTPUT', '-s', NODE, '-d', CLIENT, '-p', 'tcp', '--sport', String(node.port), '-j', 'DROP', '-m', 'comment', '--comment', 'duet-test-keepalive'];
  execFileSync('iptables', ['-I', ...rule]);
  t.after(() => void execFileSync('iptables', ['-D', ...rule]));
  let timer: NodeJS.Timeout | undefined;
  const result = await Promise.race([call, new Promise<string>((resolve) => (timer = setTimeout(() => resolve('still waiting after 40 s'), 40_000)))]);
  clearTimeout(timer);
  assert.match(result, /^UserError: node alpha at 127\.0\.0\.72:\d+ went silent \(no answer to TCP keepalives: powered off, or cut off\?\); the command may have run/);
});

test('a node that is up but busy for long: the keepalives are answered and the call waits for the answer', { timeout: 30_000 }, async (t) => {
  const node = await silentNode(t);
  const call = outcome(callApi(target(node.port), { cmd: 'resource.verify', resource: 'r0' }, { keepAliveMs: 200 }));
  await node.received;
  let early: string | undefined;
  void call.then((r) => (early = r));
  // Longer than the idle time and ten probes a second apart: a dead node would have been given up by now.
  await new Promise((resolve) => setTimeout(resolve, 12_000));
  assert.equal(early, undefined, 'the call did not end while the node was busy');
  node.answer();
  assert.equal(await call, 'answered {"answered":true}');
});

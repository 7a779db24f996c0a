/**
 * The admin socket parses a request's envelope before anything acts on it:
 * one JSON object with a command name (dotted lower-case words) and, when
 * present, a signature of the right shape. Anything else is answered
 * "malformed request" (exit code 2) and reaches neither the authorizer nor
 * the handler; the server serves on.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { AdminServer, callAdmin } from '../../src/api/line-socket.js';
import { silentLogger } from '../../src/util/log.js';

/** Send one raw request line, return the answer line (bounded). */
async function rawRequest(socketPath: string, line: string | Buffer): Promise<unknown> {
  const socket = net.createConnection(socketPath);
  socket.on('error', () => undefined);
  socket.end(line);
  let text = '';
  const timer = setTimeout(() => socket.destroy(new Error('no answer within 5 s')), 5000);
  try {
    for await (const chunk of socket as AsyncIterable<Buffer>) text += chunk.toString('utf8');
  } finally {
    clearTimeout(timer);
  }
  return text.trim() === '' ? undefined : JSON.parse(text);
}

test('admin socket: a malformed envelope is refused before the authorizer and the handler see it', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-admin-'));
  const socketPath = path.join(dir, 'pool.sock');
  const handled: unknown[] = [];
  const authorized: unknown[] = [];
  const server = await AdminServer.listen<{ cmd: string }>(
    socketPath,
    async (c) => {
      handled.push(c);
      return { echo: c.cmd };
    },
    silentLogger(),
    { authorize: (r) => void authorized.push(r) },
  );
  t.after(async () => {
    await server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const malformed = [
    '{"cmd":""}',
    '{"cmd":"vol list"}',
    '{"cmd":"VOL.LIST"}',
    '{"cmd":"vol"}',
    `{"cmd":"vol.${'x'.repeat(200)}"}`,
    '{"cmd":5}',
    '{"cmd":"vol.list","auth":"let me in"}',
    '{"cmd":"vol.list","auth":{"ts":"now","mac":"00"}}',
    '[{"cmd":"vol.list"}]',
    '"vol.list"',
    'null',
    '{"cmd":"vol.list"',
  ];
  for (const line of malformed) {
    const answer = await rawRequest(socketPath, `${line}\n`);
    assert.deepEqual(answer, { ok: false, error: 'admin socket: malformed request', exitCode: 2 }, line);
  }
  assert.deepEqual(handled, [], 'no malformed request reached the handler');
  assert.deepEqual(authorized, [], 'no malformed request reached the authorizer');
  // The server serves on, and a well-formed request (any other fields the command has) goes through unchanged.
  const request = { name: 'web', sizeBytes: 4096, cmd: 'vol.create' };
  assert.deepEqual(await callAdmin(socketPath, request), { echo: 'vol.create' });
  assert.deepEqual(handled, [request]);
  assert.deepEqual(Object.keys(authorized[0] as object), Object.keys(request), 'the authorizer sees the request as sent (its signature covers that text)');
});

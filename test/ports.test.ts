import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { freePorts } from './ports.js';

test('freePorts: distinct ports, all free once returned (probing one port at a time repeats ports)', async () => {
  // 200 probes closed one after another repeat a port in practically every run.
  const ports = await freePorts(200);
  assert.equal(new Set(ports).size, ports.length, `a port was handed out twice: ${ports.join(' ')}`);
  for (const port of ports.slice(0, 8)) {
    const s = net.createServer();
    await new Promise<void>((resolve, reject) => {
      s.once('error', reject);
      s.listen(port, '127.0.0.2', resolve);
    });
    await new Promise<void>((resolve) => s.close(() => resolve()));
  }
});

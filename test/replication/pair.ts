/**
 * Two nodes of one resource in this process, linked over real TCP on two
 * loopback addresses, each on its own in-memory (or faulty) disk.
 */
import type { BlockDevice } from '../../src/blockdev/types.js';
import { MemoryDevice } from '../../src/blockdev/memory.js';
import { Connector } from '../../src/replication/connector.js';
import { createMetadata } from '../../src/replication/create-md.js';
import { Resource, ResourceOptions } from '../../src/replication/resource.js';
import { silentLogger } from '../../src/util/log.js';
import { freePorts } from '../ports.js';

export const SECRET = Buffer.from('a cluster secret of enough length');

export interface Node {
  name: string;
  address: string;
  disk: BlockDevice;
  resource: Resource;
  connector: Connector;
}

/** A free port for a pair's link (both nodes listen on it, at their own addresses). */
export async function freePort(): Promise<number> {
  return (await freePorts(1))[0];
}

/** A new in-memory disk of `node` with fresh metadata, as `duet resource create-md` leaves it. */
export async function newDisk(size: number, node: string, resource = 'r0'): Promise<MemoryDevice> {
  const disk = new MemoryDevice(size, `${node}-disk`);
  await createMetadata(disk, { resource, node });
  return disk;
}

export async function startNode(
  name: string,
  disk: BlockDevice,
  port: number,
  options: Partial<ResourceOptions> = {},
): Promise<Node> {
  const address = name === 'alpha' ? '127.0.0.2' : '127.0.0.3';
  const peerNode = name === 'alpha' ? 'bravo' : 'alpha';
  const resource = await Resource.open(disk, { resource: 'r0', node: name, protocol: 'C', log: silentLogger(), ...options });
  const connector = new Connector(resource, {
    identity: { cluster: 'test', node: name, resource: 'r0', secret: SECRET },
    address,
    peerNode,
    peerAddress: peerNode === 'alpha' ? '127.0.0.2' : '127.0.0.3',
    port,
    link: { pingIntervalMs: 100, pingTimeoutMs: 400 },
    retryMs: 50,
  });
  await connector.start();
  return { name, address, disk, resource, connector };
}

export async function stopNode(n: Node): Promise<void> {
  await n.connector.stop();
  await n.resource.close();
}

/** Wait (bounded) until `cond` holds. */
export async function until(what: string, cond: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

export function connected(a: Node, b: Node): boolean {
  const pa = a.resource.peer;
  const pb = b.resource.peer;
  return pa?.phase === 'connected' && pb?.phase === 'connected';
}

export function upToDate(a: Node, b: Node): boolean {
  return connected(a, b) && a.resource.disk === 'UpToDate' && b.resource.disk === 'UpToDate' && a.resource.peer?.state?.disk === 'UpToDate' && b.resource.peer?.state?.disk === 'UpToDate';
}

/** Two new disks connected: `a` forced Primary, the initial sync done. */
export async function initialSync(a: Node, b: Node): Promise<void> {
  await until('both-new connection', () => connected(a, b));
  await a.resource.promote(true);
  await until('initial sync', () => upToDate(a, b));
}

/** A fresh pair: both disks new, alpha forced Primary, initial sync done. */
export async function syncedPair(size = 64 * 1024 * 1024, options: Partial<ResourceOptions> = {}): Promise<{ a: Node; b: Node; port: number }> {
  const port = await freePort();
  const a = await startNode('alpha', await newDisk(size, 'alpha'), port, options);
  const b = await startNode('bravo', await newDisk(size, 'bravo'), port, options);
  await initialSync(a, b);
  return { a, b, port };
}

/** The two taken apart (both StandAlone) until the test lets them connect again. */
export async function apart(a: Node, b: Node): Promise<void> {
  a.resource.standAlone = true;
  b.resource.standAlone = true;
  a.connector.kick('test: apart');
  await until('apart', () => !a.resource.peer && !b.resource.peer);
}

export async function readAll(dev: BlockDevice, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  await dev.read(0, buf);
  return buf;
}

/**
 * The daemon of one node (`duet node run`): opens its disks as replicated
 * resources and keeps their peer links up; where a resource is Primary here,
 * opens the pools on it (creating them the first time) and exports their
 * volumes over NBD at this node's address; answers the admin API (resource
 * and pool commands, HMAC-signed) at this node's address and the API port.
 *
 * Promotion: the `prefer` node of a resource promotes itself once it is
 * connected to its peer and nobody is Primary (on brand-new disks it starts
 * the initial full sync that way). A node never promotes itself while it
 * cannot see its peer: that is the failover decision of the cluster layer,
 * or of an admin (`resource primary`).
 */
import path from 'node:path';
import { FileDevice } from '../blockdev/file.js';
import { NbdServer } from '../nbd/server.js';
import type { ExportProvider, NbdExport } from '../nbd/exports.js';
import { Connector } from '../replication/connector.js';
import { restoreBlocks } from '../replication/split-brain.js';
import { Resource, ResourceStatus } from '../replication/resource.js';
import type { Logger } from '../util/log.js';
import { UserError } from '../util/errors.js';
import { formatSize, parseSize } from '../util/size.js';
import { NO_GI, layoutFor } from '../replication/meta.js';
import { AdminServer } from '../volume/admin-socket.js';
import { PoolExports } from '../volume/exports.js';
import { Pool, readBestSuperblock } from '../volume/pool.js';
import { Registry } from '../volume/registry.js';
import { Command as PoolCommand, runCommand } from '../volume/service.js';
import { verifyRequest } from './api-auth.js';
import { ClusterConfig, loadSecret, nodeOf } from './config.js';
import type { Readable, Writable } from 'node:stream';
import { BlockDeviceError } from '../blockdev/types.js';
import { DEFAULT_WITNESS_PORT, WitnessClient } from './witness.js';
import { LoopDelayMonitor, type LoopDelayStatus } from '../util/loop-delay.js';

const HEARTBEAT_MS = 500;
/** The witness counts as a vote this long after it last answered. */
const WITNESS_FRESH_MS = 2000;

export type NodeCommand =
  | { cmd: 'resource.status'; resource?: string }
  | { cmd: 'resource.primary'; resource: string; force: boolean }
  | { cmd: 'resource.secondary'; resource: string }
  | { cmd: 'resource.disconnect'; resource: string }
  | { cmd: 'resource.connect'; resource: string }
  | { cmd: 'resource.verify'; resource: string }
  | { cmd: 'resource.resolve'; resource: string; keep: string }
  | { cmd: 'resource.restore-blocks'; resource: string; file: string }
  | (PoolCommand & { pool: string });

export interface NodeStatus {
  node: string;
  resources: ResourceStatus[];
  pools: { name: string; open: boolean; resources: string[] }[];
  /** How late this node's event loop ran (a long stall drops peer links). */
  eventLoop: LoopDelayStatus;
}

interface ResourceEntry {
  name: string;
  resource: Resource;
  connector: Connector;
  prefer: string | undefined;
  peerNode: string;
  /** The preferred node may promote itself once per daemon start, until an admin sets a role by hand. */
  autoPromote: boolean;
}

interface OpenPool {
  pool: Pool;
  exports: PoolExports;
  resources: string[];
}

export class NodeDaemon {
  readonly resources = new Map<string, ResourceEntry>();
  readonly pools = new Map<string, OpenPool>();
  private nbd: NbdServer | undefined;
  private api: AdminServer | undefined;
  private stopping = false;
  /** One pool/role change at a time. */
  private chain: Promise<unknown> = Promise.resolve();
  readonly address: string;

  private readonly witness: WitnessClient | undefined;
  private heartbeat: NodeJS.Timeout | undefined;
  /** When the witness last answered (quorum without the peer). */
  private witnessSeenAt = 0;
  private readonly loop: LoopDelayMonitor;

  private constructor(
    readonly config: ClusterConfig,
    readonly node: string,
    readonly home: string,
    readonly log: Logger,
    private readonly secret: Buffer,
  ) {
    this.address = config.nodes[node].address;
    this.loop = new LoopDelayMonitor(log);
    if (config.witness) this.witness = new WitnessClient(config.witness.address, config.witness.port ?? DEFAULT_WITNESS_PORT, secret, node, this.address);
  }

  /* -------------------------------------------------------------- quorum */

  /** Votes: this node, its peer if connected, the witness if it answered lately. */
  hasQuorum(resource: Resource): boolean {
    if (resource.peer?.replicating) return true;
    if (!this.witness) return true;
    return Date.now() - this.witnessSeenAt < WITNESS_FRESH_MS;
  }

  /**
   * Before the first write the peer will not have: outdate it at the witness.
   * Without the witness the write waits (suspend, retrying) or fails (error).
   */
  private async fence(resource: string, peer: string, onNoQuorum: 'suspend' | 'error', generation: { from: string; to: string }): Promise<void> {
    const r = this.resources.get(resource)?.resource;
    for (let attempt = 0; ; attempt++) {
      try {
        await this.witness!.call({ cmd: 'witness.outdate', resource, peer, current: generation.from, until: generation.to });
        this.witnessSeenAt = Date.now();
        if (r?.suspended) {
          r.suspended = false;
          this.log.warn({ event: 'io-resumed', resource }, `resource ${resource}: quorum back, writes resume`);
          r.emit('changed');
        }
        return;
      } catch (err) {
        if (onNoQuorum === 'error' || this.stopping) {
          throw new BlockDeviceError('EIO', `resource ${resource}: no quorum (${(err as Error).message}): write refused`);
        }
        if (r && !r.suspended) {
          r.suspended = true;
          this.log.error({ event: 'io-suspended', resource, err: (err as Error).message }, `resource ${resource}: lost the peer and the witness: writes suspended until one is back`);
          r.emit('changed');
        }
        // The peer came back: the write reaches it after all through the resync; no fence needed.
        if (r?.peer?.replicating) {
          r.suspended = false;
          r.emit('changed');
          return;
        }
        await new Promise((resolve) => setTimeout(resolve, Math.min(1000, 100 * (attempt + 1))));
      }
    }
  }

  private async mayPromote(resource: string, force: boolean): Promise<void> {
    const r = this.resources.get(resource)?.resource;
    const current = r?.record.gi.current ?? NO_GI;
    if (force) {
      // This copy is the good data by the operator's word: a mark left at the witness would refuse its
      // fences from now on (no claim can name the generation it waits for: this node will never hold it).
      try {
        await this.witness!.call({ cmd: 'witness.query', resource, current, force: true });
        this.witnessSeenAt = Date.now();
      } catch (err) {
        this.log.warn(
          { event: 'witness-force-unrecorded', resource, err: (err as Error).message },
          `resource ${resource}: promoted by force without telling the witness; if it holds ${this.node} Outdated, writes without the peer stay refused until it is told (make it Secondary and promote it with --force again once the witness answers)`,
        );
      }
      return;
    }
    let reply;
    try {
      reply = await this.witness!.call({ cmd: 'witness.query', resource, current });
      this.witnessSeenAt = Date.now();
    } catch (err) {
      if (r?.peer?.replicating) return;
      throw new UserError(`resource ${resource}: no quorum: neither the peer nor the witness answers (${(err as Error).message}); promoting could make two Primaries; use --force only if the peer is surely down`);
    }
    if (reply.outdated) {
      throw new UserError(`resource ${resource}: the witness says the data on ${this.node} is Outdated (its peer went on writing without it): promote the peer, or use --force to take this older copy`);
    }
  }

  private startHeartbeat(): void {
    if (!this.witness) return;
    const beat = async (): Promise<void> => {
      // Claims name the generation they are about: the witness ends a mark only for the one it waits for.
      const inSync: Record<string, { peer: string; generation: string }> = {};
      const generations: Record<string, string> = {};
      for (const e of this.resources.values()) {
        const r = e.resource;
        if (r.disk === 'UpToDate') generations[e.name] = r.record.gi.current;
        if (r.peer?.phase === 'connected' && r.disk === 'UpToDate' && r.peer.state?.disk === 'UpToDate') inSync[e.name] = { peer: e.peerNode, generation: r.record.gi.current };
      }
      try {
        const reply = await this.witness!.call({ cmd: 'witness.heartbeat', inSync, generations });
        this.witnessSeenAt = Date.now();
        for (const name of reply.outdatedResources) {
          const r = this.resources.get(name)?.resource;
          if (r && r.role === 'Secondary' && !r.peer?.replicating && r.record.disk === 'UpToDate') {
            await r.saveRecord({ disk: 'Outdated' });
            this.log.warn({ event: 'outdated', resource: name }, `resource ${name}: the peer went on without this node: disk Outdated`);
            r.emit('changed');
          }
        }
      } catch {
        /* no witness now: quorum then rests on the peer */
      }
    };
    this.heartbeat = setInterval(() => void beat(), HEARTBEAT_MS);
    this.heartbeat.unref();
    void beat();
  }

  static async start(config: ClusterConfig, nodeName: string | undefined, options: { home: string; log: Logger }): Promise<NodeDaemon> {
    const node = nodeOf(config, nodeName);
    const secret = loadSecret(config);
    const d = new NodeDaemon(config, node, options.home, options.log, secret);
    try {
      await d.openResources();
      await d.listen();
    } catch (err) {
      await d.stop();
      throw err;
    }
    for (const e of d.resources.values()) {
      e.resource.on('changed', () => d.reconcile(e));
      d.reconcile(e);
    }
    d.startHeartbeat();
    return d;
  }

  private async openResources(): Promise<void> {
    const c = this.config;
    for (const [name, res] of Object.entries(c.resources)) {
      const diskPath = res.disk[this.node];
      if (diskPath === undefined) continue;
      const peerNode = Object.keys(res.disk).find((n) => n !== this.node)!;
      const file = path.resolve(path.dirname(c.file), diskPath);
      // Writes off the event loop: a write the kernel throttles would stall the peer links (file.ts).
      const device = FileDevice.open(file, { syncWriteMaxBytes: Number(process.env.DUET_NODE_SYNC_WRITE_MAX_BYTES ?? 0) });
      let resource: Resource;
      try {
        if (res.size !== undefined) {
          const want = parseSize(String(res.size));
          const have = layoutFor(device.size).dataBytes;
          if (have < want) {
            throw new UserError(
              `resource ${name}: ${file} holds ${formatSize(have)} of data (${formatSize(device.size - have)} of it is metadata), less than resources.${name}.size ${res.size} in ${c.file}: give this node a bigger disk`,
            );
          }
        }
        resource = await Resource.open(device, {
          resource: name,
          node: this.node,
          protocol: res.protocol,
          log: this.log,
          resyncRateBytesPerSec: res['resync-rate'] !== undefined ? parseSize(String(res['resync-rate'])) : 0,
          checksumResync: res['checksum-resync'],
          afterSplitBrain: res['after-split-brain'],
          allowTwoPrimaries: res['allow-two-primaries'],
          splitBrainDir: path.join(this.home, 'split-brain'),
          fence: this.witness ? (r, generation) => this.fence(r, peerNode, res['on-no-quorum'] ?? 'suspend', generation) : undefined,
          mayPromote: this.witness ? (r, force) => this.mayPromote(r, force) : undefined,
        });
      } catch (err) {
        await device.close();
        throw err;
      }
      const connector = new Connector(resource, {
        identity: { cluster: c.cluster, node: this.node, resource: name, secret: this.secret },
        address: this.address,
        peerNode,
        peerAddress: c.nodes[peerNode].address,
        port: res.port,
        link: { pingIntervalMs: res['ping-interval-ms'], pingTimeoutMs: res['ping-timeout-ms'] },
      });
      this.resources.set(name, { name, resource, connector, prefer: res.prefer, peerNode, autoPromote: res.prefer === this.node });
      try {
        await connector.start();
      } catch (err) {
        throw new UserError(`resource ${name}: cannot listen on ${this.address}:${res.port} (${(err as Error).message})`);
      }
      this.log.info({ event: 'resource-open', resource: name, disk: file, state: resource.status() }, `resource ${name} on ${file}`);
    }
  }

  private async listen(): Promise<void> {
    const exports = new NodeExports(this);
    this.nbd = new NbdServer({ exports, log: this.log });
    try {
      await this.nbd.listen(this.address, this.config.exports.port);
    } catch (err) {
      throw new UserError(`node ${this.node}: cannot serve NBD on ${this.address}:${this.config.exports.port} (${(err as Error).message})`);
    }
    try {
      this.api = await AdminServer.listen<NodeCommand>({ host: this.address, port: this.config.api.port }, (c, io) => this.handle(c, io), this.log, {
        authorize: (request) => verifyRequest(this.secret, request),
      });
    } catch (err) {
      throw new UserError(`node ${this.node}: cannot open the API on ${this.address}:${this.config.api.port} (${(err as Error).message})`);
    }
  }

  /* ------------------------------------------------------------ reconcile */

  /** Bring pools and exports in line with the roles (serialized). */
  private reconcile(e: ResourceEntry): void {
    if (this.stopping) return;
    this.chain = this.chain.then(() => this.reconcileNow(e)).catch((err: unknown) => {
      this.log.error({ event: 'reconcile-failed', resource: e.name, err: (err as Error).message }, `resource ${e.name}: ${(err as Error).message}`);
    });
  }

  private async reconcileNow(e: ResourceEntry): Promise<void> {
    const r = e.resource;
    const peer = r.peer;
    // The preferred node takes the Primary role once it sees its peer and nobody has it.
    if (e.autoPromote && r.role === 'Secondary' && peer?.phase === 'connected' && peer.state?.role === 'Secondary') {
      if (r.disk === 'UpToDate') {
        e.autoPromote = false;
        await r.promote(false);
        return;
      }
      if (r.disk === 'Inconsistent' && r.record.gi.current === '0' && peer.state.gi.current === '0') {
        e.autoPromote = false;
        this.log.info({ event: 'initial-sync', resource: e.name }, `resource ${e.name}: both disks are new; ${this.node} is preferred: starting the initial sync from here`);
        await r.promote(true);
        return;
      }
    }
    if (r.role === 'Primary') await this.openPools();
  }

  /** Open (or create, the first time) every pool whose resources are all Primary here. */
  private async openPools(): Promise<void> {
    for (const [name, p] of Object.entries(this.config.pools)) {
      if (this.pools.has(name)) continue;
      const entries = p.devices.map((d) => this.resources.get(d));
      if (entries.some((e) => !e || e.resource.role !== 'Primary')) continue;
      // Lent, not given: closing the pool must leave the resources open.
      const devices = entries.map((e) => e!.resource.borrow());
      let pool: Pool;
      try {
        const known = await Promise.all(devices.map((d) => readBestSuperblock(d)));
        if (known.every((sb) => sb === undefined)) {
          const chunkSize = p['chunk-size'] !== undefined ? parseSize(String(p['chunk-size'])) : undefined;
          pool = await Pool.create(name, devices, { chunkSize, log: this.log });
          this.log.info({ event: 'pool-created', pool: name, resources: p.devices }, `pool ${name} created on ${p.devices.join(', ')}`);
        } else {
          pool = await Pool.open(name, devices, { log: this.log });
        }
      } catch (err) {
        // Give the data back: a resync may not run under a pool that is not there.
        for (const d of devices) await Promise.resolve(d.close()).catch(() => undefined);
        throw err;
      }
      this.pools.set(name, { pool, exports: new PoolExports(pool), resources: [...p.devices] });
      this.log.info({ event: 'pool-open', pool: name, volumes: pool.listVolumes().map((v) => v.record.name) }, `pool ${name} open, volumes exported at nbd://${this.address}:${this.config.exports.port}/`);
    }
  }

  /** Close the pools on a resource (and their NBD connections) before it stops being Primary. */
  private async closePoolsOn(resource: string): Promise<void> {
    for (const [name, open] of [...this.pools]) {
      if (!open.resources.includes(resource)) continue;
      this.pools.delete(name);
      await this.nbd?.dropConnections((exp) => open.pool.listVolumes().some((v) => v.record.name === exp.name));
      await open.pool.close();
      this.log.info({ event: 'pool-closed', pool: name }, `pool ${name} closed`);
    }
  }

  /* ----------------------------------------------------------------- API */

  private entry(name: string | undefined): ResourceEntry {
    const e = name !== undefined ? this.resources.get(name) : undefined;
    if (!e) throw new UserError(`no resource ${name ?? ''} on node ${this.node} (resources here: ${[...this.resources.keys()].join(', ') || 'none'})`);
    return e;
  }

  status(resource?: string): NodeStatus {
    const list = resource !== undefined ? [this.entry(resource)] : [...this.resources.values()];
    return {
      node: this.node,
      resources: list.map((e) => statusOf(e, this.hasQuorum(e.resource))),
      pools: Object.entries(this.config.pools).map(([name, p]) => ({ name, open: this.pools.has(name), resources: p.devices })),
      eventLoop: this.loop.status(),
    };
  }

  private async handle(c: NodeCommand, io: { input?: Readable; output?: Writable }): Promise<unknown> {
    switch (c.cmd) {
      case 'resource.status':
        return this.status(c.resource);
      case 'resource.primary': {
        const e = this.entry(c.resource);
        e.autoPromote = false;
        await this.serial(async () => {
          await e.resource.promote(c.force);
          await this.openPools();
        });
        return this.status(c.resource);
      }
      case 'resource.secondary': {
        const e = this.entry(c.resource);
        e.autoPromote = false;
        await this.serial(async () => {
          await this.closePoolsOn(e.name);
          await e.resource.demote();
        });
        return this.status(c.resource);
      }
      case 'resource.disconnect': {
        const e = this.entry(c.resource);
        e.resource.standAlone = true;
        const peer = e.resource.peer;
        // A clean disconnect: the peer has everything flushed first, so nothing beyond new writes resyncs later.
        if (peer?.replicating && e.resource.role === 'Primary') {
          await e.resource.flush().catch(() => undefined);
          peer.outdatePeer();
        }
        e.connector.kick('disconnected by the admin');
        return this.status(c.resource);
      }
      case 'resource.connect': {
        const e = this.entry(c.resource);
        e.resource.standAlone = false;
        e.resource.lastRefusal = undefined;
        return this.status(c.resource);
      }
      case 'resource.resolve': {
        const e = this.entry(c.resource);
        if (c.keep !== this.node && c.keep !== e.peerNode) throw new UserError(`resource ${e.name}: --keep names ${c.keep}, which is not one of its nodes (${this.node}, ${e.peerNode})`);
        if (c.keep !== this.node && e.resource.role === 'Primary') {
          throw new UserError(`resource ${e.name} is Primary on ${this.node}: make it Secondary here first (resource secondary ${e.name}), then resolve`);
        }
        e.resource.keepNode = c.keep;
        e.resource.standAlone = false;
        e.resource.lastRefusal = undefined;
        e.connector.kick('split-brain resolution: reconnecting');
        return this.status(c.resource);
      }
      case 'resource.restore-blocks': {
        const e = this.entry(c.resource);
        if (e.resource.role !== 'Primary') throw new UserError(`resource ${e.name} is not Primary on ${this.node}: make it Primary here first (resource primary ${e.name})`);
        // Blocks change under the pool: close it, write them (replicated), open it again.
        return this.serial(async () => {
          await this.closePoolsOn(e.name);
          try {
            const r = await restoreBlocks(c.file, e.name, e.resource);
            await e.resource.flush();
            this.log.warn({ event: 'blocks-restored', resource: e.name, file: c.file, ...r }, `resource ${e.name}: restored ${r.bytes} bytes saved before a split-brain resolution`);
            return { resource: e.name, file: c.file, ...r };
          } finally {
            await this.openPools();
          }
        });
      }
      case 'resource.verify': {
        const e = this.entry(c.resource);
        const peer = e.resource.peer;
        if (!peer) throw new UserError(`resource ${e.name} is not connected to ${e.peerNode}: nothing to verify against`);
        let v;
        try {
          v = await peer.runVerify();
        } catch (err) {
          throw new UserError(`resource ${e.name}: ${(err as Error).message}`);
        }
        if (v.outOfSyncBytes > 0) {
          // Out-of-sync blocks are marked: a reconnect resyncs them from the side with the good data.
          e.connector.kick('resync the blocks verify found');
        }
        return { resource: e.name, ...v };
      }
      default: {
        const open = this.pools.get(c.pool);
        if (!open) {
          if (!this.config.pools[c.pool]) throw new UserError(`no pool ${c.pool} in ${this.config.file} (pools: ${Object.keys(this.config.pools).join(', ') || 'none'})`);
          throw new UserError(`pool ${c.pool} is not open on ${this.node}: its resources (${this.config.pools[c.pool].devices.join(', ')}) are not Primary here`);
        }
        if (c.cmd === 'pool.extend') throw new UserError(`pool ${c.pool} is on replicated resources: add a resource to pools.${c.pool}.devices in ${this.config.file} instead`);
        return runCommand(
          {
            pool: open.pool,
            registry: new Registry(this.home),
            devicePaths: open.resources.map((r) => `resource:${r}`),
            pid: process.pid,
            connections: (vol) => open.exports.connections(vol),
            changed: () => open.exports.prune(),
            ...io,
          },
          c,
        );
      }
    }
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.chain.then(fn);
    this.chain = run.catch(() => undefined);
    return run;
  }

  /** Graceful stop: no new connections, in-flight I/O finishes, pools and resources close cleanly. */
  async stop(): Promise<void> {
    this.stopping = true;
    if (this.heartbeat) clearInterval(this.heartbeat);
    this.loop.stop();
    await this.chain.catch(() => undefined);
    await this.api?.close().catch(() => undefined);
    await this.nbd?.close();
    for (const [name, open] of [...this.pools]) {
      this.pools.delete(name);
      await open.pool.close().catch((err: unknown) => this.log.error({ event: 'pool-close-failed', pool: name, err: (err as Error).message }));
    }
    for (const e of this.resources.values()) {
      await e.connector.stop();
      await e.resource.close().catch((err: unknown) => this.log.error({ event: 'resource-close-failed', resource: e.name, err: (err as Error).message }));
    }
  }
}

function statusOf(e: ResourceEntry, quorum: boolean): ResourceStatus & { lastRefusal: string | null; standAlone: boolean; quorum: boolean } {
  const s = e.resource.status();
  const peers = s.peers.length > 0 ? s.peers : [{ node: e.peerNode, connection: e.resource.standAlone ? ('StandAlone' as const) : ('Connecting' as const), disk: 'DUnknown', role: 'Unknown', outOfSyncBytes: e.resource.bitmap.outOfSyncBytes, resync: null, lastResync: null, verify: null }];
  return { ...s, peers, quorum, lastRefusal: e.resource.lastRefusal ?? null, standAlone: e.resource.standAlone };
}

/** Every volume of every pool open on this node, exported under its own name. */
class NodeExports implements ExportProvider {
  constructor(private readonly daemon: NodeDaemon) {}

  list(): NbdExport[] {
    return [...this.daemon.pools.values()].flatMap((p) => p.exports.list());
  }

  get(name: string): NbdExport | undefined {
    if (name === '') return this.list()[0];
    for (const p of this.daemon.pools.values()) {
      const e = p.exports.get(name);
      if (e) return e;
    }
    return undefined;
  }

  private owner(exp: NbdExport): PoolExports | undefined {
    for (const p of this.daemon.pools.values()) if (p.exports.get(exp.name) === exp) return p.exports;
    return undefined;
  }

  opened(exp: NbdExport): void {
    this.owner(exp)?.opened(exp);
  }

  closed(exp: NbdExport): void {
    this.owner(exp)?.closed(exp);
  }
}

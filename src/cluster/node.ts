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
 *
 * A disk without duet metadata is never given any here: its resource stays
 * down (reported in the log and by `resource status`, the disk left closed
 * so `resource create-md` can write it) while the other resources run;
 * create-md then asks the daemon to bring it up (`resource.attach`). A disk
 * another process holds stops the daemon from starting (claim.ts).
 */
import path from 'node:path';
import { FileDevice } from '../blockdev/file.js';
import { DiskInUse } from '../blockdev/claim.js';
import { nodeDiskOptions } from './disk-options.js';
import { NoMetadata } from '../replication/create-md.js';
import { NbdServer } from '../nbd/server.js';
import type { ExportProvider, NbdExport } from '../nbd/exports.js';
import { Connector } from '../replication/connector.js';
import { restoreBlocks } from '../replication/split-brain.js';
import { Resource, ResourceStatus } from '../replication/resource.js';
import type { Logger } from '../util/log.js';
import { NotFoundError, UserError } from '../util/errors.js';
import { formatSize, parseSize } from '../util/size.js';
import { layoutFor } from '../replication/meta.js';
import { PoolIncarnations, type PoolIncarnation } from './pool-incarnations.js';
import { PoolExports } from '../volume/exports.js';
import { Pool, readBestSuperblock } from '../volume/pool.js';
import { Registry } from '../volume/registry.js';
import { Command as PoolCommand, poolInfo, runCommand } from '../volume/service.js';
import { ClusterConfig, loadSecret, nodeOf } from './config.js';
import type { Readable, Writable } from 'node:stream';
import { DEFAULT_WITNESS_PORT, WitnessClient } from './witness.js';
import { Quorum } from './quorum.js';
import { LoopDelayMonitor, type LoopDelayStatus } from '../util/loop-delay.js';
import { VmManager, type VmCommand, type VmHost } from '../vm/manager.js';
import { callApi } from '../api/client.js';
import type { MetricsSource } from '../api/metrics.js';
import { apiTargetOf } from '../api/target.js';
import { startApi, type NodeApi } from '../api/node-api.js';
import { handover, type HandoverHost } from './handover.js';
import { EventLog, tapEvents } from './events.js';
import { ClusterManager, type ClusterHost } from './manager.js';
import { clusterStatus, fenceTest } from './status.js';
import { drain, evacuate, rejoin } from './rejoin.js';

/** A pool over 90 % full is an alert (CONTRACT, failover). */
const POOL_WARN_AT = 0.9;

export type NodeCommand =
  | { cmd: 'resource.status'; resource?: string }
  | { cmd: 'resource.primary'; resource: string; force: boolean; handover?: boolean }
  | { cmd: 'resource.secondary'; resource: string; force?: boolean }
  | { cmd: 'resource.disconnect'; resource: string }
  | { cmd: 'resource.connect'; resource: string }
  | { cmd: 'resource.verify'; resource: string }
  | { cmd: 'resource.resolve'; resource: string; keep: string }
  | { cmd: 'resource.restore-blocks'; resource: string; file: string }
  /** Bring up a resource that is down for want of metadata (sent by `resource create-md`). */
  | { cmd: 'resource.attach'; resource: string }
  | { cmd: 'cluster.status' }
  | { cmd: 'cluster.set-drained'; node: string; drained: boolean }
  | { cmd: 'node.rejoin'; node: string }
  | { cmd: 'node.drain'; node: string }
  | { cmd: 'cluster.fence-test'; node: string }
  | { cmd: 'events.list'; since?: number; limit?: number; tail?: number }
  | { cmd: 'pools.list' }
  | VmCommand
  | (PoolCommand & { pool: string });

/** A pool in GET /api/v1/pools: its usage when it is open on this node. */
export interface PoolListEntry {
  name: string;
  resources: string[];
  open: boolean;
  node?: string;
  sizeBytes?: number;
  usedBytes?: number;
  usedPercent?: number;
  volumes?: number;
}

/** What `resource status` shows of each resource: a down one is Secondary, Diskless, StandAlone, with `down` saying why. */
export type NodeResourceStatus = ResourceStatus & { lastRefusal: string | null; standAlone: boolean; quorum: boolean; down: string | null };

export interface NodeStatus {
  node: string;
  resources: NodeResourceStatus[];
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

/** A resource of this node that is not running: its disk has no metadata. */
interface DownResource {
  name: string;
  disk: string;
  peerNode: string;
  reason: string;
}

interface OpenPool {
  pool: Pool;
  exports: PoolExports;
  resources: string[];
}

export class NodeDaemon implements VmHost, HandoverHost, ClusterHost {
  readonly resources = new Map<string, ResourceEntry>();
  readonly down = new Map<string, DownResource>();
  readonly pools = new Map<string, OpenPool>();
  /** Which open of each pool this node serves, and how the last one ended (pool-incarnations.ts). */
  private readonly incarnations: PoolIncarnations;
  private nbd: NbdServer | undefined;
  private api: NodeApi | undefined;
  private stopping = false;
  /** One pool/role change at a time. */
  private chain: Promise<unknown> = Promise.resolve();
  readonly address: string;

  readonly quorum: Quorum;
  private readonly loop: LoopDelayMonitor;
  readonly vms: VmManager;
  readonly cluster: ClusterManager;

  private constructor(
    readonly config: ClusterConfig,
    readonly node: string,
    readonly home: string,
    readonly log: Logger,
    readonly secret: Buffer,
    readonly events: EventLog,
  ) {
    this.address = config.nodes[node].address;
    this.incarnations = new PoolIncarnations(path.join(home, 'pool-incarnations.json'), log);
    const witness = config.witness ? new WitnessClient(config.witness.address, config.witness.port ?? DEFAULT_WITNESS_PORT, secret, node, this.address) : undefined;
    this.quorum = new Quorum({ node, call: witness ? (c) => witness.call(c) : undefined, log });
    this.loop = new LoopDelayMonitor(log);
    this.vms = new VmManager(this);
    this.cluster = new ClusterManager(this, this.quorum);
  }

  resourceEntries(): ResourceEntry[] {
    return [...this.resources.values()];
  }

  evacuate(resources: string[]): Promise<unknown> {
    return evacuate(this, resources);
  }

  fenceStorage(addresses: string[], fenced: boolean): number {
    return this.nbd?.fenceAddresses(addresses, fenced) ?? 0;
  }

  /* ----------------------------------------------------------------- VMs */

  /** The node serving `pool`'s volumes: Primary for every resource of the pool (this one, or the peer as its link says). */
  poolServer(pool: string): string | undefined {
    if (this.pools.has(pool)) return this.node;
    const devices = this.config.pools[pool]?.devices ?? [];
    let server: string | undefined;
    for (const d of devices) {
      const e = this.resources.get(d);
      const peer = e?.resource.peer;
      if (!e || e.resource.role === 'Primary' || peer?.phase !== 'connected' || peer.state?.role !== 'Primary') return undefined;
      if (server !== undefined && server !== e.peerNode) return undefined;
      server = e.peerNode;
    }
    return server;
  }

  /** Which open of each pool this node serves now, and how the last one ended. */
  poolIncarnations(): Record<string, PoolIncarnation> {
    return this.incarnations.snapshot();
  }

  /** The clients using export `name` on this node (a QEMU elsewhere still reading a VM's disk). */
  exportClients(name: string): string[] {
    return this.nbd?.clientsOf(name) ?? [];
  }

  resourceOf(name: string): { resource: Resource; peerNode: string } {
    return this.entry(name);
  }

  async promoteHere(name: string): Promise<void> {
    const e = this.entry(name);
    e.autoPromote = false;
    await this.serial(async () => {
      await e.resource.promote(false);
      await this.openPools();
    });
  }

  async demoteHere(name: string, force = false): Promise<void> {
    const e = this.entry(name);
    e.autoPromote = false;
    // Forced: held writes fail first, so closing the pools (which flushes) does not wait for them.
    if (force && e.resource.role === 'Primary') e.resource.fenceOff(`resource ${e.name}: made Secondary by force on ${this.node}: held writes fail`);
    await this.serial(async () => {
      await this.closePoolsOn(e.name, force);
      await e.resource.demote(force);
    });
  }

  /** Ask another node's daemon, through its API like the CLI. */
  call(node: string, request: NodeCommand, timeoutMs = 10_000): Promise<unknown> {
    if (!this.config.nodes[node]) return Promise.reject(new NotFoundError(`no node named ${node} in ${this.config.file}`));
    return callApi(apiTargetOf(this.config, node, this.secret, `the duet daemon of node ${node}`, this.address, true), request as NodeCommand & Record<string, unknown>, { timeoutMs });
  }

  /* -------------------------------------------------------------- quorum */

  hasQuorum(resource: Resource): boolean {
    return this.quorum.hasQuorum(resource);
  }

  static async start(config: ClusterConfig, nodeName: string | undefined, options: { home: string; log: Logger }): Promise<NodeDaemon> {
    const node = nodeOf(config, nodeName);
    const secret = loadSecret(config);
    // The event log (`duet events`) records what the daemon logs that matters to the cluster.
    const events = EventLog.open(path.join(options.home, 'events'), node, { log: options.log });
    const d = new NodeDaemon(config, node, options.home, tapEvents(options.log, events), secret, events);
    try {
      await d.openResources();
      await d.listen();
      await d.cluster.start();
    } catch (err) {
      await d.stop();
      throw err;
    }
    for (const e of d.resources.values()) d.watch(e);
    await d.vms.start();
    return d;
  }

  private async openResources(): Promise<void> {
    for (const name of Object.keys(this.config.resources)) {
      if (this.config.resources[name].disk[this.node] !== undefined) await this.openResource(name);
    }
  }

  private watch(e: ResourceEntry): void {
    e.resource.on('changed', () => this.reconcile(e));
    this.reconcile(e);
  }

  /** Open resource `name` on this node's disk; a disk without metadata leaves it down (closed), not the daemon. */
  private async openResource(name: string): Promise<ResourceEntry | undefined> {
    const c = this.config;
    const res = c.resources[name];
    const diskPath = res.disk[this.node];
    const peerNode = Object.keys(res.disk).find((n) => n !== this.node)!;
    const file = path.resolve(path.dirname(c.file), diskPath);
    let device: FileDevice;
    try {
      // Small writes on the event loop only while the kernel does not throttle them: a write it puts to sleep would stall the peer links.
      device = FileDevice.open(file, nodeDiskOptions());
    } catch (err) {
      // Another daemon (or any process) has the disk: a refusal because of state.
      if (err instanceof DiskInUse) throw new UserError(`resource ${name}: ${err.message}`, 1);
      throw err;
    }
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
        fence: this.quorum.hasWitness ? (r, generation, signal) => this.quorum.fence(this.entry(r).resource, peerNode, res['on-no-quorum'] ?? 'suspend', generation, signal) : undefined,
        unfence: this.quorum.hasWitness ? (r, generation) => this.quorum.cancelFence(this.entry(r).resource, peerNode, generation) : undefined,
        mayPromote: this.quorum.hasWitness ? (r, force) => this.quorum.mayPromote(this.entry(r).resource, force) : undefined,
      });
    } catch (err) {
      await device.close();
      if (err instanceof NoMetadata) {
        this.down.set(name, { name, disk: file, peerNode, reason: err.message });
        this.log.error({ event: 'no-metadata', resource: name, disk: file }, err.message);
        return undefined;
      }
      throw err;
    }
    this.down.delete(name);
    const connector = new Connector(resource, {
      identity: { cluster: c.cluster, node: this.node, resource: name, secret: this.secret },
      address: this.address,
      peerNode,
      peerAddress: c.nodes[peerNode].address,
      port: res.port,
      link: { pingIntervalMs: res['ping-interval-ms'], pingTimeoutMs: res['ping-timeout-ms'] },
    });
    const entry: ResourceEntry = { name, resource, connector, prefer: res.prefer, peerNode, autoPromote: res.prefer === this.node };
    this.resources.set(name, entry);
    try {
      await connector.start();
    } catch (err) {
      throw new UserError(`resource ${name}: cannot listen on ${this.address}:${res.port} (${(err as Error).message})`);
    }
    this.log.info({ event: 'resource-open', resource: name, disk: file, state: resource.status() }, `resource ${name} on ${file}`);
    return entry;
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
      this.api = await startApi(this);
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
          pool = await Pool.create(name, devices, { chunkSize, log: this.log, warnAt: POOL_WARN_AT });
          this.log.info({ event: 'pool-created', pool: name, resources: p.devices }, `pool ${name} created on ${p.devices.join(', ')}`);
        } else {
          pool = await Pool.open(name, devices, { log: this.log, warnAt: POOL_WARN_AT });
        }
      } catch (err) {
        // Give the data back: a resync may not run under a pool that is not there.
        for (const d of devices) await Promise.resolve(d.close()).catch(() => undefined);
        throw err;
      }
      // A QEMU that wrote to an earlier open of this pool here, closed cleanly, may go on (nothing it was told is lost).
      try {
        this.incarnations.opened(name, pool.incarnation);
      } catch (err) {
        // Not recorded, not served: a crash of this open would pass for a clean end of the last one.
        await pool.close().catch(() => undefined);
        for (const d of devices) await Promise.resolve(d.close()).catch(() => undefined);
        throw new UserError(`pool ${name}: could not record its open in ${path.join(this.home, 'pool-incarnations.json')} (${(err as Error).message}): not served; check that ${this.home} is writable`, 1);
      }
      this.pools.set(name, { pool, exports: new PoolExports(pool, (inc) => this.incarnations.endOf(name, inc) === 'clean'), resources: [...p.devices] });
      this.log.info({ event: 'pool-open', pool: name, volumes: pool.listVolumes().map((v) => v.record.name) }, `pool ${name} open, volumes exported at nbd://${this.address}:${this.config.exports.port}/`);
    }
  }

  /** Close the pools on a resource (and their NBD connections) before it stops being Primary. */
  private async closePoolsOn(resource: string, force = false): Promise<void> {
    for (const [name, open] of [...this.pools]) {
      if (!open.resources.includes(resource)) continue;
      this.pools.delete(name);
      // Its clients keep their connections a while: a flush there says whether the close below made their writes durable.
      let closed!: { resolve: () => void; reject: (err: Error) => void };
      const done = new Promise<void>((resolve, reject) => (closed = { resolve, reject }));
      await this.nbd?.retireConnections((exp) => open.pool.listVolumes().some((v) => v.record.name === exp.name), done);
      try {
        await open.pool.close();
        this.incarnations.closed(name, open.pool.incarnation, true);
        closed.resolve();
      } catch (err) {
        this.incarnations.closed(name, open.pool.incarnation, false);
        closed.reject(err as Error);
        // Forced: its last writes failed (no quorum); the pool's metadata on disk is what it last committed.
        if (!force) throw err;
        this.log.warn({ event: 'pool-close-failed', pool: name, err: (err as Error).message }, `pool ${name}: closed with errors: ${(err as Error).message}`);
      }
      this.log.info({ event: 'pool-closed', pool: name }, `pool ${name} closed`);
    }
  }

  /* ----------------------------------------------------------------- API */

  private entry(name: string | undefined): ResourceEntry {
    const e = name !== undefined ? this.resources.get(name) : undefined;
    if (!e) {
      const down = name !== undefined ? this.down.get(name) : undefined;
      if (down) throw new UserError(`resource ${down.name} is down on ${this.node}: ${down.reason}`, 1);
      throw new NotFoundError(`no resource ${name ?? ''} on node ${this.node} (resources here: ${this.resourceNames().join(', ') || 'none'})`);
    }
    return e;
  }

  /** This node's resources, up or down, in the cluster file's order. */
  private resourceNames(): string[] {
    return Object.keys(this.config.resources).filter((n) => this.resources.has(n) || this.down.has(n));
  }

  status(resource?: string): NodeStatus {
    const names = resource !== undefined && this.down.has(resource) ? [resource] : resource !== undefined ? [this.entry(resource).name] : this.resourceNames();
    return {
      node: this.node,
      resources: names.map((n) => {
        const e = this.resources.get(n);
        return e ? statusOf(e, this.hasQuorum(e.resource)) : downStatus(this.down.get(n)!, this.config.resources[n].protocol);
      }),
      pools: Object.entries(this.config.pools).map(([name, p]) => ({ name, open: this.pools.has(name), resources: p.devices })),
      eventLoop: this.loop.status(),
    };
  }

  /** Run a command of the API (src/api/routes.ts names each route's command). */
  async handle(c: NodeCommand, io: { input?: Readable; output?: Writable }): Promise<unknown> {
    // A stopping daemon has let go of its VMs (they run on, detached) and is closing its pools: an answer
    // now ("no VM here") would be wrong, so none is given; the caller counts it as not answering.
    if (this.stopping) throw new UserError(`node ${this.node} is stopping: ask again when it is back`, 1);
    switch (c.cmd) {
      case 'pools.list':
        return this.poolList();
      case 'vm.list':
      case 'vm.local':
      case 'vm.incarnations':
      case 'vm.start':
      case 'vm.start-here':
      case 'vm.stop':
      case 'vm.stop-here':
      case 'vm.mark':
      case 'vm.console':
      case 'vm.migrate':
      case 'vm.migrate-out':
      case 'vm.migrate-in':
      case 'vm.migrate-done':
      case 'vm.migrate-abort':
      case 'vm.set-memory':
      case 'vm.xl-config':
      case 'vm.pause-io':
      case 'vm.resume-io':
        return this.vms.handle(c);
      case 'resource.status':
        return this.status(c.resource);
      case 'cluster.status':
        return clusterStatus(this);
      case 'cluster.set-drained':
        if (!this.config.nodes[c.node]) throw new NotFoundError(`no node named ${c.node} in ${this.config.file}`);
        this.cluster.setDrained(c.node, c.drained === true);
        return { node: c.node, drained: c.drained === true };
      case 'node.rejoin':
        return rejoin(this, c.node);
      case 'node.drain':
        return drain(this, c.node);
      case 'cluster.fence-test':
        return fenceTest(this, c.node);
      case 'events.list':
        if (c.tail !== undefined) return { events: this.events.tail(Math.min(Math.max(0, c.tail), 1000)), lastSeq: this.events.lastSeq };
        return { events: this.events.since(c.since ?? 0, c.limit), lastSeq: this.events.lastSeq };
      case 'resource.attach': {
        if (this.resources.has(c.resource)) return this.status(c.resource);
        if (!this.down.has(c.resource)) this.entry(c.resource); // names what is wrong
        const e = await this.serial(() => this.openResource(c.resource));
        if (e) this.watch(e);
        return this.status(c.resource);
      }
      case 'resource.primary': {
        if (c.handover) return handover(this, c.resource);
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
        const r = e.resource;
        if (r.holding && r.role === 'Primary' && !c.force) {
          throw new UserError(`resource ${e.name}: writes are held on ${this.node} waiting for quorum (the peer and the witness are unreachable); to fail them with EIO and step down: resource secondary ${e.name} --force`, 1);
        }
        // Forced: the held writes fail first, so closing the pools (which flushes) does not wait for them.
        if (c.force) r.fenceOff(`resource ${e.name}: made Secondary by force on ${this.node}: held writes fail`);
        await this.serial(async () => {
          await this.closePoolsOn(e.name, c.force === true);
          await r.demote(c.force === true);
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
        if (!peer) throw new UserError(`resource ${e.name} is not connected to ${e.peerNode}: nothing to verify against`, 1);
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
          if (!this.config.pools[c.pool]) throw new NotFoundError(`no pool ${c.pool} in ${this.config.file} (pools: ${Object.keys(this.config.pools).join(', ') || 'none'})`);
          throw new UserError(`pool ${c.pool} is not open on ${this.node}: its resources (${this.config.pools[c.pool].devices.join(', ')}) are not Primary here`, 1);
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

  /** What GET /metrics reads, at scrape time. */
  metricsSource(): MetricsSource {
    return {
      node: this.node,
      exports: () => this.nbd?.byExport ?? new Map(),
      resources: () =>
        this.status().resources.map((r) => ({
          ...r,
          peers: r.peers.map((p) => ({ ...p, inFlight: this.resources.get(r.name)?.resource.peer?.inFlight() ?? { writes: 0, bytes: 0 } })),
        })),
      pools: () => this.poolList(),
      vms: () => this.vms.localInfos(),
      lines: this.events,
    };
  }

  /** The cluster file's pools: where each is open here, its usage. */
  private poolList(): PoolListEntry[] {
    return Object.entries(this.config.pools).map(([name, p]) => {
      const open = this.pools.get(name);
      if (!open) return { name, resources: p.devices, open: false };
      const info = poolInfo({ pool: open.pool, registry: new Registry(this.home), devicePaths: open.resources.map((r) => `resource:${r}`), pid: process.pid });
      return { name, resources: p.devices, open: true, node: this.node, sizeBytes: info.sizeBytes, usedBytes: info.usedBytes, usedPercent: info.usedPercent, volumes: info.volumes };
    });
  }

  /** Graceful stop: no new connections, in-flight I/O finishes, pools and resources close cleanly. */
  async stop(): Promise<void> {
    this.stopping = true;
    this.quorum.stopping = true;
    await this.cluster.stop();
    this.loop.stop();
    this.vms.stop();
    await this.chain.catch(() => undefined);
    await this.api?.close().catch(() => undefined);
    await this.nbd?.close();
    for (const [name, open] of [...this.pools]) {
      this.pools.delete(name);
      await open.pool.close().then(
        () => this.incarnations.closed(name, open.pool.incarnation, true),
        (err: unknown) => {
          this.incarnations.closed(name, open.pool.incarnation, false);
          this.log.error({ event: 'pool-close-failed', pool: name, err: (err as Error).message });
        },
      );
    }
    for (const e of this.resources.values()) {
      await e.connector.stop();
      await e.resource.close().catch((err: unknown) => this.log.error({ event: 'resource-close-failed', resource: e.name, err: (err as Error).message }));
    }
    await this.cluster.closeAlerts();
    this.events.close();
  }
}

function statusOf(e: ResourceEntry, quorum: boolean): NodeResourceStatus {
  const s = e.resource.status();
  const peers = s.peers.length > 0 ? s.peers : [{ node: e.peerNode, connection: e.resource.standAlone ? ('StandAlone' as const) : ('Connecting' as const), disk: 'DUnknown', role: 'Unknown', outOfSyncBytes: e.resource.bitmap.outOfSyncBytes, resync: null, lastResync: null, verify: null }];
  return { ...s, peers, quorum, lastRefusal: e.resource.lastRefusal ?? null, standAlone: e.resource.standAlone, down: null };
}

/** A down resource: no disk in use (Diskless), no link (StandAlone), never Primary; `down` says why and what to do. */
function downStatus(d: DownResource, protocol: ResourceStatus['protocol']): NodeResourceStatus {
  return {
    name: d.name,
    role: 'Secondary',
    disk: 'Diskless',
    protocol,
    dataBytes: 0,
    outOfSyncBytes: 0,
    generation: { current: '0', bitmap: '0', history: ['0', '0'] },
    suspended: false,
    fencedOff: null,
    splitBrain: null,
    conflictingWrites: 0,
    peers: [{ node: d.peerNode, connection: 'StandAlone', disk: 'DUnknown', role: 'Unknown', outOfSyncBytes: 0, resync: null, lastResync: null, verify: null }],
    quorum: false,
    lastRefusal: null,
    standAlone: true,
    down: d.reason,
  };
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

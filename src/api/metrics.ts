/**
 * GET /metrics: the node in Prometheus text format (prom-client).
 *
 * State (roles, disks, pools, VMs) is read at scrape time from the daemon,
 * so a metric is never staler than the scrape. I/O is counted by the NBD
 * server as plain numbers on the request path (nbd/io-stats.ts) and copied
 * here at scrape time; what happens rarely (role changes, failovers, alerts)
 * is counted from the daemon's log events as they happen.
 */
import client from 'prom-client';
import type { EventEmitter } from 'node:events';
import { LATENCY_BUCKETS, type ExportStats } from '../nbd/io-stats.js';

export interface MetricsResource {
  name: string;
  role: string;
  disk: string;
  suspended: boolean;
  quorum: boolean;
  outOfSyncBytes: number;
  peers: {
    node: string;
    connection: string;
    disk: string;
    outOfSyncBytes: number;
    resync: { doneBytes: number; totalBytes: number; rateBytesPerSec: number } | null;
    inFlight: { writes: number; bytes: number };
  }[];
}

export interface MetricsVm {
  name: string;
  node: string | null;
  state: string;
  memoryBytes: number;
}

export interface MetricsPool {
  name: string;
  open: boolean;
  sizeBytes?: number;
  usedBytes?: number;
}

export interface MetricsSource {
  node: string;
  exports(): ReadonlyMap<string, ExportStats>;
  resources(): MetricsResource[];
  pools(): MetricsPool[];
  /** The VMs running (or starting, failed) on this node. */
  vms(): Promise<MetricsVm[]>;
  /** Log events by name, with their fields ('line' of EventLog). */
  lines: EventEmitter;
}

const VM_CACHE_MS = 5000;
const ROLES = ['Primary', 'Secondary'];
const DISKS = ['UpToDate', 'Consistent', 'Outdated', 'Inconsistent', 'Failed', 'Diskless', 'DUnknown', 'Attaching'];
const CONNECTIONS = ['Connected', 'Connecting', 'StandAlone', 'SyncSource', 'SyncTarget', 'VerifySource', 'VerifyTarget', 'Disconnecting'];
const VM_STATES = ['running', 'starting', 'migrating', 'stopped', 'failed', 'paused'];

/** One-hot state gauges, as kube-state-metrics does: every known state is 0 but the current one. */
function oneHot(g: client.Gauge, labels: Record<string, string>, key: string, states: string[], current: string): void {
  for (const s of new Set([...states, current])) g.set({ ...labels, [key]: s }, s === current ? 1 : 0);
}

export class Metrics {
  readonly registry = new client.Registry();
  private readonly detach: () => void;

  constructor(private readonly src: MetricsSource) {
    const r = this.registry;
    r.setDefaultLabels({ node: src.node });
    client.collectDefaultMetrics({ register: r, prefix: 'duet_' });

    // ---- exports: read from the NBD server's counters at scrape time.
    const ops = new client.Counter({ name: 'duet_export_requests_total', help: 'NBD requests by export and operation', labelNames: ['export', 'op'], registers: [r] });
    const errors = new client.Counter({ name: 'duet_export_errors_total', help: 'NBD requests answered with an error', labelNames: ['export', 'op'], registers: [r] });
    const bytes = new client.Counter({ name: 'duet_export_bytes_total', help: 'bytes read and written through NBD', labelNames: ['export', 'op'], registers: [r] });
    // prom-client counters only go up by inc(): these mirror absolute numbers, so they are reset and set at each scrape.
    const mirror = (c: client.Counter, pick: (s: { requests: number; errors: number; bytes: number }) => number, only?: (op: string) => boolean): void => {
      c.reset();
      for (const [exp, stats] of src.exports()) for (const [op, s] of stats.ops) if (!only || only(op)) c.inc({ export: exp, op }, pick(s));
    };

    // ---- resources
    const role = new client.Gauge({ name: 'duet_resource_role', help: '1 for the resource\'s current role on this node', labelNames: ['resource', 'role'], registers: [r] });
    const disk = new client.Gauge({ name: 'duet_resource_disk_state', help: '1 for the current disk state of this node\'s copy', labelNames: ['resource', 'state'], registers: [r] });
    const conn = new client.Gauge({ name: 'duet_resource_connection_state', help: '1 for the current state of the link to the peer', labelNames: ['resource', 'peer', 'state'], registers: [r] });
    const peerDisk = new client.Gauge({ name: 'duet_resource_peer_disk_state', help: "1 for the peer's disk state as this node knows it", labelNames: ['resource', 'peer', 'state'], registers: [r] });
    const oos = new client.Gauge({ name: 'duet_resource_out_of_sync_bytes', help: 'bytes marked out of sync with the peer', labelNames: ['resource'], registers: [r] });
    const resyncDone = new client.Gauge({ name: 'duet_resource_resync_done_bytes', help: 'bytes resynced so far by the running resync', labelNames: ['resource', 'peer'], registers: [r] });
    const resyncTotal = new client.Gauge({ name: 'duet_resource_resync_total_bytes', help: 'bytes the running resync moves in all', labelNames: ['resource', 'peer'], registers: [r] });
    const resyncRate = new client.Gauge({ name: 'duet_resource_resync_rate_bytes_per_second', help: 'rate of the running resync (0 when none runs)', labelNames: ['resource', 'peer'], registers: [r] });
    const inflightWrites = new client.Gauge({ name: 'duet_resource_in_flight_writes', help: 'writes sent to the peer and not yet acknowledged (replication lag)', labelNames: ['resource', 'peer'], registers: [r] });
    const inflightBytes = new client.Gauge({ name: 'duet_resource_in_flight_bytes', help: 'bytes sent to the peer and not yet acknowledged (replication lag)', labelNames: ['resource', 'peer'], registers: [r] });
    const suspended = new client.Gauge({ name: 'duet_resource_suspended', help: '1 while writes are held (no quorum)', labelNames: ['resource'], registers: [r] });
    const quorum = new client.Gauge({ name: 'duet_resource_quorum', help: '1 while the resource has quorum here', labelNames: ['resource'], registers: [r] });
    const roleChanges = new client.Counter({ name: 'duet_resource_role_changes_total', help: 'role changes of the resource on this node since the daemon started', labelNames: ['resource', 'role'], registers: [r] });

    // ---- pools
    const poolSize = new client.Gauge({ name: 'duet_pool_size_bytes', help: 'data space of an open pool', labelNames: ['pool'], registers: [r] });
    const poolUsed = new client.Gauge({ name: 'duet_pool_used_bytes', help: 'data space in use in an open pool', labelNames: ['pool'], registers: [r] });
    const poolOpen = new client.Gauge({ name: 'duet_pool_open', help: '1 when the pool is open (served) on this node', labelNames: ['pool'], registers: [r] });

    // ---- VMs
    const vmState = new client.Gauge({ name: 'duet_vm_state', help: '1 for the current state of a VM on this node', labelNames: ['vm', 'state'], registers: [r] });
    const vmMemory = new client.Gauge({ name: 'duet_vm_memory_bytes', help: 'guest memory of a VM on this node', labelNames: ['vm'], registers: [r] });

    // ---- failover and alerts: counted as they happen.
    const failovers = new client.Counter({ name: 'duet_failovers_total', help: 'takeovers run by this node', labelNames: ['outcome'], registers: [r] });
    const failoverSeconds = new client.Histogram({
      name: 'duet_failover_duration_seconds',
      help: "from the takeover decision to the last lost VM's start",
      buckets: [0.5, 1, 2, 3, 4, 5, 7.5, 10, 15, 30, 60, 120],
      registers: [r],
    });
    const alerts = new client.Counter({ name: 'duet_alerts_total', help: 'alerts by channel and outcome (sent, failed attempt, given up, dropped)', labelNames: ['channel', 'outcome'], registers: [r] });

    const onLine = (event: string, f: Record<string, unknown>): void => {
      switch (event) {
        case 'role':
          if (typeof f.resource === 'string' && typeof f.role === 'string') roleChanges.inc({ resource: f.resource, role: f.role });
          return;
        case 'failover-done':
        case 'takeover-incomplete':
          failovers.inc({ outcome: event === 'failover-done' ? 'complete' : 'incomplete' });
          if (typeof f.totalMs === 'number') failoverSeconds.observe(f.totalMs / 1000);
          return;
        case 'alert-sent':
        case 'alert-failed':
        case 'alert-gave-up':
        case 'alert-dropped':
          alerts.inc({ channel: typeof f.channel === 'string' ? f.channel : 'unknown', outcome: event.slice('alert-'.length) });
          return;
      }
    };
    src.lines.on('line', onLine);
    this.detach = () => src.lines.off('line', onLine);

    this.refresh = async () => {
      mirror(ops, (s) => s.requests);
      mirror(errors, (s) => s.errors);
      mirror(bytes, (s) => s.bytes, (op) => op === 'read' || op === 'write');
      for (const g of [role, disk, conn, peerDisk, oos, resyncDone, resyncTotal, resyncRate, inflightWrites, inflightBytes, suspended, quorum, poolSize, poolUsed, poolOpen, vmState, vmMemory]) g.reset();
      for (const res of src.resources()) {
        const l = { resource: res.name };
        oneHot(role, l, 'role', ROLES, res.role);
        oneHot(disk, l, 'state', DISKS, res.disk);
        oos.set(l, res.outOfSyncBytes);
        suspended.set(l, res.suspended ? 1 : 0);
        quorum.set(l, res.quorum ? 1 : 0);
        for (const p of res.peers) {
          const pl = { resource: res.name, peer: p.node };
          oneHot(conn, pl, 'state', CONNECTIONS, p.connection);
          oneHot(peerDisk, pl, 'state', DISKS, p.disk);
          resyncDone.set(pl, p.resync?.doneBytes ?? 0);
          resyncTotal.set(pl, p.resync?.totalBytes ?? 0);
          resyncRate.set(pl, p.resync?.rateBytesPerSec ?? 0);
          inflightWrites.set(pl, p.inFlight.writes);
          inflightBytes.set(pl, p.inFlight.bytes);
        }
      }
      for (const p of src.pools()) {
        poolOpen.set({ pool: p.name }, p.open ? 1 : 0);
        if (p.open && p.sizeBytes !== undefined) poolSize.set({ pool: p.name }, p.sizeBytes);
        if (p.open && p.usedBytes !== undefined) poolUsed.set({ pool: p.name }, p.usedBytes);
      }
      for (const v of await this.vmsCached()) {
        oneHot(vmState, { vm: v.name }, 'state', VM_STATES, v.state);
        vmMemory.set({ vm: v.name }, v.memoryBytes);
      }
    };
  }

  private readonly refresh: () => Promise<void>;
  private vmCache: { at: number; vms: Promise<MetricsVm[]> } | undefined;

  /**
   * The VMs at most VM_CACHE_MS old: each look asks every QEMU for its
   * balloon over QMP, which the handover's pause and resume use too; scrapes
   * (open to anyone by default) must not crowd it.
   */
  private vmsCached(): Promise<MetricsVm[]> {
    const c = this.vmCache;
    // A look under way is shared (a slow QEMU must not make every scrape start another); a finished one is kept VM_CACHE_MS.
    if (c && (c.at === 0 || Date.now() - c.at <= VM_CACHE_MS)) return c.vms;
    const entry = { at: 0, vms: this.src.vms().catch((): MetricsVm[] => []) };
    void entry.vms.then(() => (entry.at = Date.now()));
    this.vmCache = entry;
    return entry.vms;
  }
  private readonly api = new client.Histogram({
    name: 'duet_api_request_duration_seconds',
    help: 'API requests by route, method and status',
    labelNames: ['route', 'method', 'status'],
    buckets: [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30],
    registers: [this.registry],
  });

  observeApi(route: string, method: string, status: number, seconds: number): void {
    this.api.observe({ route, method, status: String(status) }, seconds);
  }

  async scrape(): Promise<{ contentType: string; text: string }> {
    await this.refresh();
    return { contentType: this.registry.contentType, text: (await this.registry.metrics()) + latencyText(this.src) };
  }

  close(): void {
    this.detach();
    this.registry.clear();
  }
}

const LATENCY = 'duet_export_request_duration_seconds';

function label(v: string): string {
  return v.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"');
}

/**
 * duet_export_request_duration_seconds: the NBD server's own buckets as a
 * Prometheus histogram, written here because prom-client's Histogram can
 * only observe, not mirror counts kept elsewhere.
 */
export function latencyText(src: MetricsSource): string {
  const lines = [`# HELP ${LATENCY} NBD request latency by export and operation, from the request's dispatch to the device's completion (refused requests are not timed)`, `# TYPE ${LATENCY} histogram`];
  for (const [exp, stats] of src.exports()) {
    for (const [op, s] of stats.ops) {
      const l = `node="${label(src.node)}",export="${label(exp)}",op="${op}"`;
      let cumulative = 0;
      LATENCY_BUCKETS.forEach((le, i) => {
        cumulative += s.buckets[i];
        lines.push(`${LATENCY}_bucket{${l},le="${le}"} ${cumulative}`);
      });
      cumulative += s.buckets[LATENCY_BUCKETS.length];
      lines.push(`${LATENCY}_bucket{${l},le="+Inf"} ${cumulative}`);
      lines.push(`${LATENCY}_sum{${l}} ${s.seconds}`);
      lines.push(`${LATENCY}_count{${l}} ${cumulative}`);
    }
  }
  return `${lines.join('\n')}\n`;
}

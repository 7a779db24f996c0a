/**
 * The dashboard: plain TypeScript over the node's /api/v1 (no framework,
 * nothing fetched from elsewhere). State is polled every 2 s; events come
 * as server-sent events, read with fetch so the token goes in a header
 * (EventSource cannot send one). Every action asks for confirmation.
 */

const TOKEN_KEY = 'duet-token';
const POLL_MS = 2000;

const $ = <T extends HTMLElement = HTMLElement>(id: string): T => document.getElementById(id) as T;

function esc(v: unknown): string {
  return String(v ?? '').replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function size(bytes: number | undefined | null): string {
  if (bytes === undefined || bytes === null) return '';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v >= 10 || i === 0 ? Math.round(v) : v.toFixed(1)} ${units[i]}`;
}

function duration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return '?';
  if (seconds < 60) return `${Math.ceil(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
}

function badge(text: string, kind: 'ok' | 'warn' | 'bad' | '' = ''): string {
  return `<span class="badge ${kind}">${esc(text)}</span>`;
}

function bar(fraction: number, label: string): string {
  const pct = Math.max(0, Math.min(1, fraction)) * 100;
  return `<span class="bar" role="progressbar" aria-valuenow="${pct.toFixed(0)}"><span style="width:${pct.toFixed(1)}%"></span><em>${esc(label)}</em></span>`;
}

class ApiError extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly hint?: string,
  ) {
    super(message);
  }
}

let token = sessionStorage.getItem(TOKEN_KEY) ?? '';

async function api<T = unknown>(method: string, path: string, body?: unknown): Promise<T> {
  const res = await fetch(path, {
    method,
    headers: { authorization: `Bearer ${token}`, ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
  });
  const text = await res.text();
  const json = text ? (JSON.parse(text) as unknown) : undefined;
  if (!res.ok) {
    const e = json as { error?: string; hint?: string } | undefined;
    if (res.status === 401) signOut(e?.error ?? 'the token was refused');
    throw new ApiError(e?.error ?? `HTTP ${res.status}`, res.status, e?.hint);
  }
  return json as T;
}

/* ---------------------------------------------------------------- shapes */

interface NodeState {
  name: string;
  state: string;
  paths?: { local: string; remote: string; lastHeardMsAgo: number | null }[];
}
interface ClusterStatus {
  cluster: string;
  node: string;
  quorum: boolean;
  witness: { configured: boolean; reachable: boolean | null };
  warnings: string[];
  nodes: NodeState[];
  resources: { name: string; primary: string | null; disk: string; connection: string; outOfSyncBytes: number }[];
}
interface Progress {
  doneBytes: number;
  totalBytes: number;
  rateBytesPerSec: number;
}
interface ResourceStatus {
  name: string;
  role: string;
  disk: string;
  outOfSyncBytes: number;
  quorum: boolean;
  suspended: boolean;
  down: string | null;
  splitBrain: { detectedAt: string; localChangedBytes: number; peerChangedBytes: number; resolution: string | null } | null;
  peers: { node: string; connection: string; disk: string; role: string; outOfSyncBytes: number; resync: Progress | null; verify: (Progress & { running: boolean; outOfSyncBytes: number }) | null }[];
}
interface Vm {
  name: string;
  node: string | null;
  state: string;
  memoryBytes: number;
  cpus: number;
  disks: string[];
  stale?: boolean;
  reason?: string;
}
interface Pool {
  name: string;
  open: boolean;
  node?: string;
  sizeBytes?: number;
  usedBytes?: number;
  usedPercent?: number;
  resources: string[];
}
interface Volume {
  name: string;
  sizeBytes: number;
  usedBytes: number;
  snapshot: boolean;
  origin: string | null;
  exported: boolean;
  connections: number;
}
interface EventRecord {
  seq: number;
  time: string;
  event: string;
  node: string;
  level: string;
  message: string;
}

/* ---------------------------------------------------------- confirmation */

function confirmAction(title: string, bodyHtml: string): Promise<boolean> {
  const dialog = $<HTMLDialogElement>('confirm');
  $('confirm-title').textContent = title;
  $('confirm-body').innerHTML = bodyHtml;
  dialog.returnValue = '';
  dialog.showModal();
  return new Promise((resolve) => dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), { once: true }));
}

function say(text: string, error = false): void {
  const m = $('message');
  m.textContent = text;
  m.className = error ? 'error' : '';
}

async function act(title: string, bodyHtml: string, method: string, path: string, body: unknown = {}): Promise<void> {
  if (!(await confirmAction(title, bodyHtml))) return;
  say(`${title}…`);
  try {
    const r = await api<{ message?: string } | null>(method, path, body);
    say(r && typeof r === 'object' && 'message' in r && r.message ? r.message : `${title}: done`);
  } catch (err) {
    const e = err as ApiError;
    say(`${title}: ${e.message}${e.hint ? ` (${e.hint})` : ''}`, true);
  }
  void refresh();
}

/* --------------------------------------------------------------- render */

let last: { status?: ClusterStatus; resources?: ResourceStatus[]; vms?: Vm[]; pools?: Pool[] } = {};

function renderStatus(s: ClusterStatus): void {
  $('cluster').textContent = `cluster ${s.cluster} · via ${s.node}`;
  $('badges').innerHTML = [
    s.quorum ? badge('quorum', 'ok') : badge('no quorum', 'bad'),
    !s.witness.configured ? badge('no witness', 'warn') : s.witness.reachable ? badge('witness', 'ok') : badge('witness silent', 'warn'),
  ].join(' ');
  $('warnings').textContent = s.warnings.join(' · ');
  $('nodes').innerHTML =
    '<tr><th>Node</th><th>State</th><th>Heartbeat</th><th></th></tr>' +
    s.nodes
      .map((n) => {
        const kind = n.state === 'online' ? 'ok' : n.state === 'draining' ? 'warn' : 'bad';
        const paths = (n.paths ?? []).map((p) => `${esc(p.remote)}: ${p.lastHeardMsAgo === null ? 'never' : `${p.lastHeardMsAgo} ms ago`}`).join('<br>');
        return `<tr data-node="${esc(n.name)}"><td>${esc(n.name)}</td><td>${badge(n.state, kind)}</td><td>${paths || (n.name === s.node ? 'this node' : '')}</td><td>
          <button data-act="drain" data-node="${esc(n.name)}">Drain</button>
          <button data-act="rejoin" data-node="${esc(n.name)}">Rejoin</button></td></tr>`;
      })
      .join('');
}

function resyncCell(p: ResourceStatus['peers'][number]): string {
  if (p.resync) {
    const left = p.resync.totalBytes - p.resync.doneBytes;
    const eta = p.resync.rateBytesPerSec > 0 ? duration(left / p.resync.rateBytesPerSec) : '?';
    return `${bar(p.resync.totalBytes ? p.resync.doneBytes / p.resync.totalBytes : 0, `${size(p.resync.doneBytes)} / ${size(p.resync.totalBytes)}`)} ${size(p.resync.rateBytesPerSec)}/s, ETA ${eta}`;
  }
  if (p.verify?.running) return `verify ${bar(p.verify.totalBytes ? p.verify.doneBytes / p.verify.totalBytes : 0, `${size(p.verify.doneBytes)} / ${size(p.verify.totalBytes)}`)}`;
  if (p.verify) return `verified: ${p.verify.outOfSyncBytes === 0 ? 'identical' : `${size(p.verify.outOfSyncBytes)} differ`}`;
  return '';
}

function renderResources(rs: ResourceStatus[], node: string): void {
  $('resources').innerHTML =
    '<tr><th>Resource</th><th>Role here</th><th>Disk</th><th>Peer</th><th>Out of sync</th><th>Resync / verify</th><th></th></tr>' +
    rs
      .map((r) => {
        const p = r.peers[0];
        const diskKind = r.disk === 'UpToDate' ? 'ok' : r.disk === 'Inconsistent' || r.disk === 'Outdated' ? 'warn' : 'bad';
        const conn = p ? `${p.node}: ${p.connection}, ${p.disk}${p.role !== 'Unknown' ? `, ${p.role}` : ''}` : '';
        const sb = r.splitBrain && !r.splitBrain.resolution ? ` ${badge('split brain', 'bad')}` : '';
        return `<tr data-resource="${esc(r.name)}"><td>${esc(r.name)}${sb}${r.down ? `<br><small class="error">${esc(r.down)}</small>` : ''}</td>
          <td>${badge(r.role, r.role === 'Primary' ? 'ok' : '')}${r.suspended ? ` ${badge('writes held', 'warn')}` : ''}</td>
          <td>${badge(r.disk, diskKind)}</td><td>${esc(conn)}</td><td>${size(r.outOfSyncBytes)}</td><td>${p ? resyncCell(p) : ''}</td>
          <td><button data-act="promote" data-resource="${esc(r.name)}" ${r.role === 'Primary' ? 'disabled' : ''}>Make Primary on ${esc(node)}</button>
          <button data-act="verify" data-resource="${esc(r.name)}">Verify</button>
          ${r.splitBrain && !r.splitBrain.resolution ? `<button data-act="resolve" data-resource="${esc(r.name)}">Resolve split brain</button>` : ''}</td></tr>`;
      })
      .join('');
}

function renderVms(vms: Vm[], nodes: string[]): void {
  $('vms').innerHTML =
    '<tr><th>VM</th><th>State</th><th>Node</th><th>Memory</th><th>Disks</th><th></th></tr>' +
    vms
      .map((v) => {
        const kind = v.state === 'running' ? 'ok' : v.state === 'failed' ? 'bad' : v.state === 'stopped' ? '' : 'warn';
        const targets = nodes.filter((n) => n !== v.node);
        return `<tr data-vm="${esc(v.name)}"><td>${esc(v.name)}</td><td>${badge(v.state, kind)}${v.reason ? `<br><small>${esc(v.reason)}</small>` : ''}</td>
          <td class="vm-node">${esc(v.node ?? '')}${v.stale ? ' (not answering)' : ''}</td><td>${size(v.memoryBytes)}</td><td>${esc(v.disks.join(', '))}</td>
          <td>${v.state === 'running' ? targets.map((n) => `<button data-act="migrate" data-vm="${esc(v.name)}" data-to="${esc(n)}">Migrate to ${esc(n)}</button>`).join('') : ''}
          ${v.state === 'stopped' || v.state === 'failed' ? `<button data-act="start" data-vm="${esc(v.name)}">Start</button>` : `<button data-act="stop" data-vm="${esc(v.name)}">Stop</button>`}</td></tr>`;
      })
      .join('');
}

function renderPools(pools: Pool[]): void {
  $('pools').innerHTML =
    '<tr><th>Pool</th><th>Served by</th><th>Usage</th><th>Resources</th></tr>' +
    pools
      .map((p) => {
        const usage = p.open && p.sizeBytes ? bar((p.usedBytes ?? 0) / p.sizeBytes, `${size(p.usedBytes)} / ${size(p.sizeBytes)} (${p.usedPercent ?? 0} %)`) : '';
        return `<tr data-pool="${esc(p.name)}"><td>${esc(p.name)}</td><td>${esc(p.open ? p.node : 'the other node')}</td><td>${usage}</td><td>${esc(p.resources.join(', '))}</td></tr>`;
      })
      .join('');
}

async function renderVolumes(pools: Pool[]): Promise<void> {
  const rows: string[] = [];
  for (const p of pools.filter((x) => x.open)) {
    const vols = await api<Volume[]>('GET', `/api/v1/pools/${encodeURIComponent(p.name)}/volumes`).catch(() => []);
    for (const v of vols) {
      rows.push(
        `<tr><td>${esc(p.name)}/${esc(v.name)}</td><td>${v.snapshot ? `snapshot of ${esc(v.origin)}` : v.origin ? `clone of ${esc(v.origin)}` : 'volume'}</td><td>${size(v.sizeBytes)}</td><td>${size(v.usedBytes)}</td><td>${v.exported ? `${v.connections} connection(s)` : ''}</td></tr>`,
      );
    }
  }
  $('volumes').innerHTML = '<tr><th>Volume</th><th>Kind</th><th>Size</th><th>Used</th><th>Export</th></tr>' + rows.join('');
}

function addEvent(e: EventRecord): void {
  const list = $('events');
  const li = document.createElement('li');
  li.value = e.seq;
  li.className = e.level === 'info' ? '' : e.level;
  li.dataset.event = e.event;
  li.textContent = `${new Date(e.time).toLocaleString()}  ${e.node}  ${e.event}  ${e.message}`;
  list.prepend(li);
  while (list.children.length > 200) list.lastElementChild?.remove();
}

/* ----------------------------------------------------------------- loops */

let polling: number | undefined;
let events: AbortController | undefined;

async function refresh(): Promise<void> {
  try {
    const [status, res, vms, pools] = await Promise.all([
      api<ClusterStatus>('GET', '/api/v1/status'),
      api<{ node: string; resources: ResourceStatus[] }>('GET', '/api/v1/resources'),
      api<{ vms: Vm[] }>('GET', '/api/v1/vms'),
      api<Pool[]>('GET', '/api/v1/pools'),
    ]);
    last = { status, resources: res.resources, vms: vms.vms, pools };
    renderStatus(status);
    renderResources(res.resources, res.node);
    renderVms(vms.vms, status.nodes.map((n) => n.name));
    renderPools(pools);
    await renderVolumes(pools);
  } catch (err) {
    if ((err as ApiError).status !== 401) say(`cannot read the node's state: ${(err as Error).message}`, true);
  }
}

async function followEvents(signal: AbortSignal): Promise<void> {
  let since = 0;
  try {
    const tail = await api<{ events: EventRecord[]; lastSeq: number }>('GET', '/api/v1/events?tail=50');
    for (const e of tail.events) addEvent(e);
    since = tail.lastSeq;
  } catch {
    // The stream below starts from the beginning then.
  }
  while (!signal.aborted) {
    try {
      const res = await fetch(`/api/v1/events/stream?since=${since}`, { headers: { authorization: `Bearer ${token}` }, signal });
      if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        for (let end = buf.indexOf('\n\n'); end >= 0; end = buf.indexOf('\n\n')) {
          const block = buf.slice(0, end);
          buf = buf.slice(end + 2);
          const data = block.split('\n').filter((l) => l.startsWith('data: ')).map((l) => l.slice(6)).join('\n');
          if (!data) continue;
          if (/^event: gap$/m.test(block)) {
            // Older than what the node keeps in memory: the list shows what it has, the CLI's duet events the rest.
            const gap = JSON.parse(data) as { next: number };
            since = Math.max(since, gap.next - 1);
            continue;
          }
          const e = JSON.parse(data) as EventRecord;
          if (e.seq <= since) continue;
          since = e.seq;
          addEvent(e);
          // Something happened: show it now rather than at the next poll.
          void refresh();
        }
      }
    } catch {
      if (signal.aborted) return;
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

function start(): void {
  $('login').hidden = true;
  $('app').hidden = false;
  $('logout').hidden = false;
  void refresh();
  polling = window.setInterval(() => void refresh(), POLL_MS);
  events = new AbortController();
  void followEvents(events.signal);
}

function signOut(why?: string): void {
  token = '';
  sessionStorage.removeItem(TOKEN_KEY);
  if (polling !== undefined) clearInterval(polling);
  events?.abort();
  $('app').hidden = true;
  $('logout').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = why ?? '';
  $('events').innerHTML = '';
}

/* --------------------------------------------------------------- actions */

document.addEventListener('click', (ev) => {
  const b = (ev.target as HTMLElement).closest('button[data-act]') as HTMLButtonElement | null;
  if (!b) return;
  const d = b.dataset;
  const here = last.status?.node ?? 'this node';
  switch (d.act) {
    case 'promote':
      return void act(`Make ${here} Primary for ${d.resource}`, `<p>${esc(here)} becomes Primary for resource <b>${esc(d.resource)}</b>: its pools open here and their VMs move here live.</p>`, 'POST', `/api/v1/resources/${encodeURIComponent(d.resource!)}/primary`, { handover: true });
    case 'verify':
      return void act(`Verify ${d.resource}`, `<p>Compare both copies of <b>${esc(d.resource)}</b> block by block (reads every block on both nodes).</p>`, 'POST', `/api/v1/resources/${encodeURIComponent(d.resource!)}/verify`);
    case 'resolve': {
      const r = last.resources?.find((x) => x.name === d.resource);
      const sb = r?.splitBrain;
      const peer = r?.peers[0]?.node ?? 'the peer';
      const body = `<p>Both nodes wrote to <b>${esc(d.resource)}</b> while apart (since ${esc(sb?.detectedAt)}):</p>
        <ul><li>${esc(here)} changed ${size(sb?.localChangedBytes)}</li><li>${esc(peer)} changed ${size(sb?.peerChangedBytes)}</li></ul>
        <p>Keep the data of: <select id="keep"><option>${esc(here)}</option><option>${esc(peer)}</option></select>. The other side's changes are saved to a file first, then overwritten.</p>`;
      void (async () => {
        const dialogDone = confirmAction(`Resolve the split brain of ${d.resource}`, body);
        const keep = () => ($('keep') as HTMLSelectElement | null)?.value ?? here;
        let chosen = here;
        $('confirm-ok').addEventListener('click', () => (chosen = keep()), { once: true });
        if (!(await dialogDone)) return;
        try {
          await api('POST', `/api/v1/resources/${encodeURIComponent(d.resource!)}/resolve`, { keep: chosen });
          say(`split brain of ${d.resource}: keeping ${chosen}'s data`);
        } catch (err) {
          say(`resolve ${d.resource}: ${(err as Error).message}`, true);
        }
        void refresh();
      })();
      return;
    }
    case 'migrate':
      return void act(`Migrate ${d.vm} to ${d.to}`, `<p>Live-migrate VM <b>${esc(d.vm)}</b> to <b>${esc(d.to)}</b>: the guest keeps running.</p>`, 'POST', `/api/v1/vms/${encodeURIComponent(d.vm!)}/migrate`, { to: d.to });
    case 'start':
      return void act(`Start ${d.vm}`, `<p>Boot VM <b>${esc(d.vm)}</b> where it is preferred.</p>`, 'POST', `/api/v1/vms/${encodeURIComponent(d.vm!)}/start`);
    case 'stop':
      return void act(`Stop ${d.vm}`, `<p>Shut VM <b>${esc(d.vm)}</b> down (it stays stopped until started).</p>`, 'POST', `/api/v1/vms/${encodeURIComponent(d.vm!)}/stop`);
    case 'drain':
      return void act(`Drain ${d.node}`, `<p>Move every VM and Primary role off <b>${esc(d.node)}</b>, live, for maintenance. It stays drained until a rejoin.</p>`, 'POST', `/api/v1/nodes/${encodeURIComponent(d.node!)}/drain`);
    case 'rejoin':
      return void act(`Rejoin ${d.node}`, `<p>Resync <b>${esc(d.node)}</b>, then move its preferred VMs and roles back, live.</p>`, 'POST', `/api/v1/nodes/${encodeURIComponent(d.node!)}/rejoin`);
  }
});

$('login-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  token = ($('token') as HTMLInputElement).value.trim();
  api('GET', '/api/v1/status').then(
    () => {
      sessionStorage.setItem(TOKEN_KEY, token);
      $('login-error').textContent = '';
      start();
    },
    (err: Error) => {
      $('login-error').textContent = err.message;
    },
  );
});
$('logout').addEventListener('click', () => signOut());

if (token) start();
else signOut();

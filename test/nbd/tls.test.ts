/**
 * STARTTLS with a real TLS client (libnbd through its Python bindings, which
 * verifies the server certificate against a CA the test makes with openssl).
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const DUET = path.join(ROOT, 'bin/duet');
const PYTHON = '/usr/bin/python3'; // Debian's python3 has the nbd module (python3-libnbd)

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-tls-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

function sh(cmd: string, args: string[]): void {
  const r = spawnSync(cmd, args, { cwd: dir, encoding: 'utf8', timeout: 30_000 });
  assert.equal(r.status, 0, `${cmd} ${args.join(' ')} failed: ${r.stderr}`);
}

/** A CA, a server certificate for 127.0.0.1 signed by it, a client certificate, and an unrelated CA. */
function makeCertificates(): void {
  const subj = (cn: string): string[] => ['-subj', `/CN=${cn}`];
  sh('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem', '-days', '2', ...subj('duet test CA')]);
  fs.writeFileSync(path.join(dir, 'server.cnf'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\n');
  sh('openssl', ['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'server-key.pem', '-out', 'server.csr', ...subj('127.0.0.1')]);
  sh('openssl', ['x509', '-req', '-in', 'server.csr', '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-out', 'server-cert.pem', '-days', '2', '-extfile', 'server.cnf']);
  fs.writeFileSync(path.join(dir, 'client.cnf'), 'extendedKeyUsage=clientAuth\n');
  sh('openssl', ['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'client-key.pem', '-out', 'client.csr', ...subj('client')]);
  sh('openssl', ['x509', '-req', '-in', 'client.csr', '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-out', 'client-cert.pem', '-days', '2', '-extfile', 'client.cnf']);
  // libnbd looks for ca-cert.pem, client-cert.pem, client-key.pem in one directory.
  const good = path.join(dir, 'client-good');
  fs.mkdirSync(good);
  for (const f of ['ca-cert.pem', 'client-cert.pem', 'client-key.pem']) fs.copyFileSync(path.join(dir, f), path.join(good, f));
  const noClientCert = path.join(dir, 'client-nocert');
  fs.mkdirSync(noClientCert);
  fs.copyFileSync(path.join(dir, 'ca-cert.pem'), path.join(noClientCert, 'ca-cert.pem'));
  const wrong = path.join(dir, 'client-wrong-ca');
  fs.mkdirSync(wrong);
  sh('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', path.join(wrong, 'other-key.pem'), '-out', path.join(wrong, 'ca-cert.pem'), '-days', '2', ...subj('other CA')]);
}

interface Served {
  uri: string;
  stop(): Promise<void>;
}

async function serve(extra: string[]): Promise<Served> {
  const image = path.join(dir, 'disk.img');
  if (!fs.existsSync(image)) fs.writeFileSync(image, Buffer.alloc(4 * 1024 * 1024));
  const child = spawn(process.execPath, [DUET, 'serve', image, '--listen', '127.0.0.1:0', ...extra], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  const uri = await new Promise<string>((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`server did not start: ${stderr}`)), 10_000);
    child.stdout.on('data', (d) => {
      out += d;
      const m = /listening (nbd:\/\/\S+)/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    child.on('exit', (code) => reject(new Error(`server exited ${code}: ${stderr}`)));
  });
  return {
    uri,
    stop: () =>
      new Promise((resolve) => {
        if (child.exitCode !== null) return resolve();
        child.once('exit', () => resolve());
        child.kill('SIGTERM');
      }),
  };
}

/** Run a libnbd client: mode 'require' | 'disable', certificate dir or '', returns {ok, out}. */
function client(uri: string, tlsMode: 'require' | 'disable', certDir: string): { ok: boolean; out: string } {
  const script = `
import nbd, sys
h = nbd.NBD()
h.set_tls(nbd.TLS_${tlsMode === 'require' ? 'REQUIRE' : 'DISABLE'})
if sys.argv[2]: h.set_tls_certificates(sys.argv[2])
try:
    h.connect_uri(sys.argv[1])
    h.pwrite(b"\\xa5" * 65536, 4096)
    h.flush()
    assert h.pread(65536, 4096) == b"\\xa5" * 65536
    print("ok tls=%s" % h.get_tls_negotiated())
except nbd.Error as e:
    print("refused: %s" % e.string)
    sys.exit(1)
`;
  const url = tlsMode === 'require' ? uri.replace(/^nbd:/, 'nbds:') : uri;
  const r = spawnSync(PYTHON, ['-c', script, url, certDir], { encoding: 'utf8', timeout: 30_000 });
  return { ok: r.status === 0, out: `${r.stdout}${r.stderr}` };
}

const haveTools = spawnSync('openssl', ['version']).status === 0 && spawnSync(PYTHON, ['-c', 'import nbd']).status === 0;

test('STARTTLS with --tls require', { skip: !haveTools && 'needs openssl and python3-libnbd' }, async () => {
  makeCertificates();
  const s = await serve(['--tls', 'require', '--tls-cert', path.join(dir, 'server-cert.pem'), '--tls-key', path.join(dir, 'server-key.pem')]);
  try {
    const good = client(s.uri, 'require', path.join(dir, 'client-nocert'));
    assert.ok(good.ok, good.out);
    assert.match(good.out, /ok tls=True/);
    const plain = client(s.uri, 'disable', '');
    assert.ok(!plain.ok, `a client without TLS must be refused: ${plain.out}`);
    const wrongCa = client(s.uri, 'require', path.join(dir, 'client-wrong-ca'));
    assert.ok(!wrongCa.ok, `a client that does not trust the server's CA must fail: ${wrongCa.out}`);
    // The server is still serving after the refusals.
    assert.ok(client(s.uri, 'require', path.join(dir, 'client-nocert')).ok);
  } finally {
    await s.stop();
  }
});

test('--tls on lets clients choose, --tls-ca demands client certificates', { skip: !haveTools && 'needs openssl and python3-libnbd' }, async () => {
  const cert = ['--tls-cert', path.join(dir, 'server-cert.pem'), '--tls-key', path.join(dir, 'server-key.pem')];
  const optional = await serve(['--tls', 'on', ...cert]);
  try {
    assert.ok(client(optional.uri, 'disable', '').ok, 'plain client allowed with --tls on');
    assert.ok(client(optional.uri, 'require', path.join(dir, 'client-nocert')).ok, 'TLS client allowed with --tls on');
  } finally {
    await optional.stop();
  }
  const mutual = await serve(['--tls', 'require', ...cert, '--tls-ca', path.join(dir, 'ca-cert.pem')]);
  try {
    const withCert = client(mutual.uri, 'require', path.join(dir, 'client-good'));
    assert.ok(withCert.ok, withCert.out);
    const without = client(mutual.uri, 'require', path.join(dir, 'client-nocert'));
    assert.ok(!without.ok, `a client without a certificate must be refused: ${without.out}`);
  } finally {
    await mutual.stop();
  }
});

test('TLS option errors are one line, exit 2', () => {
  const image = path.join(dir, 'untouched.img');
  fs.writeFileSync(image, Buffer.alloc(4096, 7));
  const r = spawnSync(process.execPath, [DUET, 'serve', image, '--listen', '127.0.0.1:0', '--tls', 'require'], { encoding: 'utf8', timeout: 10_000 });
  assert.equal(r.status, 2);
  assert.match(r.stderr, /^duet: --tls require needs --tls-cert FILE and --tls-key FILE\n$/);
  const bad = spawnSync(process.execPath, [DUET, 'serve', image, '--tls-cert', '/nonexistent.pem', '--tls-key', '/nonexistent.pem'], { encoding: 'utf8', timeout: 10_000 });
  assert.equal(bad.status, 2);
  assert.equal(bad.stderr.split('\n').filter(Boolean).length, 1, bad.stderr);
  assert.match(bad.stderr, /^duet: --tls-cert \/nonexistent.pem: cannot read/);
  assert.deepEqual(fs.readFileSync(image), Buffer.alloc(4096, 7));
});

test('STARTTLS on connections served by worker threads', { skip: !haveTools && 'needs openssl and python3-libnbd' }, async () => {
  const s = await serve(['--workers', '2', '--tls', 'require', '--tls-cert', path.join(dir, 'server-cert.pem'), '--tls-key', path.join(dir, 'server-key.pem')]);
  try {
    for (let i = 0; i < 3; i++) {
      const r = client(s.uri, 'require', path.join(dir, 'client-nocert'));
      assert.ok(r.ok, r.out);
    }
    assert.ok(!client(s.uri, 'disable', '').ok, 'plain client refused by a worker too');
  } finally {
    await s.stop();
  }
});

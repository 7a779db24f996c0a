/**
 * The cluster CA and the nodes' certificates (tls.ts, x509.ts): checked by
 * Node's X.509 parser, by OpenSSL, and by a real TLS handshake.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import fs from 'node:fs';
import https from 'node:https';
import os from 'node:os';
import path from 'node:path';
import { caKeyOf, clusterCa, serverCertificate, writeCaFile, SERVER_CERT_DAYS } from '../../src/api/tls.js';
import { createPublicKey } from 'node:crypto';

const secret = Buffer.from('a-cluster-secret-of-some-length');
const other = Buffer.from('another-cluster-secret-entirely');
/** The nodes a CA of these tests may vouch for. */
const NAMES = { ips: ['192.0.2.7', '::1', '127.0.0.1', '127.0.0.2', '::ffff:192.0.2.1'], dns: ['invalid', 'localhost'] };

test('tls: the CA key follows from the secret alone (both nodes and every CLI agree), and differs for another secret', () => {
  const a = createPublicKey(caKeyOf(secret)).export({ type: 'spki', format: 'der' });
  const b = createPublicKey(caKeyOf(Buffer.from(secret))).export({ type: 'spki', format: 'der' });
  const c = createPublicKey(caKeyOf(other)).export({ type: 'spki', format: 'der' });
  assert.ok(a.equals(b));
  assert.ok(!a.equals(c));
});

test('tls: the CA is a CA (basic constraints, key usage), self-signed; a server certificate names the node and its addresses and chains to it', () => {
  const ca = clusterCa(secret, 'home', NAMES);
  const caX = new X509Certificate(ca.certPem);
  assert.equal(caX.ca, true);
  assert.match(caX.subject, /CN=duet cluster home CA/);
  assert.ok(caX.verify(caX.publicKey), 'self-signed');
  assert.ok(caX.checkIssued(caX));
  const now = new Date('2026-12-01T12:00:00Z');
  const s = serverCertificate(ca, 'alpha', ['192.0.2.7', '::1', 'localhost'], now);
  const x = new X509Certificate(s.cert);
  assert.equal(x.ca, false);
  assert.ok(x.verify(caX.publicKey));
  assert.ok(x.checkIssued(caX));
  assert.equal(x.checkIP('192.0.2.7'), '192.0.2.7');
  assert.equal(x.checkIP('::1'), '::1');
  assert.equal(x.checkHost('localhost'), 'localhost');
  assert.equal(x.checkHost('alpha'), undefined, 'the node name is the subject, not a DNS name it answers for');
  assert.match(x.subject, /CN=alpha/);
  assert.equal(x.checkIP('192.0.2.8'), undefined);
  assert.equal(new Date(x.validTo).getTime(), now.getTime() + SERVER_CERT_DAYS * 86400_000);
  assert.ok(new Date(x.validFrom).getTime() < now.getTime());
  // Another cluster's CA did not sign it.
  assert.ok(!x.verify(new X509Certificate(clusterCa(other, 'home', NAMES).certPem).publicKey));
});

test('tls: OpenSSL verifies the chain for TLS server use', (t) => {
  if (spawnSync('openssl', ['version']).error) {
    if (process.env.CI) assert.fail('openssl is missing under CI');
    return t.skip('openssl not installed');
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-tls-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const ca = clusterCa(secret, 'home', NAMES);
  const s = serverCertificate(ca, 'alpha', ['127.0.0.2']);
  fs.writeFileSync(path.join(dir, 'ca.pem'), ca.certPem);
  fs.writeFileSync(path.join(dir, 'alpha.pem'), s.cert);
  const ok = spawnSync('openssl', ['verify', '-purpose', 'sslserver', '-verify_ip', '127.0.0.2', '-CAfile', path.join(dir, 'ca.pem'), path.join(dir, 'alpha.pem')], { encoding: 'utf8' });
  assert.equal(ok.status, 0, ok.stdout + ok.stderr);
  const wrongIp = spawnSync('openssl', ['verify', '-purpose', 'sslserver', '-verify_ip', '127.0.0.3', '-CAfile', path.join(dir, 'ca.pem'), path.join(dir, 'alpha.pem')], { encoding: 'utf8' });
  assert.notEqual(wrongIp.status, 0, 'another address is refused');
  fs.writeFileSync(path.join(dir, 'other.pem'), clusterCa(other, 'home', NAMES).certPem);
  const wrongCa = spawnSync('openssl', ['verify', '-CAfile', path.join(dir, 'other.pem'), path.join(dir, 'alpha.pem')], { encoding: 'utf8' });
  assert.notEqual(wrongCa.status, 0, "another cluster's CA is refused");
});

test('tls: a handshake with the cluster CA succeeds; with another cluster CA, or none, it is refused', async (t) => {
  const ca = clusterCa(secret, 'home', NAMES);
  const s = serverCertificate(ca, 'alpha', ['127.0.0.1']);
  const server = https.createServer({ key: s.key, cert: s.cert }, (_req, res) => res.end('hello'));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => server.close(() => resolve())));
  const port = (server.address() as { port: number }).port;
  const get = (caPem?: string): Promise<string> =>
    new Promise((resolve, reject) => {
      const req = https.get({ host: '127.0.0.1', port, path: '/', agent: false, ...(caPem ? { ca: caPem } : {}) }, (res) => {
        let body = '';
        res.on('data', (c: Buffer) => (body += c.toString()));
        res.on('end', () => resolve(body));
      });
      req.on('error', reject);
    });
  assert.equal(await get(ca.certPem), 'hello');
  // A second derivation of the CA (as the other node or a CLI makes it) is as good: same key, same name.
  assert.equal(await get(clusterCa(secret, 'home', NAMES).certPem), 'hello');
  await assert.rejects(get(clusterCa(other, 'home', NAMES).certPem), /certificate|signature/i);
  await assert.rejects(get(), /self-signed|unable to (get|verify)/i);
});

test('tls: the CA file beside the secret is written once, kept while the key is the same, replaced (whole) when the secret changes', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-tls-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'secret.ca.pem');
  assert.equal(writeCaFile(file, clusterCa(secret, 'home', NAMES)), true);
  const first = fs.readFileSync(file, 'utf8');
  assert.equal(writeCaFile(file, clusterCa(secret, 'home', NAMES)), false, 'the same key: the file stays as it is');
  assert.equal(fs.readFileSync(file, 'utf8'), first);
  assert.equal(writeCaFile(file, clusterCa(other, 'home', NAMES)), true);
  const x = new X509Certificate(fs.readFileSync(file));
  assert.ok(x.publicKey.equals(createPublicKey(caKeyOf(other))));
  assert.deepEqual(fs.readdirSync(dir), ['secret.ca.pem'], 'no temporary file left');
});

test('tls: the CA vouches only for the cluster\'s addresses and names (name constraints): a certificate for anything else is refused by OpenSSL and by Node', async (t) => {
  const ca = clusterCa(secret, 'home', NAMES);
  const mapped = new X509Certificate(serverCertificate(ca, 'alpha', ['::ffff:192.0.2.1']).cert);
  assert.equal(mapped.checkIP('::ffff:192.0.2.1'), '::ffff:192.0.2.1', 'an IPv6 address with an IPv4 tail is encoded right');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-tls-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  fs.writeFileSync(path.join(dir, 'ca.pem'), ca.certPem);
  // A certificate the secret's holder could sign for another site: refused.
  const rogue = serverCertificate(ca, 'alpha', ['203.0.113.9']);
  fs.writeFileSync(path.join(dir, 'rogue.pem'), rogue.cert);
  const v = spawnSync('openssl', ['verify', '-CAfile', path.join(dir, 'ca.pem'), path.join(dir, 'rogue.pem')], { encoding: 'utf8' });
  assert.notEqual(v.status, 0, v.stdout);
  assert.match(v.stdout + v.stderr, /subtree|name constraint/i);
  const rogueHost = serverCertificate(ca, 'alpha', ['127.0.0.1', 'www.example.org']);
  fs.writeFileSync(path.join(dir, 'rogue-host.pem'), rogueHost.cert);
  const v2 = spawnSync('openssl', ['verify', '-CAfile', path.join(dir, 'ca.pem'), path.join(dir, 'rogue-host.pem')], { encoding: 'utf8' });
  assert.notEqual(v2.status, 0, 'a host name outside the cluster: refused');
  const server = https.createServer({ key: rogueHost.key, cert: rogueHost.cert }, (_req, res) => res.end('hello'));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => server.close(() => resolve())));
  const port = (server.address() as { port: number }).port;
  await assert.rejects(
    new Promise((resolve, reject) => https.get({ host: '127.0.0.1', port, path: '/', agent: false, ca: ca.certPem }, resolve).on('error', reject)),
    /subtree|constraint/i,
  );
  // The CA file follows a change of the nodes (the constraints), not only of the key.
  const file = path.join(dir, 'secret.ca.pem');
  writeCaFile(file, ca);
  assert.equal(writeCaFile(file, clusterCa(secret, 'home', NAMES)), false);
  assert.equal(writeCaFile(file, clusterCa(secret, 'home', { ips: [...NAMES.ips, '192.0.2.8'], dns: NAMES.dns })), true);
});

test('tls: the nodes and the CLI trust the CA without its constraints (a node whose addresses changed is still trusted); the browser copy keeps them', () => {
  const browser = clusterCa(secret, 'home', NAMES);
  const trust = clusterCa(secret, 'home');
  const moved = new X509Certificate(serverCertificate(browser, 'alpha', ['203.0.113.9']).cert);
  assert.ok(moved.verify(new X509Certificate(trust.certPem).publicKey));
  assert.ok(moved.checkIssued(new X509Certificate(trust.certPem)));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-tls-'));
  try {
    fs.writeFileSync(path.join(dir, 'trust.pem'), trust.certPem);
    fs.writeFileSync(path.join(dir, 'browser.pem'), browser.certPem);
    fs.writeFileSync(path.join(dir, 'moved.pem'), serverCertificate(browser, 'alpha', ['203.0.113.9']).cert);
    assert.equal(spawnSync('openssl', ['verify', '-CAfile', path.join(dir, 'trust.pem'), path.join(dir, 'moved.pem')]).status, 0);
    assert.notEqual(spawnSync('openssl', ['verify', '-CAfile', path.join(dir, 'browser.pem'), path.join(dir, 'moved.pem')]).status, 0);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  // Two copies never share issuer and serial (NSS refuses a second certificate with both).
  assert.notEqual(new X509Certificate(trust.certPem).serialNumber, new X509Certificate(browser.certPem).serialNumber);
});

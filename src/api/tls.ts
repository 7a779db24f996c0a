/**
 * TLS for the API without anyone running a CA by hand.
 *
 * The cluster CA's key is derived from the cluster secret (HKDF → a P-256
 * scalar), so both nodes and every CLI that has the secret agree on it
 * without copying another file, and a new secret makes a new CA. Each node
 * daemon issues its own server certificate at start (a fresh key, its
 * address and name as subject alternative names) and renews it before it
 * ends. The CA certificate is also written beside the secret
 * (cluster-ca.pem) for browsers to import; `duet cert` prints it.
 *
 * Deriving the CA from the secret gives nothing away: whoever has the
 * secret can already drive every node.
 */
import { createECDH, createHash, createPrivateKey, createPublicKey, generateKeyPairSync, hkdfSync, scryptSync, type KeyObject } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { makeCertificate, pem, tbsOf } from './x509.js';

/** The order of P-256's base point: a private scalar must be in [1, n-1]. */
const P256_N = BigInt('0xffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551');

const DAY_MS = 24 * 3600_000;
/** What browsers accept for a server certificate (398 days), with a day to spare. */
export const SERVER_CERT_DAYS = 397;
/** Renew a server certificate this long before it ends. */
export const RENEW_BEFORE_MS = 30 * DAY_MS;

export interface ClusterCa {
  key: KeyObject;
  spki: Buffer;
  certPem: string;
  subject: string;
}

function b64url(b: Buffer): string {
  return b.toString('base64url');
}

/**
 * The CA's P-256 key, from the secret. scrypt first: the CA's public key is
 * public (in every certificate a node shows), so each guess of a weak secret
 * checked against it must cost an attacker what scrypt costs (~25 ms and 8 MiB
 * here; more would slow every CLI command, which derives it once).
 */
export function caKeyOf(secret: Buffer): KeyObject {
  const seed = scryptSync(secret, 'duet-cluster-ca-v1', 32, { N: 2 ** 13, r: 8, p: 1, maxmem: 64 * 1024 * 1024 });
  for (let counter = 0; ; counter++) {
    const d = Buffer.from(hkdfSync('sha256', seed, Buffer.from('duet-cluster-ca'), Buffer.from(`p256-key-${counter}`), 32));
    const v = BigInt(`0x${d.toString('hex')}`);
    // Out of range once in 2^32: the next counter.
    if (v === 0n || v >= P256_N) continue;
    const ecdh = createECDH('prime256v1');
    ecdh.setPrivateKey(d);
    const pub = ecdh.getPublicKey();
    return createPrivateKey({ key: { kty: 'EC', crv: 'P-256', d: b64url(d), x: b64url(pub.subarray(1, 33)), y: b64url(pub.subarray(33, 65)) }, format: 'jwk' });
  }
}

/** What the CA may vouch for (its name constraints): the nodes' addresses and host names. */
export interface CaNames {
  ips: string[];
  dns: string[];
}

/**
 * The cluster CA. Name-constrained to the cluster's own addresses and node
 * names: an admin imports it in a browser, and a CA that every holder of
 * the secret can sign with must not be able to vouch for any other site.
 */
export function clusterCa(secret: Buffer, cluster: string, names?: CaNames): ClusterCa {
  const key = caKeyOf(secret);
  const spki = createPublicKey(key).export({ type: 'spki', format: 'der' });
  const subject = `duet cluster ${cluster} CA`;
  // Every field but the signature follows from the secret, so any two copies are interchangeable.
  const der = makeCertificate({
    subject,
    organization: 'duet',
    // One serial per content (the constraints), so two different copies never share issuer and serial (NSS refuses that).
    serial: createHash('sha256').update(spki).update(JSON.stringify(names ?? null)).digest().subarray(0, 16),
    notBefore: new Date(Date.UTC(2025, 0, 1)),
    notAfter: new Date(Date.UTC(2049, 11, 31, 23, 59, 59)),
    publicKeySpki: spki,
    issuer: { subject, organization: 'duet', spki, privateKey: key },
    ca: true,
    ...(names ? { permitted: names } : {}),
  });
  return { key, spki, certPem: pem(der), subject };
}

export interface ServerCertificate {
  key: string;
  cert: string;
  notAfter: Date;
}

/** A server certificate for a node: its addresses (and localhost on loopback), its name as the subject, signed by the cluster CA. */
export function serverCertificate(ca: ClusterCa, node: string, altNames: string[], now = new Date()): ServerCertificate {
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const spki = publicKey.export({ type: 'spki', format: 'der' });
  const notAfter = new Date(now.getTime() + SERVER_CERT_DAYS * DAY_MS);
  const der = makeCertificate({
    subject: node,
    organization: 'duet',
    serial: createHash('sha256').update(spki).digest().subarray(0, 16),
    // An hour back: a peer whose clock is a little behind still accepts it.
    notBefore: new Date(now.getTime() - 3600_000),
    notAfter,
    publicKeySpki: spki,
    issuer: { subject: ca.subject, organization: 'duet', spki: ca.spki, privateKey: ca.key },
    ca: false,
    altNames: [...new Set(altNames)],
  });
  // The node's certificate alone is presented: clients hold the CA (a second copy sent along would clash in NSS).
  return { key: privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, cert: pem(der), notAfter };
}

/**
 * Write the CA certificate to FILE unless the same certificate (all but its
 * signature, which differs from copy to copy) is already there; atomically:
 * a reader never sees half a file.
 */
export function writeCaFile(file: string, ca: ClusterCa): boolean {
  try {
    const have = pemToDer(fs.readFileSync(file, 'utf8'));
    if (have && tbsOf(have).equals(tbsOf(pemToDer(ca.certPem)!))) return false;
  } catch {
    // Missing, unreadable or not a certificate: written below.
  }
  const tmp = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.tmp`);
  fs.writeFileSync(tmp, ca.certPem, { mode: 0o644 });
  fs.renameSync(tmp, file);
  return true;
}

function pemToDer(text: string): Buffer | undefined {
  const m = /-----BEGIN CERTIFICATE-----([^-]+)-----END CERTIFICATE-----/.exec(text);
  return m ? Buffer.from(m[1].replace(/\s+/g, ''), 'base64') : undefined;
}

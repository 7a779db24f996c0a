/**
 * Just enough DER to write X.509 v3 certificates signed with ECDSA P-256
 * (RFC 5280): a cluster CA and the nodes' server certificates. Node can
 * parse and verify certificates (crypto.X509Certificate) but not make them;
 * this is the making, checked in the tests by Node, OpenSSL and Chromium.
 */
import { createHash, sign, type KeyObject } from 'node:crypto';
import net from 'node:net';

function len(n: number): Buffer {
  if (n < 0x80) return Buffer.from([n]);
  const bytes: number[] = [];
  for (let v = n; v > 0; v = Math.floor(v / 256)) bytes.unshift(v & 0xff);
  return Buffer.from([0x80 | bytes.length, ...bytes]);
}

export function tlv(tag: number, content: Buffer): Buffer {
  return Buffer.concat([Buffer.from([tag]), len(content.length), content]);
}

const seq = (...items: Buffer[]): Buffer => tlv(0x30, Buffer.concat(items));
const set = (...items: Buffer[]): Buffer => tlv(0x31, Buffer.concat(items));

/** A non-negative INTEGER from big-endian bytes (a 0 byte in front when the top bit is set). */
function integer(bytes: Buffer): Buffer {
  let i = 0;
  while (i < bytes.length - 1 && bytes[i] === 0 && bytes[i + 1] < 0x80) i++;
  const b = bytes.subarray(i);
  return tlv(0x02, b[0] >= 0x80 ? Buffer.concat([Buffer.from([0]), b]) : b);
}

function oid(dotted: string): Buffer {
  const parts = dotted.split('.').map(Number);
  const out: number[] = [40 * parts[0] + parts[1]];
  for (const p of parts.slice(2)) {
    const chunk: number[] = [p & 0x7f];
    for (let v = Math.floor(p / 128); v > 0; v = Math.floor(v / 128)) chunk.unshift((v & 0x7f) | 0x80);
    out.push(...chunk);
  }
  return tlv(0x06, Buffer.from(out));
}

const utf8 = (s: string): Buffer => tlv(0x0c, Buffer.from(s, 'utf8'));
const bitString = (b: Buffer, unusedBits = 0): Buffer => tlv(0x03, Buffer.concat([Buffer.from([unusedBits]), b]));
const octets = (b: Buffer): Buffer => tlv(0x04, b);
const TRUE = tlv(0x01, Buffer.from([0xff]));

/** UTCTime up to 2049, GeneralizedTime from 2050 (RFC 5280 4.1.2.5). */
function time(d: Date): Buffer {
  const iso = d.toISOString().replace(/\.\d{3}Z$/, 'Z').replace(/[-:T]/g, '');
  return d.getUTCFullYear() < 2050 ? tlv(0x17, Buffer.from(iso.slice(2))) : tlv(0x18, Buffer.from(iso));
}

const OID = {
  ecdsaWithSha256: '1.2.840.10045.4.3.2',
  commonName: '2.5.4.3',
  organization: '2.5.4.10',
  basicConstraints: '2.5.29.19',
  keyUsage: '2.5.29.15',
  extKeyUsage: '2.5.29.37',
  subjectAltName: '2.5.29.17',
  subjectKeyId: '2.5.29.14',
  authorityKeyId: '2.5.29.35',
  nameConstraints: '2.5.29.30',
  serverAuth: '1.3.6.1.5.5.7.3.1',
  clientAuth: '1.3.6.1.5.5.7.3.2',
};

function name(cn: string, org: string): Buffer {
  return seq(set(seq(oid(OID.organization), utf8(org))), set(seq(oid(OID.commonName), utf8(cn))));
}

function extension(id: string, critical: boolean, value: Buffer): Buffer {
  return critical ? seq(oid(id), TRUE, octets(value)) : seq(oid(id), octets(value));
}

/** The key identifier of RFC 5280 4.2.1.2 (1): SHA-1 of the subjectPublicKey bits. */
export function keyId(spkiDer: Buffer): Buffer {
  // The SPKI of an EC key: SEQ { SEQ alg, BIT STRING key }; the key's bytes are the BIT STRING's after its unused-bits byte.
  const ecPoint = spkiDer.subarray(spkiDer.length - 65);
  return createHash('sha1').update(ecPoint).digest();
}

function generalName(n: string): Buffer {
  const ip = net.isIP(n);
  if (ip === 4) return tlv(0x87, Buffer.from(n.split('.').map(Number)));
  if (ip === 6) return tlv(0x87, ipv6Bytes(n));
  return tlv(0x82, Buffer.from(n, 'ascii'));
}

/** The 16 bytes of an IPv6 address, an IPv4 tail (::ffff:192.0.2.1) included. */
export function ipv6Bytes(addr: string): Buffer {
  let text = addr;
  const v4 = /(\d+\.\d+\.\d+\.\d+)$/.exec(text);
  if (v4) {
    const b = v4[1].split('.').map(Number);
    text = `${text.slice(0, -v4[1].length)}${((b[0] << 8) | b[1]).toString(16)}:${((b[2] << 8) | b[3]).toString(16)}`;
  }
  const [head, tail] = text.includes('::') ? text.split('::') : [text, undefined];
  const h = head ? head.split(':') : [];
  const t = tail ? tail.split(':') : [];
  const groups = tail === undefined ? h : [...h, ...Array(8 - h.length - t.length).fill('0'), ...t];
  const out = Buffer.alloc(16);
  groups.forEach((g, i) => out.writeUInt16BE(parseInt(g || '0', 16), i * 2));
  return out;
}

export interface CertificateSpec {
  subject: string;
  organization: string;
  /** 1–20 bytes, first byte < 0x80 after trimming. */
  serial: Buffer;
  notBefore: Date;
  notAfter: Date;
  /** The subject's public key, DER SubjectPublicKeyInfo. */
  publicKeySpki: Buffer;
  issuer: { subject: string; organization: string; spki: Buffer; privateKey: KeyObject };
  ca: boolean;
  /** DNS names and IP addresses (server certificates). */
  altNames?: string[];
  /** A CA's name constraints (RFC 5280 4.2.1.10): the only addresses and names it may vouch for. */
  permitted?: { ips: string[]; dns: string[] };
}

/** A DER certificate. */
export function makeCertificate(s: CertificateSpec): Buffer {
  const alg = seq(oid(OID.ecdsaWithSha256));
  const exts: Buffer[] = [
    extension(OID.basicConstraints, true, s.ca ? seq(TRUE, integer(Buffer.from([0]))) : seq()),
    // CA: digitalSignature, keyCertSign, cRLSign (bits 0, 5, 6); server: digitalSignature (bit 0).
    extension(OID.keyUsage, true, s.ca ? bitString(Buffer.from([0x86]), 1) : bitString(Buffer.from([0x80]), 7)),
    extension(OID.subjectKeyId, false, octets(keyId(s.publicKeySpki))),
    extension(OID.authorityKeyId, false, seq(tlv(0x80, keyId(s.issuer.spki)))),
  ];
  if (!s.ca) exts.push(extension(OID.extKeyUsage, false, seq(oid(OID.serverAuth), oid(OID.clientAuth))));
  if (s.altNames?.length) exts.push(extension(OID.subjectAltName, false, seq(...s.altNames.map(generalName))));
  if (s.permitted) {
    // GeneralSubtree { base }: an address with a full mask (one host), a DNS name (it and its subdomains).
    const subtrees = [
      ...s.permitted.ips.map((ip) => {
        const bytes = net.isIP(ip) === 4 ? Buffer.from(ip.split('.').map(Number)) : ipv6Bytes(ip);
        return seq(tlv(0x87, Buffer.concat([bytes, Buffer.alloc(bytes.length, 0xff)])));
      }),
      ...s.permitted.dns.map((d) => seq(tlv(0x82, Buffer.from(d, 'ascii')))),
    ];
    exts.push(extension(OID.nameConstraints, true, seq(tlv(0xa0, Buffer.concat(subtrees)))));
  }
  const tbs = seq(
    tlv(0xa0, integer(Buffer.from([2]))),
    integer(s.serial),
    alg,
    name(s.issuer.subject, s.issuer.organization),
    seq(time(s.notBefore), time(s.notAfter)),
    name(s.subject, s.organization),
    s.publicKeySpki,
    tlv(0xa3, seq(...exts)),
  );
  const signature = sign('sha256', tbs, { key: s.issuer.privateKey, dsaEncoding: 'der' });
  return seq(tbs, alg, bitString(signature));
}

export function pem(der: Buffer, label = 'CERTIFICATE'): string {
  const b64 = der.toString('base64').replace(/(.{64})/g, '$1\n').replace(/\n$/, '');
  return `-----BEGIN ${label}-----\n${b64}\n-----END ${label}-----\n`;
}

/** The to-be-signed part of a DER certificate: what two copies of one certificate share. */
export function tbsOf(der: Buffer): Buffer {
  // Certificate ::= SEQUENCE { tbsCertificate, ... }: skip the outer header, then take the first element whole.
  const inner = headerLength(der, 0);
  return der.subarray(inner, inner + elementLength(der, inner));
}

function headerLength(der: Buffer, at: number): number {
  const first = der[at + 1];
  return first < 0x80 ? 2 : 2 + (first & 0x7f);
}

function elementLength(der: Buffer, at: number): number {
  const first = der[at + 1];
  if (first < 0x80) return 2 + first;
  let n = 0;
  for (let i = 0; i < (first & 0x7f); i++) n = n * 256 + der[at + 2 + i];
  return 2 + (first & 0x7f) + n;
}

/**
 * Requests to the witness carry an HMAC of the request with the cluster
 * secret and a timestamp, so only the nodes can ask for votes, and a
 * captured request stops working after a minute (the witness protocol is
 * plain TCP, not TLS like the node API).
 */
import { createHmac, timingSafeEqual } from 'node:crypto';
import { UserError } from '../util/errors.js';

const SKEW_MS = 60_000;

function mac(secret: Buffer, ts: number, body: string): Buffer {
  return createHmac('sha256', secret).update(`duet-api-v1\n${ts}\n${body}`).digest();
}

export function signRequest<T extends object>(secret: Buffer, request: T): T & { auth: { ts: number; mac: string } } {
  const ts = Date.now();
  return { ...request, auth: { ts, mac: mac(secret, ts, JSON.stringify(request)).toString('hex') } };
}

/** Throws (one line) unless `request` was signed with `secret` within the last minute; strips the auth field. */
export function verifyRequest(secret: Buffer, request: Record<string, unknown>): void {
  const auth = request.auth as { ts?: unknown; mac?: unknown } | undefined;
  delete request.auth;
  if (!auth || typeof auth.ts !== 'number' || typeof auth.mac !== 'string') throw new UserError('the node API needs a request signed with the cluster secret');
  if (Math.abs(Date.now() - auth.ts) > SKEW_MS) throw new UserError('the request is too old or the clocks differ by more than a minute');
  const expected = mac(secret, auth.ts, JSON.stringify(request));
  const given = Buffer.from(auth.mac, 'hex');
  if (given.length !== expected.length || !timingSafeEqual(given, expected)) throw new UserError('wrong cluster secret: the node refused the request');
}

/**
 * The API's bearer token: derived from the cluster secret, so every holder
 * of the secret (both nodes, the admin's CLI) has it without another file to
 * copy, and a new secret retires it. The token is not the secret: a browser
 * that keeps it cannot join the replication links or sign witness requests.
 *
 * There is no timestamp and no replay window: the API runs over TLS (or on
 * loopback only), where nobody can capture a request to replay it.
 */
import { createHash, createHmac, timingSafeEqual } from 'node:crypto';

export function apiToken(secret: Buffer): string {
  return createHmac('sha256', secret).update('duet-api-token-v1').digest('base64url');
}

/**
 * The nodes' own token: the peer routes (/api/v1/node/...: boot a VM here without asking who
 * decides, take a migration in, hold I/O) take only it, so the token a browser keeps cannot start a
 * second copy of a running VM. Only a holder of the secret (a node) can compute it.
 */
export function peerToken(secret: Buffer): string {
  return createHmac('sha256', secret).update('duet-peer-token-v1').digest('base64url');
}

/** Is `header` "Bearer TOKEN" with the right token? Constant time in the token's content. */
export function bearerOk(header: string | undefined, token: string): boolean {
  if (typeof header !== 'string') return false;
  const m = /^Bearer\s+(\S+)\s*$/i.exec(header);
  if (!m) return false;
  // Hashing both makes equal lengths, so neither the length nor the bytes leak through timing.
  const given = createHash('sha256').update(m[1]).digest();
  const want = createHash('sha256').update(token).digest();
  return timingSafeEqual(given, want);
}

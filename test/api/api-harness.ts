/**
 * Raw HTTP(S) requests to a node's API, for tests that must send what the
 * client (src/api/client.ts) never would: no token, a wrong one, a
 * malformed body.
 */
import https from 'node:https';
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { loadClusterConfig, loadSecret } from '../../src/cluster/config.js';
import { apiTargetOf } from '../../src/api/target.js';
import type { ApiTarget } from '../../src/api/client.js';
import { peerToken as peerTokenOf } from '../../src/api/token.js';

export interface RawAnswer {
  status: number;
  headers: http.IncomingHttpHeaders;
  text: string;
  json: unknown;
}

/** The token the nodes use between them (the /api/v1/node/ routes take only it). */
export function peerToken(file: string): string {
  return peerTokenOf(loadSecret(loadClusterConfig(file)));
}

export function targetOf(file: string, node: string): ApiTarget {
  const config = loadClusterConfig(file);
  return apiTargetOf(config, node, loadSecret(config), `node ${node}`);
}

export function raw(
  t: ApiTarget,
  method: string,
  urlPath: string,
  o: { body?: string | Buffer; contentType?: string; token?: string | null; ca?: string | null; timeoutMs?: number } = {},
): Promise<RawAnswer> {
  const headers: Record<string, string> = {};
  const token = o.token === undefined ? t.token : o.token;
  if (token !== null) headers.authorization = `Bearer ${token}`;
  if (o.body !== undefined) {
    headers['content-type'] = o.contentType ?? 'application/json';
    headers['content-length'] = String(Buffer.byteLength(o.body));
  }
  const ca = o.ca === undefined ? t.ca : o.ca ?? undefined;
  const options: https.RequestOptions = { host: t.host, port: t.port, method, path: urlPath, headers, agent: false, ...(ca ? { ca } : {}) };
  return new Promise((resolve, reject) => {
    const req = t.ca ? https.request(options) : http.request(options);
    const timer = setTimeout(() => req.destroy(new Error(`${method} ${urlPath}: no answer within ${o.timeoutMs ?? 30_000} ms`)), o.timeoutMs ?? 30_000);
    req.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    req.on('response', (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        clearTimeout(timer);
        const text = Buffer.concat(chunks).toString('utf8');
        let json: unknown;
        try {
          json = text ? JSON.parse(text) : undefined;
        } catch {
          json = undefined;
        }
        resolve({ status: res.statusCode ?? 0, headers: res.headers, text, json });
      });
    });
    req.end(o.body);
  });
}

/** The CA file a node wrote beside the cluster secret. */
export function caFile(clusterDir: string): string {
  return path.join(clusterDir, 'secret.ca.pem');
}

export function readCa(clusterDir: string): string {
  return fs.readFileSync(caFile(clusterDir), 'utf8');
}

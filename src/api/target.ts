/**
 * The address, token and CA by which one reaches a node's API, from the
 * cluster file and its secret: what the CLI and a peer node both need.
 */
import type { ClusterConfig } from '../cluster/config.js';
import type { ApiTarget } from './client.js';
import { clusterCa, type ClusterCa } from './tls.js';
import { apiToken } from './token.js';

const cas = new Map<string, ClusterCa>();

/** The cluster CA for this secret (derived once a process). */
export function caOf(secret: Buffer, cluster: string): ClusterCa {
  const k = `${cluster}\n${secret.toString('base64')}`;
  let ca = cas.get(k);
  if (!ca) {
    ca = clusterCa(secret, cluster);
    cas.set(k, ca);
  }
  return ca;
}

export function apiTargetOf(config: ClusterConfig, node: string, secret: Buffer, what: string, localAddress?: string): ApiTarget {
  return {
    host: config.nodes[node].address,
    port: config.api.port,
    token: apiToken(secret),
    ...(config.api.tls ? { ca: caOf(secret, config.cluster).certPem } : {}),
    ...(localAddress ? { localAddress } : {}),
    what,
  };
}

/**
 * The address, token and CA by which one reaches a node's API, from the
 * cluster file and its secret: what the CLI and a peer node both need.
 */
import { isLoopback, type ClusterConfig } from '../cluster/config.js';
import type { ApiTarget } from './client.js';
import { clusterCa, type CaNames, type ClusterCa } from './tls.js';
import { apiToken, peerToken } from './token.js';

const cas = new Map<string, ClusterCa>();

/** The cluster CA for this secret and these nodes (derived once a process: the derivation is slow on purpose). */
export function caOf(config: ClusterConfig, secret: Buffer): ClusterCa {
  const names = caNamesOf(config);
  const k = `${config.cluster}\n${secret.toString('base64')}\n${JSON.stringify(names)}`;
  let ca = cas.get(k);
  if (!ca) {
    ca = clusterCa(secret, config.cluster, names);
    cas.set(k, ca);
  }
  return ca;
}

/** What the CA may vouch for: the nodes' addresses and names (and localhost on loopback), nothing else. */
export function caNamesOf(config: ClusterConfig): CaNames {
  const ips = new Set<string>();
  const dns = new Set<string>();
  for (const [name, n] of Object.entries(config.nodes)) {
    ips.add(n.address);
    if (n.heartbeatAddress) ips.add(n.heartbeatAddress);
    dns.add(name);
    if (isLoopback(n.address)) dns.add('localhost');
  }
  return { ips: [...ips], dns: [...dns] };
}

/** `peer`: a node calling a node (the peers' token, which the /api/v1/node/ routes need). */
export function apiTargetOf(config: ClusterConfig, node: string, secret: Buffer, what: string, localAddress?: string, peer = false): ApiTarget {
  return {
    host: config.nodes[node].address,
    port: config.api.port,
    token: peer ? peerToken(secret) : apiToken(secret),
    ...(config.api.tls ? { ca: caOf(config, secret).certPem } : {}),
    ...(localAddress ? { localAddress } : {}),
    what,
  };
}

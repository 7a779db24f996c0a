/**
 * The address, token and CA by which one reaches a node's API, from the
 * cluster file and its secret: what the CLI and a peer node both need.
 */
import { isLoopback, type ClusterConfig } from '../cluster/config.js';
import type { ApiTarget } from './client.js';
import { clusterCa, type CaNames, type ClusterCa } from './tls.js';
import { apiToken, peerToken } from './token.js';

const cas = new Map<string, ClusterCa>();

function cached(key: string, make: () => ClusterCa): ClusterCa {
  let ca = cas.get(key);
  if (!ca) {
    ca = make();
    cas.set(key, ca);
  }
  return ca;
}

/**
 * The cluster CA as a browser imports it (the file beside the secret, `duet cert`): name-constrained to the
 * cluster's addresses. Derived once a process: the derivation is slow on purpose.
 */
export function caOf(config: ClusterConfig, secret: Buffer): ClusterCa {
  const names = caNamesOf(config);
  return cached(`${config.cluster}\n${secret.toString('base64')}\n${JSON.stringify(names)}`, () => clusterCa(secret, config.cluster, names));
}

/**
 * The cluster CA as the CLI and the nodes trust it: the same key and name, without the constraints, so a
 * node whose address list changed (a rolling change of the cluster file) is still trusted by the others.
 */
export function trustOf(config: ClusterConfig, secret: Buffer): ClusterCa {
  return cached(`${config.cluster}\n${secret.toString('base64')}\ntrust`, () => clusterCa(secret, config.cluster));
}

/**
 * What the browser's copy may vouch for: the nodes' addresses, and no real DNS name: only the reserved
 * .invalid (RFC 2606), and localhost on loopback. A DNS constraint also covers the name's subdomains, so
 * node names (home, lan) are never put there: node certificates name IP addresses.
 */
export function caNamesOf(config: ClusterConfig): CaNames {
  const ips = new Set<string>();
  const dns = new Set<string>(['invalid']);
  for (const n of Object.values(config.nodes)) {
    ips.add(n.address);
    if (n.heartbeatAddress) ips.add(n.heartbeatAddress);
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
    ...(config.api.tls ? { ca: trustOf(config, secret).certPem } : {}),
    ...(localAddress ? { localAddress } : {}),
    what,
  };
}

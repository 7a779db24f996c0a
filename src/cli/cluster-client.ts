/**
 * How the CLI reaches a node daemon: `--config FILE --node NAME` (or
 * DUET_CONFIG / DUET_NODE) name the cluster file and the node; requests go
 * to that node's API address, signed with the cluster secret.
 */
import type { Command } from 'commander';
import type { Readable, Writable } from 'node:stream';
import { ClusterConfig, loadClusterConfig, loadSecret, nodeOf } from '../cluster/config.js';
import { callApi, type ApiTarget } from '../api/client.js';
import { apiTargetOf } from '../api/target.js';
import type { NodeCommand } from '../cluster/node.js';
import { UserError } from '../util/errors.js';

export interface ClusterTarget {
  config: ClusterConfig;
  node: string;
}

/** The cluster named by the global options or the environment, if any. */
/** The cluster file the global options or the environment name, if any. */
function configOf(cmd: Command): ClusterConfig | undefined {
  const file = (cmd.optsWithGlobals() as { config?: string }).config ?? process.env.DUET_CONFIG;
  return file ? loadClusterConfig(file) : undefined;
}

export function clusterOf(cmd: Command): ClusterTarget | undefined {
  const config = configOf(cmd);
  if (!config) return undefined;
  return { config, node: nodeOf(config, (cmd.optsWithGlobals() as { node?: string }).node ?? process.env.DUET_NODE) };
}

/** The cluster file alone (commands about the cluster as a whole: token, cert), no node needed. */
export function requireConfig(cmd: Command): ClusterConfig {
  const config = configOf(cmd);
  if (!config) throw new UserError('name the cluster file: --config FILE (or DUET_CONFIG)');
  return config;
}

export function requireCluster(cmd: Command): ClusterTarget {
  const t = clusterOf(cmd);
  if (!t) throw new UserError('name the cluster file and the node: --config FILE --node NAME (or DUET_CONFIG and DUET_NODE)');
  return t;
}

/** How to reach the node's API (address, token, CA). */
export function nodeTarget(t: ClusterTarget, node = t.node): ApiTarget {
  return apiTargetOf(t.config, node, loadSecret(t.config), `the duet daemon of node ${node} (is \`duet node run --node ${node}\` running?)`);
}

export async function callNode(t: ClusterTarget, request: NodeCommand, io: { input?: Readable; output?: Writable; timeoutMs?: number } = {}, node = t.node): Promise<unknown> {
  return callApi(nodeTarget(t, node), request as NodeCommand & Record<string, unknown>, io);
}

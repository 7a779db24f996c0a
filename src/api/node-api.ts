/**
 * The node daemon's API: the HTTP server of server.ts with this node's
 * token, certificate, event log, metrics and dashboard.
 */
import { caFileOf, isLoopback, type ClusterConfig } from '../cluster/config.js';
import type { EventLog } from '../cluster/events.js';
import type { NodeCommand } from '../cluster/node.js';
import type { Readable, Writable } from 'node:stream';
import type { Logger } from '../util/log.js';
import { errnoCode } from '../util/errors.js';
import { ApiServer } from './server.js';
import { dashboardFile } from './dashboard.js';
import { Metrics, type MetricsSource } from './metrics.js';
import { caOf } from './target.js';
import { RENEW_BEFORE_MS, serverCertificate, writeCaFile, type ServerCertificate } from './tls.js';
import { apiToken, peerToken } from './token.js';

export interface ApiHost {
  readonly config: ClusterConfig;
  readonly node: string;
  readonly address: string;
  readonly secret: Buffer;
  readonly events: EventLog;
  readonly log: Logger;
  metricsSource(): MetricsSource;
  handle(c: NodeCommand, io: { input?: Readable; output?: Writable }): Promise<unknown>;
}

export interface NodeApi {
  readonly url: string;
  close(): Promise<void>;
}

/** Look every 12 hours whether the certificate is due for renewal. */
const RENEW_CHECK_MS = 12 * 3600_000;

export async function startApi(host: ApiHost): Promise<NodeApi> {
  const { config, node, address, secret, log } = host;
  let tls: ServerCertificate | undefined;
  const altNames = [address, ...(config.nodes[node].heartbeatAddress ? [config.nodes[node].heartbeatAddress!] : []), ...(isLoopback(address) ? ['localhost'] : [])];
  if (config.api.tls) {
    const ca = caOf(config, secret);
    const file = caFileOf(config);
    try {
      if (writeCaFile(file, ca)) log.info({ event: 'api-ca-written', file }, `the cluster CA's certificate is in ${file} (import it in a browser to trust the dashboard)`);
    } catch (err) {
      log.warn({ event: 'api-ca-not-written', file, err: errnoCode(err) ?? (err as Error).message }, `cannot write the cluster CA's certificate to ${file}; \`duet cert\` prints it`);
    }
    tls = serverCertificate(ca, node, altNames);
  }
  const metrics = new Metrics(host.metricsSource());
  const server = await ApiServer.listen({
    host: address,
    port: config.api.port,
    token: apiToken(secret),
    peerToken: peerToken(secret),
    ...(tls ? { tls: { key: tls.key, cert: tls.cert } } : {}),
    // The route's schema checked the fields: the command is one of NodeCommand's.
    handler: (c, io) => host.handle(c as unknown as NodeCommand, io),
    events: host.events,
    metrics: () => metrics.scrape(),
    dashboard: dashboardFile,
    metricsNeedToken: config.api.metricsToken,
    observe: (route, method, status, seconds) => metrics.observeApi(route, method, status, seconds),
    log,
  });
  log.info({ event: 'api-listening', url: server.url }, `API and dashboard at ${server.url}/`);
  let timer: NodeJS.Timeout | undefined;
  if (tls) {
    timer = setInterval(() => {
      if (tls!.notAfter.getTime() - Date.now() > RENEW_BEFORE_MS) return;
      tls = serverCertificate(caOf(config, secret), node, altNames);
      server.setCertificate({ key: tls.key, cert: tls.cert });
      log.info({ event: 'api-certificate-renewed', notAfter: tls.notAfter.toISOString() }, 'renewed the API certificate');
    }, RENEW_CHECK_MS);
    timer.unref();
  }
  return {
    url: server.url,
    close: async () => {
      clearInterval(timer);
      await server.close();
      metrics.close();
    },
  };
}

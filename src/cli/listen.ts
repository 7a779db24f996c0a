import { UserError, errnoCode } from '../util/errors.js';

export interface ListenAddress {
  host: string;
  port: number;
}

export const DEFAULT_NBD_PORT = 10809;

/** Parse HOST:PORT, [V6]:PORT, HOST or :PORT. */
export function parseListen(text: string, defaultHost = '127.0.0.1'): ListenAddress {
  const m = /^(?:\[([^\]]+)\]|([^:]*))(?::(\d+))?$/.exec(text);
  if (!m) throw new UserError(`--listen ${text}: expected HOST:PORT (e.g. 127.0.0.1:10809)`);
  const host = m[1] ?? (m[2] || defaultHost);
  const port = m[3] === undefined ? DEFAULT_NBD_PORT : Number(m[3]);
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new UserError(`--listen ${text}: port must be 0..65535`);
  return { host, port };
}

export function formatHostPort(host: string, port: number): string {
  return host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
}

export function listenError(addr: ListenAddress, err: unknown): UserError {
  const where = formatHostPort(addr.host, addr.port);
  switch (errnoCode(err)) {
    case 'EADDRINUSE':
      return new UserError(`${where} is already in use by another program: stop it or choose another --listen HOST:PORT`);
    case 'EADDRNOTAVAIL':
      return new UserError(`${where}: no such local address: choose an address of this machine with --listen`);
    case 'EACCES':
      return new UserError(`${where}: permission denied to listen there: use a port above 1023 or run as root`);
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
      return new UserError(`${where}: unknown host name: use an IP address with --listen`);
    default:
      return new UserError(`${where}: cannot listen: ${(err as Error).message}`);
  }
}

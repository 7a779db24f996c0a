/**
 * Free TCP ports for tests that must write ports into a cluster file before
 * starting the processes that listen on them.
 */
import dgram from 'node:dgram';
import net from 'node:net';

/**
 * `count` distinct free ports. Every probe stays open until all are chosen:
 * a port probed and closed can be handed out again by the very next probe
 * (a cluster test failed that way, 1 run in 410). Probes listen on the
 * wildcard address, so a port some process uses on any loopback address
 * (127.0.0.2, 127.0.0.3...) is not chosen either.
 */
export async function freePorts(count: number): Promise<number[]> {
  const probes: net.Server[] = [];
  const udp: dgram.Socket[] = [];
  const chosen: number[] = [];
  try {
    // Free for UDP too (a node's heartbeat port is UDP): a port taken there is skipped, bounded.
    for (let tries = 0; chosen.length < count; tries++) {
      if (tries > count * 20) throw new Error(`no ${count} ports free for both TCP and UDP`);
      const s = net.createServer();
      probes.push(s);
      await new Promise<void>((resolve, reject) => {
        s.once('error', reject);
        s.listen({ port: 0, host: '0.0.0.0', exclusive: true }, resolve);
      });
      const port = (s.address() as net.AddressInfo).port;
      const u = dgram.createSocket('udp4');
      const ok = await new Promise<boolean>((resolve) => {
        u.once('error', () => resolve(false));
        u.bind({ port, address: '0.0.0.0', exclusive: true }, () => resolve(true));
      });
      if (ok) {
        udp.push(u);
        chosen.push(port);
      } else u.close();
    }
    return chosen;
  } finally {
    await Promise.all(probes.map((s) => new Promise<void>((resolve) => (s.listening ? s.close(() => resolve()) : resolve()))));
    for (const u of udp) u.close();
  }
}

/**
 * Free TCP ports for tests that must write ports into a cluster file before
 * starting the processes that listen on them.
 */
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
  try {
    for (let i = 0; i < count; i++) {
      const s = net.createServer();
      probes.push(s);
      await new Promise<void>((resolve, reject) => {
        s.once('error', reject);
        s.listen({ port: 0, host: '0.0.0.0', exclusive: true }, resolve);
      });
    }
    return probes.map((s) => (s.address() as net.AddressInfo).port);
  } finally {
    await Promise.all(probes.map((s) => new Promise<void>((resolve) => (s.listening ? s.close(() => resolve()) : resolve()))));
  }
}

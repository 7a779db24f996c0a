/**
 * The shapes of the API's answers (what scripts may rely on, as the CLI's
 * --json output): the fields named here are always there; more fields may
 * come (objects pass unknown keys through). The route test checks every
 * answer of a real daemon against them.
 */
import { z } from 'zod';

const count = z.number().int().nonnegative();
const progress = z.object({ doneBytes: count, totalBytes: count, rateBytesPerSec: z.number().nonnegative() }).passthrough();

export const errorSchema = z.object({ error: z.string().min(1), hint: z.string().min(1), exitCode: z.number().int().positive() }).strict();

export const clusterStatusSchema = z
  .object({
    cluster: z.string(),
    node: z.string(),
    time: z.string().datetime({ offset: true }),
    quorum: z.boolean(),
    witness: z.object({ configured: z.boolean(), reachable: z.boolean().nullable() }).passthrough(),
    warnings: z.array(z.string()),
    nodes: z.array(z.object({ name: z.string(), state: z.enum(['online', 'offline', 'fenced', 'draining']) }).passthrough()),
    resources: z.array(z.object({ name: z.string(), primary: z.string().nullable(), disk: z.string(), connection: z.string(), outOfSyncBytes: count }).passthrough()),
    vms: z.array(z.object({ name: z.string(), node: z.string().nullable(), state: z.string() }).passthrough()),
  })
  .passthrough();

const peerSchema = z
  .object({
    node: z.string(),
    connection: z.string(),
    disk: z.string(),
    role: z.string(),
    outOfSyncBytes: count,
    resync: progress.nullable(),
  })
  .passthrough();

export const nodeStatusSchema = z
  .object({
    node: z.string(),
    resources: z.array(
      z
        .object({
          name: z.string(),
          role: z.enum(['Primary', 'Secondary']),
          disk: z.enum(['UpToDate', 'Inconsistent', 'Outdated', 'Diskless', 'Failed']),
          outOfSyncBytes: count,
          quorum: z.boolean(),
          suspended: z.boolean(),
          peers: z.array(peerSchema),
        })
        .passthrough(),
    ),
  })
  .passthrough();

export const poolListSchema = z.array(z.object({ name: z.string(), resources: z.array(z.string()), open: z.boolean(), sizeBytes: count.optional(), usedBytes: count.optional() }).passthrough());

export const poolInfoSchema = z.object({ name: z.string(), uuid: z.string(), sizeBytes: count, usedBytes: count, freeBytes: count, usedPercent: z.number(), volumes: count }).passthrough();

export const volumeSchema = z
  .object({ name: z.string(), sizeBytes: count, usedBytes: count, snapshot: z.boolean(), readOnly: z.boolean(), origin: z.string().nullable(), exported: z.boolean(), connections: count })
  .passthrough();

export const vmListSchema = z.object({
  vms: z.array(z.object({ name: z.string(), node: z.string().nullable(), state: z.enum(['running', 'stopped', 'starting', 'migrating', 'paused', 'failed']), memoryBytes: count, cpus: count, disks: z.array(z.string()) }).passthrough()),
});

export const eventsSchema = z.object({
  events: z.array(z.object({ seq: count, time: z.string(), event: z.string(), node: z.string(), level: z.enum(['info', 'warn', 'error']), message: z.string() }).passthrough()),
  lastSeq: count,
});

export const fenceTestSchema = z.object({ node: z.string(), by: z.string(), ok: z.boolean(), lines: z.array(z.string()) }).passthrough();

export const verifySchema = z.object({ resource: z.string(), doneBytes: count, totalBytes: count, outOfSyncBytes: count }).passthrough();

export const indexSchema = z.object({
  version: z.literal(1),
  routes: z.array(z.object({ method: z.string(), url: z.string(), command: z.string(), summary: z.string() }).passthrough()),
});

/**
 * The API token (token.ts) and the route table (routes.ts) on their own.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { apiToken, bearerOk } from '../../src/api/token.js';
import { ROUTES, paramsOf, requestOf, routeOf } from '../../src/api/routes.js';

test('token: derived from the secret, not the secret; the bearer check takes only the exact token', () => {
  const secret = Buffer.from('test-cluster-secret-0123456789');
  const token = apiToken(secret);
  assert.equal(token, apiToken(Buffer.from('test-cluster-secret-0123456789')));
  assert.notEqual(token, apiToken(Buffer.from('test-cluster-secret-0123456788')));
  assert.ok(!token.includes(secret.toString()));
  assert.ok(bearerOk(`Bearer ${token}`, token));
  assert.ok(bearerOk(`bearer ${token}`, token), 'the scheme is case-insensitive (RFC 7235)');
  for (const h of [undefined, '', token, `Bearer`, `Bearer ${token}x`, `Bearer ${token.slice(1)}`, `Basic ${token}`, `Bearer ${token} extra`]) assert.equal(bearerOk(h, token), false, String(h));
});

test('routes: every command maps to its route and back (parameters in the path, encoded; the rest in the query or body)', () => {
  const keys = new Set(ROUTES.map((r) => `${r.method} ${r.url}`));
  assert.equal(keys.size, ROUTES.length, 'no route twice');
  const status = requestOf({ cmd: 'resource.status' });
  assert.equal(status.path, '/api/v1/resources');
  const one = requestOf({ cmd: 'resource.status', resource: 'a' });
  assert.equal(one.path, '/api/v1/resources/a');
  const vol = requestOf({ cmd: 'vol.resize', pool: 'p a', name: 'v/1', sizeBytes: 5, force: true });
  assert.equal(vol.method, 'PUT');
  assert.equal(vol.path, '/api/v1/pools/p%20a/volumes/v%2F1/size');
  assert.deepEqual(vol.body, { sizeBytes: 5, force: true });
  const events = requestOf({ cmd: 'events.list', since: 7, limit: undefined });
  assert.equal(events.path, '/api/v1/events?since=7');
  assert.equal(events.body, undefined);
  for (const r of ROUTES) {
    assert.equal(routeOf({ cmd: r.cmd, ...Object.fromEntries(paramsOf(r).map((p) => [p, 'x'])) }).url, r.url, r.url);
    for (const p of paramsOf(r)) assert.ok(p in r.fields.shape, `${r.url}: ${p} is a field`);
  }
  assert.throws(() => routeOf({ cmd: 'nothing.such' }), /no API route/);
});

/**
 * The dashboard in a real browser: Debian's Chromium driven by
 * playwright-core (no browser download). It signs in with the cluster's
 * token, shows both nodes and the demo VM, migrates the VM with a
 * confirmation, and shows the state change and the event as they happen.
 * DUET_SCREENSHOTS=DIR saves the screenshots there (docs/ has them).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, X509Certificate } from 'node:crypto';
import fs from 'node:fs';
import tls from 'node:tls';
import path from 'node:path';
import { chromium, type Page } from 'playwright-core';
import { tmpDir } from '../e2e/harness.js';
import { ADDRESS } from '../e2e/cluster-harness.js';
import { vmCluster, vmList, vmSkip, waitFor } from '../vm/vm-harness.js';
import { targetOf } from './api-harness.js';

const CHROMIUM = '/usr/bin/chromium';
const skip = vmSkip || (!fs.existsSync(CHROMIUM) && process.env.CI !== 'true' ? 'chromium is not installed (apt-get install chromium)' : false);

test('dashboard: sign in, see both nodes and the demo VM, migrate it with a confirmation, watch it move', { skip, timeout: 300_000 }, async (t) => {
  const c = await vmCluster(t, 'cpus: 1, prefer: alpha');
  await waitFor(async () => (await vmList(c, 'alpha'))[0].state === 'running', 90_000, () => `vm web running\n${c.describe()}`);
  const alpha = targetOf(c.file, 'alpha');
  // Trust exactly this node's key, once its certificate checked out against the cluster CA here (Chromium's own store is not touched).
  const leaf = await new Promise<X509Certificate>((resolve, reject) => {
    const s = tls.connect({ host: alpha.host, port: alpha.port, ca: alpha.ca }, () => {
      resolve(s.getPeerX509Certificate()!);
      s.end();
    });
    s.on('error', reject);
  });
  const spkiHash = createHash('sha256').update(leaf.publicKey.export({ type: 'spki', format: 'der' })).digest('base64');
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox', `--ignore-certificate-errors-spki-list=${spkiHash}`] });
  t.after(() => browser.close());
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const pageErrors: string[] = [];
  page.on('pageerror', (e) => pageErrors.push(e.message));
  const shots = process.env.DUET_SCREENSHOTS ?? tmpDir(t, 'duet-dashboard-');
  const shot = async (p: Page, name: string): Promise<void> => {
    const file = path.join(shots, name);
    await p.screenshot({ path: file, fullPage: true });
    assert.ok(fs.statSync(file).size > 1000, `${name} is a picture`);
  };

  await page.goto(`https://${ADDRESS.alpha}:${alpha.port}/`);
  await page.locator('#login').waitFor({ state: 'visible' });
  // A wrong token is refused on the page.
  await page.fill('#token', 'not-the-token');
  await page.click('#login-form button[type=submit]');
  await page.locator('#login-error', { hasText: 'wrong token' }).waitFor();
  await page.fill('#token', alpha.token);
  await page.click('#login-form button[type=submit]');
  await page.locator('#app').waitFor({ state: 'visible' });

  // Both nodes online, the quorum, the resource, the pool, the VM on alpha.
  await page.locator('#nodes tr[data-node=alpha]', { hasText: 'online' }).waitFor();
  await page.locator('#nodes tr[data-node=bravo]', { hasText: 'online' }).waitFor();
  await page.locator('#resources tr[data-resource=a]', { hasText: 'Primary' }).waitFor();
  await page.locator('#pools tr[data-pool=pa]').waitFor();
  const vmRow = page.locator('#vms tr[data-vm=web]');
  await vmRow.locator('.vm-node', { hasText: 'alpha' }).waitFor();
  await vmRow.locator('.badge', { hasText: 'running' }).waitFor();
  await page.locator('#events li').first().waitFor();
  await shot(page, 'dashboard.png');

  // Migrate: the confirmation first (cancel does nothing), then for real.
  await vmRow.locator('button[data-act=migrate][data-to=bravo]').click();
  await page.locator('#confirm', { hasText: 'Live-migrate VM web to bravo' }).waitFor({ state: 'visible' });
  await shot(page, 'dashboard-confirm.png');
  await page.click('#confirm-cancel');
  await new Promise((r) => setTimeout(r, 1000));
  assert.equal((await vmList(c, 'alpha'))[0].node, 'alpha', 'cancelled: nothing moved');
  await vmRow.locator('button[data-act=migrate][data-to=bravo]').click();
  await page.click('#confirm-ok');
  // The page follows the move: the VM on bravo, running, and the event in the list (server-sent).
  await vmRow.locator('.vm-node', { hasText: 'bravo' }).waitFor({ timeout: 150_000 });
  await vmRow.locator('.badge', { hasText: 'running' }).waitFor();
  await page.locator('#events li[data-event=vm-migrated]').first().waitFor({ timeout: 30_000 });
  await page.locator('#message', { hasText: /migrated/ }).waitFor({ timeout: 30_000 });
  assert.equal((await vmList(c, 'alpha'))[0].node, 'bravo');
  await shot(page, 'dashboard-migrated.png');
  assert.deepEqual(pageErrors, []);
});

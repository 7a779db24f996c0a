/**
 * The dashboard's files: the page and its style from web/, the script as
 * compiled by `npm run build` into dist/web/. Only these names are served,
 * so no path from a request ever reaches the file system.
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository (or installed package) root: this file is dist/src/api/dashboard.js. */
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');

const FILES: Record<string, { file: string; type: string }> = {
  'index.html': { file: path.join(ROOT, 'web', 'index.html'), type: 'text/html; charset=utf-8' },
  'style.css': { file: path.join(ROOT, 'web', 'style.css'), type: 'text/css; charset=utf-8' },
  'app.js': { file: path.join(ROOT, 'dist', 'web', 'app.js'), type: 'text/javascript; charset=utf-8' },
};

export function dashboardFile(name: string): { body: Buffer; type: string } | undefined {
  const f = Object.hasOwn(FILES, name) ? FILES[name] : undefined;
  if (!f) return undefined;
  try {
    return { body: fs.readFileSync(f.file), type: f.type };
  } catch {
    return undefined;
  }
}

import { PageConfig } from '@jupyterlab/coreutils';

/** The command that opens the GUI (launcher tile, menus, Running panel item). */
export const OPEN_COMMAND = 'libertem:open';

/**
 * The GUI's address. Not URLExt.join: it drops the trailing slash, and the
 * LiberTEM GUI loads its assets relative to `libertem/`. getBaseUrl() ends with '/'.
 */
export function guiUrl(): string {
  return PageConfig.getBaseUrl() + 'libertem/';
}

/** The status and control API of the server extension (ends with '/'). */
export function apiUrl(): string {
  return PageConfig.getBaseUrl() + 'libertem-proxy/api/';
}

// The server extension's status and control API at {base_url}libertem-proxy/api/
// (libertem_jupyter_proxy/api.py; fields documented in docs/usage.rst).

import { ServerConnection } from '@jupyterlab/services';

import { apiUrl } from './urls';

export type BackendState = 'stopped' | 'starting' | 'running' | 'stopping' | 'failed';

/** Why LiberTEM is not available (BackendError.to_dict on the server). */
export interface IBackendError {
  error: string;
  message: string;
  exit_code: number | null;
  hint: string;
  log: string[];
}

/** Resource figures of LiberTEM's process group (libertem_jupyter_proxy/resources.py). */
export interface IResources {
  /** Live processes in the group (libertem-server, its dask workers, helpers). */
  processes: number;
  /** Of those, dask worker processes. */
  workers: number;
  /** Resident set size summed over the group, bytes (shared pages counted per process). */
  rss_bytes: number;
  /** Proportional set size summed over the group, bytes; null where the kernel has none. */
  pss_bytes: number | null;
  /** CPU time (user + system) of the group, including reaped children, seconds. */
  cpu_seconds: number;
}

export interface IStatus {
  state: BackendState;
  pid: number | null;
  /** Seconds since LiberTEM became ready (only while running). */
  uptime: number | null;
  /** Seconds since the start began (only while starting). */
  start_elapsed: number | null;
  last_error: IBackendError | null;
  /** Present since 0.2 (issue 16); null while no process runs. */
  resources?: IResources | null;
  /** Set on a control call that failed. */
  error?: IBackendError;
}

/** A request to the API with Jupyter's credentials (token, XSRF cookie header). */
async function call(
  path: string,
  method: 'GET' | 'POST',
  settings: ServerConnection.ISettings
): Promise<IStatus> {
  const response = await ServerConnection.makeRequest(apiUrl() + path, { method }, settings);
  let body: IStatus;
  try {
    body = (await response.json()) as IStatus;
  } catch {
    throw new ServerConnection.ResponseError(response);
  }
  // 502 from start/restart still carries the status (with the error): use it
  if (!response.ok && !(body && typeof body.state === 'string')) {
    throw new ServerConnection.ResponseError(response);
  }
  return body;
}

/** GET status: does not count as user activity on the server (no idle-timer reset). */
export function fetchStatus(settings: ServerConnection.ISettings): Promise<IStatus> {
  return call('status', 'GET', settings);
}

/** Stop LiberTEM (graceful, then SIGTERM/SIGKILL to its process group). */
export function stopBackend(settings: ServerConnection.ISettings): Promise<IStatus> {
  return call('stop', 'POST', settings);
}

/** Start LiberTEM, forgetting past crashes (the Retry button); resolves once it is ready. */
export function startBackend(settings: ServerConnection.ISettings): Promise<IStatus> {
  return call('start', 'POST', settings);
}

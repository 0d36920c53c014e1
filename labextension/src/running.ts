// LiberTEM in JupyterLab's Running panel and Notebook 7's Running tab.
//
// One section, "LiberTEM", with at most one item: the current run of
// libertem-server (state, uptime, memory of its whole process group, number of
// dask workers). Clicking the item opens the GUI; its shut-down button stops
// LiberTEM through the stop API; a failed start shows the reason and a Retry
// button (the start API). When LiberTEM is stopped the section is empty, as it
// is for kernels.
//
// The figures come from GET {base_url}libertem-proxy/api/status, on the
// panel's refresh button and on a gentle poll. That endpoint does not count as
// activity (neither for Jupyter's idle culler nor for LiberTEM's idle stop), so
// an open Jupyter tab does not keep LiberTEM or Jupyter alive.

import {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { showErrorMessage } from '@jupyterlab/apputils';
import { IRunningSessionManagers, IRunningSessions } from '@jupyterlab/running';
import type { ServerConnection } from '@jupyterlab/services';
import { Poll } from '@lumino/polling';
import { Signal } from '@lumino/signaling';
import * as React from 'react';

import { formatBytes, formatDuration } from './format';
import { libertemIcon } from './icon';
import {
  fetchStatus,
  IStatus,
  startBackend,
  stopBackend
} from './status';
import { OPEN_COMMAND } from './urls';

/** Milliseconds between status requests while nothing changes: a gentle poll, as often as
 * JupyterLab polls its own kernels and sessions. */
const INTERVAL = 10000;
/** ... and while LiberTEM starts or stops, so the panel follows the transition. */
const TRANSITION_INTERVAL = 1000;
/** Upper bound of the back-off after failed requests (server gone, network down). */
const MAX_INTERVAL = 60000;

/** The memory figure shown: PSS where the kernel has it (shared pages split), else RSS. */
export function memoryFigure(status: IStatus): string | null {
  const r = status.resources;
  if (!r) {
    return null;
  }
  return formatBytes(r.pss_bytes ?? r.rss_bytes);
}

function plural(n: number, one: string, many = `${one}s`): string {
  return `${n} ${n === 1 ? one : many}`;
}

/** The Running-panel manager of the "LiberTEM" section. */
export class LiberTEMRunningManager implements IRunningSessions.IManager {
  readonly name = 'LiberTEM';
  readonly shutdownLabel = 'Shut Down LiberTEM';
  readonly shutdownAllLabel = 'Shut Down';
  readonly shutdownAllConfirmationText =
    'Shut down LiberTEM and all its workers? Its GUI stops working until you open it again.';
  readonly supportsMultipleViews = false;

  constructor(options: LiberTEMRunningManager.IOptions) {
    this._settings = options.serverSettings;
    this._openGui = options.openGui;
    this._poll = new Poll<IStatus, Error, 'standby'>({
      auto: true,
      factory: () => this._update(),
      frequency: { interval: INTERVAL, backoff: true, max: MAX_INTERVAL },
      name: 'libertem-jupyter-proxy:status',
      standby: 'when-hidden'
    });
  }

  get runningChanged(): Signal<this, void> {
    return this._runningChanged;
  }

  /** The last status seen (null before the first answer). */
  get status(): IStatus | null {
    return this._status;
  }

  running(): IRunningSessions.IRunningItem[] {
    const status = this._status;
    if (!status || status.state === 'stopped') {
      return [];
    }
    if (status.state === 'failed' && !this._retrying) {
      return [this._failedItem(status)];
    }
    return [this._runItem(status)];
  }

  refreshRunning(): void {
    void this._poll.refresh();
  }

  shutdownAll(): void {
    void this._stop();
  }

  dispose(): void {
    this._poll.dispose();
    Signal.clearData(this);
  }

  private _runItem(status: IStatus): IRunningSessions.IRunningItem {
    const state = this._retrying ? 'starting' : status.state;
    const r = status.resources;
    const memory = memoryFigure(status);
    const parts: string[] = [];
    if (memory) {
      parts.push(memory);
    }
    if (r) {
      parts.push(plural(r.workers, 'worker'));
    }
    let stateText: string = state;
    if (state === 'running' && status.uptime !== null) {
      stateText = `running ${formatDuration(status.uptime)}`;
    } else if (state === 'starting' && status.start_elapsed !== null) {
      stateText = `starting (${formatDuration(status.start_elapsed)})`;
    }
    const title = [`LiberTEM: ${stateText}`];
    if (status.pid !== null) {
      title.push(`libertem-server process group ${status.pid}`);
    }
    if (r) {
      title.push(
        `Memory: ${formatBytes(r.rss_bytes)} RSS` +
          (r.pss_bytes !== null ? `, ${formatBytes(r.pss_bytes)} PSS` : '') +
          ` in ${plural(r.processes, 'process', 'processes')}`,
        `Workers: ${r.workers}`,
        `CPU time: ${formatDuration(r.cpu_seconds)}`
      );
    }
    title.push('Click to open the LiberTEM GUI');
    return {
      className: `jp-LiberTEM-runningItem jp-mod-${state}`,
      context: state,
      icon: () => libertemIcon,
      // two lines: the panel is narrow, and a detail column would cut the figures off
      label: () =>
        React.createElement(
          React.Fragment,
          null,
          React.createElement(
            'div',
            { className: 'jp-LiberTEM-headline' },
            'LiberTEM ',
            React.createElement('span', { className: 'jp-LiberTEM-state' }, stateText)
          ),
          parts.length > 0 &&
            React.createElement('div', { className: 'jp-LiberTEM-figures' }, parts.join(' · '))
        ),
      labelTitle: () => title.join('\n'),
      open: () => this._openGui(),
      // nothing to shut down while it already stops
      shutdown: state === 'stopping' ? undefined : () => void this._stop()
    };
  }

  private _failedItem(status: IStatus): IRunningSessions.IRunningItem {
    const error = status.last_error;
    const reason = error?.message || 'LiberTEM failed to start.';
    const title = [reason];
    if (error?.hint) {
      title.push(error.hint);
    }
    if (error?.log?.length) {
      title.push('', 'Last log lines:', ...error.log.slice(-5));
    }
    return {
      className: 'jp-LiberTEM-runningItem jp-mod-failed',
      context: 'failed',
      icon: () => libertemIcon,
      label: () =>
        React.createElement(
          React.Fragment,
          null,
          React.createElement(
            'div',
            { className: 'jp-LiberTEM-headline' },
            'LiberTEM ',
            React.createElement('span', { className: 'jp-LiberTEM-state' }, 'failed'),
            React.createElement(
              'button',
              {
                className: 'jp-LiberTEM-retry jp-Button jp-mod-styled jp-mod-accept',
                title: 'Start LiberTEM again',
                onClick: (event: React.MouseEvent) => {
                  event.stopPropagation(); // not the item's own click (open)
                  void this._retry();
                }
              },
              'Retry'
            )
          ),
          React.createElement('div', { className: 'jp-LiberTEM-reason' }, reason)
        ),
      labelTitle: () => title.join('\n'),
      // the GUI URL shows the full error page (log lines, Retry) for this state
      open: () => this._openGui()
    };
  }

  /** One poll step: fetch the status and re-render; faster while a transition runs. */
  private async _update(): Promise<IStatus> {
    const status = await fetchStatus(this._settings);
    this._set(status);
    return status;
  }

  private _set(status: IStatus): void {
    this._status = status;
    const busy = this._retrying || status.state === 'starting' || status.state === 'stopping';
    const interval = busy ? TRANSITION_INTERVAL : INTERVAL;
    if (this._poll && this._poll.frequency.interval !== interval) {
      this._poll.frequency = { ...this._poll.frequency, interval };
    }
    this._runningChanged.emit();
  }

  private async _stop(): Promise<void> {
    try {
      this._set(await stopBackend(this._settings));
    } catch (reason) {
      void showErrorMessage('Could not shut down LiberTEM', String(reason));
    }
    void this._poll.refresh();
  }

  private async _retry(): Promise<void> {
    this._retrying = true;
    this._runningChanged.emit();
    void this._poll.refresh();
    try {
      // answers once LiberTEM is ready, or with the error and a 502
      this._set(await startBackend(this._settings));
    } catch (reason) {
      void showErrorMessage('Could not start LiberTEM', String(reason));
    } finally {
      this._retrying = false;
      void this._poll.refresh();
    }
  }

  private _settings: ServerConnection.ISettings;
  private _openGui: () => void;
  private _poll: Poll<IStatus, Error, 'standby'>;
  private _status: IStatus | null = null;
  private _retrying = false;
  private _runningChanged = new Signal<this, void>(this);
}

export namespace LiberTEMRunningManager {
  export interface IOptions {
    serverSettings: ServerConnection.ISettings;
    /** Opens the GUI (the `libertem:open` command, so the `openIn` setting applies). */
    openGui: () => void;
  }
}

export const runningPlugin: JupyterFrontEndPlugin<void> = {
  id: 'libertem-jupyter-proxy:running',
  description: 'LiberTEM in the Running panel (JupyterLab) and Running tab (Notebook 7).',
  autoStart: true,
  // optional: Notebook 7's notebook and editor pages have no Running view
  optional: [IRunningSessionManagers],
  activate: (app: JupyterFrontEnd, managers: IRunningSessionManagers | null): void => {
    if (!managers) {
      return;
    }
    const manager = new LiberTEMRunningManager({
      serverSettings: app.serviceManager.serverSettings,
      openGui: () => void app.commands.execute(OPEN_COMMAND)
    });
    managers.add(manager);
  }
};

// Frontend part of libertem-jupyter-proxy (JupyterLab 4 and Notebook 7):
//  - launcher.ts: launcher tile, File > New, palette, Notebook 7 "New" menu;
//  - running.ts: the LiberTEM section of the Running panel / Running tab.

import type { JupyterFrontEndPlugin } from '@jupyterlab/application';

import { launcherPlugin } from './launcher';
import { runningPlugin } from './running';

export { libertemIcon } from './icon';

const plugins: JupyterFrontEndPlugin<void>[] = [launcherPlugin, runningPlugin];

export default plugins;

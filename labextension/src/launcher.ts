// Entries that open the LiberTEM web GUI, which the server extension serves at
// {base_url}libertem/.
//
//  - JupyterLab: a launcher tile, File > New and command-palette entries.
//  - Notebook 7: a "LiberTEM" item in the file browser's "New" dropdown (tree page).
//
// By default every entry opens the GUI in a new browser tab; the `openIn` setting
// (schema/plugin.json) lets admins open it in a JupyterLab main-area tab instead.

import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import {
  ICommandPalette,
  MainAreaWidget,
  WidgetTracker
} from '@jupyterlab/apputils';
import { PageConfig } from '@jupyterlab/coreutils';
import { IDefaultFileBrowser } from '@jupyterlab/filebrowser';
import { ILauncher } from '@jupyterlab/launcher';
import { IMainMenu } from '@jupyterlab/mainmenu';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IFrame } from '@jupyterlab/ui-components';
import type { ReadonlyPartialJSONObject } from '@lumino/coreutils';
import { type Message, MessageLoop } from '@lumino/messaging';
import type { Menu, Widget } from '@lumino/widgets';

import { libertemIcon } from './icon';
import { guiUrl, OPEN_COMMAND } from './urls';

export const PLUGIN_ID = 'libertem-jupyter-proxy:plugin';
const LABEL = 'LiberTEM';

type OpenIn = 'browser-tab' | 'jupyterlab';

/** The Notebook 7 page ('tree', 'notebooks', 'edit', ...), or '' in JupyterLab. */
function notebookPage(): string {
  return PageConfig.getOption('notebookPage');
}

export const launcherPlugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'Launcher tile and New-menu entries for the LiberTEM web GUI.',
  autoStart: true,
  // Everything is optional, so one plugin serves JupyterLab and every Notebook 7 page.
  optional: [
    ISettingRegistry,
    ILauncher,
    IMainMenu,
    ICommandPalette,
    ILayoutRestorer,
    IDefaultFileBrowser
  ],
  activate
};

function activate(
  app: JupyterFrontEnd,
  settingRegistry: ISettingRegistry | null,
  launcher: ILauncher | null,
  mainMenu: IMainMenu | null,
  palette: ICommandPalette | null,
  restorer: ILayoutRestorer | null,
  fileBrowser: IDefaultFileBrowser | null
): void {
  // The default matches schema/plugin.json; the setting registry (user settings over
  // admin overrides) replaces it once loaded. The command waits for that, so a click
  // during page load cannot ignore an admin's choice.
  let openIn: OpenIn = 'browser-tab';
  const settingsLoaded: Promise<void> = settingRegistry
    ? settingRegistry
        .load(PLUGIN_ID)
        .then(settings => {
          const update = () => {
            openIn = settings.get('openIn').composite as OpenIn;
          };
          update();
          settings.changed.connect(update);
        })
        .catch(reason => {
          console.warn(`${PLUGIN_ID}: could not load settings, using defaults`, reason);
        })
    : Promise.resolve();

  // Notebook 7 has no dock panel to host a tab: always use a browser tab there.
  const canUseMainArea = !notebookPage();
  const tracker = new WidgetTracker<MainAreaWidget<IFrame>>({ namespace: 'libertem' });

  const openInMainArea = (): MainAreaWidget<IFrame> => {
    let widget = tracker.currentWidget;
    if (!widget || widget.isDisposed) {
      const content = new IFrame({
        // The GUI is a same-origin app that needs scripts, forms, downloads and
        // its own pop-ups; the IFrame default sandbox would block all of them.
        sandbox: [
          'allow-scripts',
          'allow-same-origin',
          'allow-forms',
          'allow-downloads',
          'allow-modals',
          'allow-popups'
        ],
        referrerPolicy: 'same-origin'
      });
      content.url = guiUrl();
      widget = new MainAreaWidget({ content });
      widget.id = 'libertem-gui';
      widget.addClass('jp-LiberTEM');
      widget.title.label = LABEL;
      widget.title.icon = libertemIcon;
      widget.title.closable = true;
      void tracker.add(widget);
    }
    if (!widget.isAttached) {
      app.shell.add(widget, 'main');
    }
    app.shell.activateById(widget.id);
    return widget;
  };

  app.commands.addCommand(OPEN_COMMAND, {
    label: LABEL,
    caption: 'Open the LiberTEM web GUI',
    icon: args => (args.isPalette ? undefined : libertemIcon),
    execute: async (args: ReadonlyPartialJSONObject) => {
      await settingsLoaded; // resolved long before any click, in practice
      const where = (args?.openIn as OpenIn | undefined) || openIn;
      if (where === 'jupyterlab' && canUseMainArea) {
        return openInMainArea();
      }
      // Still within the click's user activation, so pop-up blockers allow it.
      // 'noopener': the GUI gets no handle on this Jupyter window.
      window.open(guiUrl(), '_blank', 'noopener');
    }
  });

  if (restorer && canUseMainArea) {
    void restorer.restore(tracker, {
      command: OPEN_COMMAND,
      args: () => ({ openIn: 'jupyterlab' }),
      name: () => 'libertem'
    });
  }

  if (launcher) {
    launcher.add({ command: OPEN_COMMAND, category: 'Other', rank: 1 });
  }
  if (mainMenu) {
    mainMenu.fileMenu.newMenu.addGroup([{ command: OPEN_COMMAND }], 40);
  }
  if (palette) {
    palette.addItem({ command: OPEN_COMMAND, category: LABEL });
  }
  if (notebookPage() === 'tree' && fileBrowser) {
    addToNotebookNewMenu(app, fileBrowser);
  }
}

/** Notebook 7's "New" dropdown is a MenuBar in the file browser toolbar (no token for it). */
function isMenuBar(widget: Widget): widget is Widget & { menus: ReadonlyArray<Menu> } {
  const menus = (widget as unknown as { menus?: unknown }).menus;
  return Array.isArray(menus) && menus.length > 0;
}

/**
 * Put a "LiberTEM" item into Notebook 7's file browser "New" dropdown.
 *
 * Notebook 7 exposes that menu through no token. Its tree plugin registers a
 * toolbar factory that wraps one long-lived Menu in a MenuBar, and the file
 * browser toolbar is filled from that factory only after all plugins have
 * activated. The tree plugin also clears the Menu and refills it whenever the
 * kernelspecs change. So: look for the MenuBar in the toolbar until it shows
 * up, then (re-)add our item after every kernelspecs change and, as a safety
 * net for any other rebuild, whenever the menu is about to render.
 */
function addToNotebookNewMenu(app: JupyterFrontEnd, fileBrowser: IDefaultFileBrowser): void {
  let menu: Menu | null = null;

  const ensureEntry = () => {
    if (!menu || menu.isDisposed) {
      return;
    }
    if (menu.items.some(item => item.command === OPEN_COMMAND)) {
      return;
    }
    menu.addItem({ type: 'separator' });
    menu.addItem({ command: OPEN_COMMAND });
  };

  const findMenu = (): Menu | null => {
    for (const widget of fileBrowser.toolbar.children()) {
      // Duck-typed MenuBar: the "New" dropdown is the toolbar's only one.
      if (isMenuBar(widget)) {
        return widget.menus[0];
      }
    }
    return null;
  };

  const attach = (found: Menu) => {
    menu = found;
    ensureEntry();
    // Menus render on 'update-request' (sent synchronously before opening);
    // a hook that runs first can restore our item before it is drawn.
    MessageLoop.installMessageHook(menu, (_handler: unknown, msg: Message) => {
      if (msg.type === 'update-request') {
        ensureEntry();
      }
      return true;
    });
    const specs = app.serviceManager.kernelspecs;
    if (specs) {
      // Slots run in connection order, and the tree plugin's slot (which
      // clears the menu) may come after ours: re-add once all have run.
      specs.specsChanged.connect(() => {
        void Promise.resolve().then(ensureEntry);
      });
    }
  };

  // Retry until the toolbar has been built (bounded, so a future Notebook
  // without this dropdown costs nothing but one warning).
  const started = Date.now();
  const poll = () => {
    const found = findMenu();
    if (found) {
      attach(found);
    } else if (Date.now() - started < 120000) {
      setTimeout(poll, 100);
    } else {
      console.warn(`${PLUGIN_ID}: Notebook "New" menu not found; no LiberTEM entry there`);
    }
  };
  poll();
}

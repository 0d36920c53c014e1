import { LabIcon } from '@jupyterlab/ui-components';

import iconSvgStr from '../style/icons/libertem.svg';

/** The LiberTEM logo, for the launcher tile, menus and the Running panel. */
export const libertemIcon = new LabIcon({
  name: 'libertem-jupyter-proxy:libertem',
  svgstr: iconSvgStr
});

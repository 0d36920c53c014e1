"""Fill LiberTEM's numba cache once, so the first analysis in the tests does not compile.

Run by tests/e2e/setup.sh with the LiberTEM environment's Python. A cold numba cache costs a
minute or more of compilation in the first dataset load and analysis (seen here: 60 s "warmup"
plus 38 s for the first sum of frames), which would make the end-to-end tests measure numba,
not the proxy. This does the same work the GUI triggers (libertem-server's own cache priming,
a sum of frames, a disk mask) on a tiny .npy file, with the inline executor.
"""

from __future__ import annotations

import os
import tempfile


def main() -> None:
    import numpy as np
    from libertem.api import Context
    from libertem.web.dataset import prime_numba_cache

    with tempfile.TemporaryDirectory(prefix="libertem-warm-") as d:
        path = os.path.join(d, "warm.npy")
        np.save(path, np.ones((4, 4, 32, 32), dtype=np.float32))
        ctx = Context.make_with("inline")
        try:
            ds = ctx.load("npy", path=path)
            prime_numba_cache(ds)
            ctx.run(ctx.create_sum_analysis(ds))
            ctx.run(ctx.create_disk_analysis(ds, cx=16, cy=16, r=8))
        finally:
            ctx.close()


if __name__ == "__main__":  # dask may re-import __main__
    main()

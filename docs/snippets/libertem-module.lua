-- Lmod module file <modulepath>/libertem/0.16.0.lua: LiberTEM in its own virtual environment.
help([[LiberTEM 0.16 (libertem-server and the Python package), for the LiberTEM GUI in Jupyter]])
whatis("Name: LiberTEM")
whatis("Version: 0.16.0")

local env = "@LIBERTEM_ENV@"
prepend_path("PATH", pathJoin(env, "bin"))
-- numba's compiled code, filled once at install time: without it the first analysis of every
-- new worker compiles for a minute. numba uses a cache directory only if it may write to it.
setenv("NUMBA_CACHE_DIR", "@NUMBA_CACHE_DIR@")

# The HPC test's jupyterhub_config.py (tests/hpc/conftest.py starts JupyterHub with it). It
# loads docs/snippets/jupyterhub_config_slurm.py (placeholders filled in) and
# docs/snippets/jupyterhub_config_single_node.py, then adds the test harness.
import os

c = get_config()  # noqa: F821
env = os.environ
# the site part and the one-machine part, as the docs show them (docs/snippets/)
load_subconfig(env["LTJP_HPC_SITE_CONFIG"])  # noqa: F821
load_subconfig(env["LTJP_HPC_SINGLE_NODE_CONFIG"])  # noqa: F821

# the test harness: fixed ports (the network namespace is the test's own), state files,
# a shared password for the test user, and an admin service for the REST API
c.JupyterHub.bind_url = "http://127.0.0.1:8000"
c.JupyterHub.hub_bind_url = "http://127.0.0.1:8081"
c.ConfigurableHTTPProxy.command = [env["LTJP_HPC_CHP"]]
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:8001"
state = env["LTJP_HPC_HUB_DIR"]
c.ConfigurableHTTPProxy.pid_file = f"{state}/chp.pid"
c.JupyterHub.pid_file = f"{state}/hub.pid"
c.JupyterHub.db_url = f"sqlite:///{state}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = f"{state}/cookie_secret"
c.JupyterHub.cleanup_servers = True

c.JupyterHub.authenticator_class = "dummy"
c.SharedPasswordAuthenticator.user_password = env["LTJP_HPC_PASSWORD"]
c.Authenticator.allowed_users = {env["LTJP_HPC_USER"]}
# a test-only admin service: starts and stops servers through the REST API
c.JupyterHub.services = [{"name": "hpc-test", "api_token": env["LTJP_HPC_SERVICE_TOKEN"]}]
c.JupyterHub.load_roles = [
    {
        "name": "hpc-test",
        "services": ["hpc-test"],
        "scopes": ["admin:users", "admin:servers", "tokens", "access:servers", "read:users"],
    }
]

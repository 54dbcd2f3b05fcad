"""Reaching the Hugging Face hub: a model name or a GLUE task that needs it fails in seconds where it is out of
reach, naming the offline alternatives."""

import socket
import urllib.parse
import urllib.request

from ..errors import UserError, first_line


def require_hub(what: str, offline_alternative: str) -> None:
    """Fail in seconds where the Hugging Face hub cannot be reached: the libraries would otherwise retry for up to a
    minute, then raise a long chain of tracebacks. With HF_HUB_OFFLINE=1 they read the local cache only."""
    import huggingface_hub.constants

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return
    endpoint = urllib.parse.urlsplit(huggingface_hub.constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    if proxy and not urllib.request.proxy_bypass(endpoint.hostname):
        endpoint = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")  # the hop that must answer
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=3).close()
    except OSError as error:
        raise UserError(
            f"{what} needs the Hugging Face hub, and {endpoint.hostname}:{port} cannot be reached "
            f"({first_line(error)}): "
            f"check the network, or set HF_HUB_OFFLINE=1 to use a copy in the local cache, or {offline_alternative}"
        ) from error

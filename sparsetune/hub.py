"""Is the HF hub reachable? Asked once per process, with a short timeout; if not, the rest of the run is offline.

Without this, every dataset or model load on a machine with no network retries on its own (huggingface_hub backs
off five times per request), and a run spends minutes in retry storms before each fallback. One probe decides for
the whole process: when the hub does not answer, the `HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE` behaviour is
switched on, so the libraries go straight to their local caches (and our loaders to their fallbacks).

huggingface_hub and datasets read those variables once, at import, into module constants
(`huggingface_hub.constants.HF_HUB_OFFLINE`, `datasets.config.HF_HUB_OFFLINE`), which their request paths
consult on every call; transformers asks huggingface_hub's `is_offline_mode()`. So going offline sets the
environment (for modules not imported yet and for child processes) and the constants of modules already imported.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
TIMEOUT_ENV = "SPARSETUNE_HUB_TIMEOUT"
DEFAULT_TIMEOUT_S = 3.0
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's and datasets' reading of boolean env vars

# The one answer of this process: None until asked.
_reachable: bool | None = None


def endpoint() -> str:
    """The hub the libraries will talk to (`HF_ENDPOINT`, as huggingface_hub reads it)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline_requested() -> bool:
    """True when the user asked for offline mode for the hub (HF_HUB_OFFLINE, or its older alias)."""
    return any(os.environ.get(name, "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def probe_timeout() -> float:
    try:
        return max(0.05, float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    except ValueError:
        return DEFAULT_TIMEOUT_S


def hub_reachable() -> bool:
    """Whether the hub answers, decided once per process; an unreachable hub switches offline mode on."""
    global _reachable
    if _reachable is None:
        # Offline by request: the libraries read that at import already, so there is nothing to probe or switch.
        _reachable = False if offline_requested() else _probe()
    return _reachable


def _probe() -> bool:
    url = endpoint()
    timeout = probe_timeout()
    t0 = time.perf_counter()
    error = _head(url, timeout)
    if error is None:
        log.debug("hub %s reachable (%.2f s)", url, time.perf_counter() - t0)
        return True
    log.warning(
        "hub %s unreachable (%s, %.1f s); working offline for the rest of this run (local caches, mirrors and "
        "the embedded samples only)",
        url,
        error,
        time.perf_counter() - t0,
    )
    go_offline()
    return False


def _head(url: str, timeout: float) -> str | None:
    """One HEAD request, no retries: None when any HTTP answer comes back, else why not.

    urllib (not the hub client) because the point is a single bounded attempt; it honours the usual proxy
    variables (HTTPS_PROXY, NO_PROXY) like the hub client does. A 4xx/5xx answer still means the host is there.
    """
    import urllib.error
    import urllib.request

    if urlsplit(url).scheme not in ("http", "https"):
        return f"HF_ENDPOINT {url!r} is not an http(s) URL"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__


def go_offline() -> None:
    """Switch the HF libraries to offline mode for this process (and its children)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
        datasets_config.HF_DATASETS_OFFLINE = True

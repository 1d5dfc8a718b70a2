"""The idle culler service's entry point (``python -m medzone_hub.culler_service``): reads
:class:`medzone_hub.culling.IdleCuller`'s settings from the hub config and becomes
``jupyterhub_idle_culler`` with them (see :mod:`medzone_hub.culling`)."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .culling import IdleCuller
from .errors import MedZoneError
from .hubconfig import load_hub_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m medzone_hub.culler_service")
    parser.add_argument("--hub-config", required=True)
    parser.add_argument("--api-url", required=True)
    args = parser.parse_args(argv)
    try:
        culler = IdleCuller(config=load_hub_config(args.hub_config))
    except MedZoneError as err:
        sys.exit(f"medzone-idle-culler: {err}")
    if not culler.enabled:
        # Switched off after the service was declared: stay up (the hub would restart an
        # exited service) and cull nothing.
        print("medzone-idle-culler: c.IdleCuller.enabled is False: culling nothing",
              file=sys.stderr, flush=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
        return
    print(f"medzone-idle-culler: timeout {culler.timeout} s, every {culler.cull_every} s, "
          f"max age {culler.max_age or 'none'}", file=sys.stderr, flush=True)
    python = sys.executable
    os.execv(python, [python, "-m", "jupyterhub_idle_culler", *culler.culler_args(args.api_url)])


if __name__ == "__main__":
    main()

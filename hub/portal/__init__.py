"""The MedZone portal: web pages for applicants, data stewards and export reviewers.

A Tornado application that JupyterHub runs as a hub-managed service
(``/services/medzone-portal/``, see the portal block of ``hub/jupyterhub_config.py``).
People reach it from the hub's home page and are logged in through the hub (OAuth).

It is a face, like the CLI: each page reads the store and calls the same service
functions (:mod:`medzone_hub.access`, :mod:`medzone_hub.runner`, :mod:`medzone_hub.airlock`,
:mod:`medzone_hub.audit`, :func:`medzone_hub.accounts.decide_account`), which keep every
rule. What the portal adds is which pages a person sees (:mod:`medzone_hub.portal.roles`),
read from the same store roles the service functions check.
"""

from importlib import resources

#: The service's name in ``c.JupyterHub.services``; its pages live under ``/services/<name>/``.
SERVICE_NAME = "medzone-portal"

#: Templates added to the hub's own (its home page links to the portal).
HUB_TEMPLATES = str(resources.files(__name__) / "hub_templates")

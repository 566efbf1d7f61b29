"""Deployments: a router over several handles and a cascade of models.

``fanflow.router(...)`` and ``fanflow.cascade(...)`` make them; this module holds the
names a user may want beyond those: the handle classes, a cascade's ready ``accept``
(:func:`agreement`, vote's confidence), what a record says answered
(``CallRecord.deployment``), and the error of an item every deployment failed.
"""

from __future__ import annotations

from ._exceptions import DeploymentsFailed
from ._router import FAILING_AFTER, Router
from ._types import Deployment
from .patterns._cascade import Agreement, Cascade, agreement

__all__ = [
    "FAILING_AFTER",
    "Agreement",
    "Cascade",
    "Deployment",
    "DeploymentsFailed",
    "Router",
    "agreement",
]

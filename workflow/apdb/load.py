"""The APDB load of one detector-visit: associate, store once, then send the alerts.

`associate_store_alert` joins the wing's parts in the order that keeps a retry
safe (see its docstring): association (`workflow.apdb.association`), the one store
(`workflow.apdb.store`), the alerts (`workflow.apdb.alerts`) through the outbox
(`workflow.apdb.outbox`).
"""

from __future__ import annotations

__all__ = ["DetectorVisitResult", "associate_store_alert"]

import dataclasses
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from workflow.apdb.alerts import build_alerts
from workflow.apdb.association import AssociationResult, associate
from workflow.apdb.store import Preload, StoreOutcome, store_detector_visit

if TYPE_CHECKING:
    import astropy.time
    import pandas as pd
    from lsst.dax.apdb import Apdb

    from workflow.apdb.alerts import AlertSink, AlertSummary, CutoutMaker
    from workflow.apdb.outbox import AlertOutbox

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DetectorVisitResult:
    """What `associate_store_alert` did: association counts, store outcome, alert summary.

    ``alerts`` is `None` when nothing was sent (no sink, or the store was skipped).
    """

    association: AssociationResult
    store: StoreOutcome
    alerts: AlertSummary | None


def associate_store_alert(
    apdb: Apdb,
    dia_sources: pd.DataFrame,
    preloaded: Preload,
    *,
    visit: int,
    detector: int,
    visit_time: astropy.time.Time,
    radius_arcsec: float,
    sink: AlertSink | None = None,
    cutouts: Mapping[str, CutoutMaker] | None = None,
    outbox: AlertOutbox | None = None,
) -> DetectorVisitResult:
    """Associate, store once, then send the alerts.

    Order: associate and build the alerts (input errors surface before anything
    is written), check the alert sink (a broker that is down fails the job before
    the APDB changes, so a retry redoes everything), put the alerts in the outbox,
    store, send.  A rerun of a stored detector-visit stores nothing; it sends the
    outbox's alerts if an earlier attempt stored but never finished sending them
    (at least once), nothing if they were sent.  Without an outbox, alerts are
    sent only when this call stored (at most once).

    Parameters
    ----------
    apdb : `lsst.dax.apdb.Apdb`
        Opened APDB (`workflow.apdb.store.open_apdb`).
    dia_sources : `pandas.DataFrame`
        The detector-visit's DiaSources.
    preloaded : `workflow.apdb.store.Preload`
        Preloaded objects and sources (`workflow.apdb.store.preload` / `load_preload`).
    visit, detector : `int`
        The detector-visit.
    visit_time : `astropy.time.Time`
        Visit time.
    radius_arcsec : `float`
        Association radius (``apdb.association_radius_arcsec``).
    sink : `workflow.apdb.alerts.AlertSink`, optional
        Where alerts go (`workflow.apdb.alerts.make_alert_sink`); `None`: no alerts.
    cutouts : `~collections.abc.Mapping` [`str`, `workflow.apdb.alerts.CutoutMaker`], optional
        Stamp makers for the ``difference``, ``science``, ``template`` images.
    outbox : `workflow.apdb.outbox.AlertOutbox`, optional
        The detector-visit's outbox (see that module).

    Returns
    -------
    result : `DetectorVisitResult`

    Raises
    ------
    InvalidDiaSourceTable
        Bad input table (non-retriable); nothing written or sent.
    workflow.apdb.store.ApdbUnavailableError, workflow.apdb.alerts.AlertDeliveryError
        Database or broker down (retriable).
    """
    mjd = float(visit_time.tai.mjd)
    result = associate(
        dia_sources,
        preloaded.objects,
        preloaded.sources,
        visit=visit,
        detector=detector,
        radius_arcsec=radius_arcsec,
        visit_mjd_tai=mjd,
    )
    alerts = None
    if sink is not None:
        alerts = build_alerts(
            result.sources,
            result.objects,
            preloaded.sources,
            cutouts=cutouts,
            visit_mjd_tai=mjd,
            schema=getattr(sink, "schema", None),  # the fields of the schema the sink writes
        )
        sink.check()
        if outbox is not None:
            alerts = outbox.prepare(alerts)
    outcome = store_detector_visit(apdb, visit_time, result.objects, result.sources, visit=visit, detector=detector)
    summary = None
    if alerts is not None and (outcome.stored or outbox is not None):  # alerts: None without a sink, or if sent
        assert sink is not None  # alerts are only built with a sink
        summary = sink.send(alerts, visit=visit, detector=detector)
        if outbox is not None:
            outbox.mark_sent()
    elif sink is not None:
        why = "already sent" if outbox is not None else outcome.reason
        _log.warning("visit %d detector %d: no alerts sent (%s)", visit, detector, why)
    return DetectorVisitResult(association=result, store=outcome, alerts=summary)

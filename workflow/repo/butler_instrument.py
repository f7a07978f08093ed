"""The instrument classes named by the Butler ``instrument`` records we register.

A Butler ``instrument`` record's ``class_name`` is the full name of a Python class
that tools import to learn about the instrument: ``daf_butler`` imports it with
``doImportType`` when an export YAML needs a day_obs offset
(``instrument_class.translatorClass.observing_date_to_offset(date)``), and
``pipe_base``'s ``Instrument.from_string`` imports and instantiates it (with
``collection_prefix``).  Rubin records ``lsst.obs.lsst.LsstComCamSim`` and the
like; this project has no obs_lsst, so its records name the small classes here
(`class_name_for`), which import without anything but astropy and answer the
questions those tools ask: the name, the day_obs offset, the collection names.
"""

from __future__ import annotations

__all__ = [
    "PromptSnakeInstrument",
    "HSC",
    "LATISS",
    "LSSTCam",
    "LSSTCamImSim",
    "LSSTComCam",
    "LSSTComCamSim",
    "INSTRUMENT_CLASSES",
    "class_name_for",
]

import datetime
from typing import ClassVar

from astropy.time import Time, TimeDelta


class _Translator:
    """The part of an ``astro_metadata_translator`` translator daf_butler calls."""

    day_obs_offset_s: ClassVar[float] = 12 * 3600.0

    @classmethod
    def observing_date_to_offset(cls, observing_date: Time) -> TimeDelta:
        """Return the offset subtracted from TAI to get day_obs: 12 h, as `workflow.core.visit` uses."""
        return TimeDelta(cls.day_obs_offset_s, format="sec")


class PromptSnakeInstrument:
    """Base of the instrument classes: name, day_obs offset and collection names.

    Method names are camelCase where they are ``pipe_base``'s ``Instrument`` API.

    Parameters
    ----------
    collection_prefix : `str`, optional
        Prefix of the collection names (default: the instrument name), as
        ``pipe_base``'s ``Instrument`` takes it.
    """

    name: ClassVar[str] = ""
    translatorClass: ClassVar[type[_Translator]] = _Translator  # camelCase: the name daf_butler looks up

    def __init__(self, collection_prefix: str | None = None) -> None:
        self.collection_prefix = collection_prefix or self.getName()

    @classmethod
    def getName(cls) -> str:
        """Return the instrument name (the Butler ``instrument`` dimension value)."""
        return cls.name

    def makeCollectionName(self, *labels: str) -> str:
        """Return ``<prefix>/<label>/...``."""
        return "/".join((self.collection_prefix, *labels))

    def makeCalibrationCollectionName(self, *labels: str) -> str:
        """Return the calibration collection name (``<prefix>/calib``)."""
        return self.makeCollectionName("calib", *labels)

    def makeDefaultRawIngestRunName(self) -> str:
        """Return the RUN the raws are ingested into (``<prefix>/raw/all``)."""
        return self.makeCollectionName("raw", "all")

    def makeUmbrellaCollectionName(self) -> str:
        """Return the CHAINED collection of all inputs (``<prefix>/defaults``)."""
        return self.makeCollectionName("defaults")

    def day_obs(self, when: Time) -> datetime.date:
        """Return the observing day of a time (TAI minus the offset)."""
        moment = when.tai - self.translatorClass.observing_date_to_offset(when)
        return datetime.date.fromisoformat(moment.isot[:10])


class HSC(PromptSnakeInstrument):
    """Hyper Suprime-Cam (Subaru)."""

    name = "HSC"


class LATISS(PromptSnakeInstrument):
    """LATISS, the Auxiliary Telescope imager."""

    name = "LATISS"


class LSSTCam(PromptSnakeInstrument):
    """LSSTCam, the Rubin science camera."""

    name = "LSSTCam"


class LSSTCamImSim(PromptSnakeInstrument):
    """The DESC DC2 simulated LSSTCam."""

    name = "LSSTCam-imSim"


class LSSTComCam(PromptSnakeInstrument):
    """LSSTComCam, the Commissioning Camera."""

    name = "LSSTComCam"


class LSSTComCamSim(PromptSnakeInstrument):
    """The simulated Commissioning Camera."""

    name = "LSSTComCamSim"


INSTRUMENT_CLASSES: dict[str, type[PromptSnakeInstrument]] = {
    cls.name: cls for cls in (HSC, LATISS, LSSTCam, LSSTCamImSim, LSSTComCam, LSSTComCamSim)
}
"""Instrument name -> its class."""


def class_name_for(instrument: str) -> str:
    """Return the importable class name to record for an instrument.

    Parameters
    ----------
    instrument : `str`
        Instrument name.

    Returns
    -------
    class_name : `str`
        ``workflow.repo.butler_instrument.<Class>``; an instrument without a class
        of its own (a test's) gets the base class, which imports as well.
    """
    cls = INSTRUMENT_CLASSES.get(instrument, PromptSnakeInstrument)
    return f"{cls.__module__}.{cls.__qualname__}"

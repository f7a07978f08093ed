"""Pipeline step registry, fallback runner and per-visit pipeline selection.

A pipeline is a named, ordered list of step names (``pipeline_definitions`` in
``config/pipelines.yaml``).  `run_pipelines` tries the pipelines chosen for a
visit in order; when a step fails for a data reason (a `ScienceDataError`
such as `NoTemplateError` or `TooFewStarsError`) it records why and moves to
the next pipeline, reusing the outputs of steps already run with the same
prefix (so SingleFrame after a failed ApPipe does not redo ISR and
calibration).  Each step's wall and CPU seconds are recorded and logged at
DEBUG on ``timer.<module>`` (e.g. ``timer.workflow.science.isr``).
"""

from __future__ import annotations

__all__ = [
    "STEPS",
    "ProcessingInputs",
    "StepTiming",
    "PipelineAttempt",
    "PipelineRun",
    "NoPipelineRanError",
    "validate_definitions",
    "run_pipelines",
    "select_pipelines",
]

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from astropy.wcs import WCS

from workflow.core.exceptions import ConfigError, NonRetriableError
from workflow.science.calibrate import calibrate
from workflow.science.dia_sources import detect_dia_sources
from workflow.science.errors import NumericalFailureError, ScienceDataError
from workflow.science.isr import AmpGeometry, Box, run_isr
from workflow.science.subtract import subtract_images
from workflow.science.template_warp import TemplatePatch, warp_template

_log = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class ProcessingInputs:
    """Everything the science steps of one detector-visit may need.

    Attributes
    ----------
    raws : sequence
        One entry per snap: a raw array, or one array per amplifier.
    amps : sequence of `workflow.science.isr.AmpGeometry`
        Amplifier geometry.
    visit, detector : `int`
        Ids of the detector-visit.
    band : `str`
        Band name.
    midpoint_mjd_tai : `float`
        Mid-exposure time.
    wcs_guess : `astropy.wcs.WCS`
        WCS predicted from the pointing.
    exposure_time : `float`, optional
        Seconds.
    bias, flat : `numpy.ndarray`, optional
        Master calibrations (detector shape).
    bad_columns : sequence of `int`, optional
        Known bad columns (whole columns).
    defects : sequence of `workflow.science.isr.Box`, optional
        Known defect boxes (assembled pixels).
    refcat : `pandas.DataFrame`, optional
        Reference catalogue (``ra``, ``dec``, ``<band>_flux``).
    templates : sequence of `workflow.science.template_warp.TemplatePatch`
        Template patches overlapping the detector.
    options : mapping
        Extra keyword arguments per step name.
    """

    raws: Sequence[Any]
    amps: Sequence[AmpGeometry]
    visit: int
    detector: int
    band: str
    midpoint_mjd_tai: float
    wcs_guess: WCS
    exposure_time: float | None = None
    bias: Any = None
    flat: Any = None
    bad_columns: Sequence[int] | None = None
    defects: Sequence[Box] | None = None
    refcat: pd.DataFrame | None = None
    templates: Sequence[TemplatePatch] = ()
    options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


def _opts(inputs: ProcessingInputs, step: str) -> dict[str, Any]:
    return dict(inputs.options.get(step, {}))


def _step_isr(inputs: ProcessingInputs, state: Mapping[str, Any]) -> dict[str, Any]:
    exposure = run_isr(
        inputs.raws,
        inputs.amps,
        bias=inputs.bias,
        flat=inputs.flat,
        bad_columns=inputs.bad_columns,
        defects=inputs.defects,
        **_opts(inputs, "isr"),
    )
    exposure.wcs = inputs.wcs_guess
    header = exposure.metadata
    header["VISIT"], header["DETECTOR"], header["BAND"] = inputs.visit, inputs.detector, inputs.band
    header["MJD-MID"] = (inputs.midpoint_mjd_tai, "mid-exposure MJD, TAI")
    if inputs.exposure_time is not None:
        header["EXPTIME"] = (inputs.exposure_time, "exposure time, s")
    return {"post_isr": exposure}


def _step_calibrate(inputs: ProcessingInputs, state: Mapping[str, Any]) -> dict[str, Any]:
    options = _opts(inputs, "calibrate")
    result = calibrate(state["post_isr"], inputs.refcat, inputs.wcs_guess, band=inputs.band, **options)
    return {"calexp": result.exposure, "sources": result.sources}


def _step_warp(inputs: ProcessingInputs, state: Mapping[str, Any]) -> dict[str, Any]:
    calexp = state["calexp"]
    options = _opts(inputs, "warp_template")
    return {"template": warp_template(inputs.templates, calexp.wcs, calexp.shape, **options)}


def _step_subtract(inputs: ProcessingInputs, state: Mapping[str, Any]) -> dict[str, Any]:
    options = _opts(inputs, "subtract_images")
    result = subtract_images(state["calexp"], state["template"], stars=state["sources"], **options)
    return {"difference": result.difference}


def _step_detect(inputs: ProcessingInputs, state: Mapping[str, Any]) -> dict[str, Any]:
    table = detect_dia_sources(
        state["difference"],
        visit=inputs.visit,
        detector=inputs.detector,
        band=inputs.band,
        midpoint_mjd_tai=inputs.midpoint_mjd_tai,
        exposure_time=inputs.exposure_time,
        science=state["calexp"],
        **_opts(inputs, "detect_dia_sources"),
    )
    return {"dia_sources": table}


@dataclasses.dataclass(frozen=True)
class _Step:
    function: Callable[[ProcessingInputs, Mapping[str, Any]], dict[str, Any]]
    module: str


STEPS: dict[str, _Step] = {
    "isr": _Step(_step_isr, "workflow.science.isr"),
    "calibrate": _Step(_step_calibrate, "workflow.science.calibrate"),
    "warp_template": _Step(_step_warp, "workflow.science.template_warp"),
    "subtract_images": _Step(_step_subtract, "workflow.science.subtract"),
    "detect_dia_sources": _Step(_step_detect, "workflow.science.dia_sources"),
}
"""Step name -> implementation; names match ``pipeline_definitions``."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepTiming:
    """Wall and CPU time of one step as run for one pipeline (``reused``: 0 s, earlier result)."""

    pipeline: str
    step: str
    wall_s: float
    cpu_s: float
    reused: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineAttempt:
    """What happened to one candidate pipeline.

    ``status`` is ``"succeeded"``, ``"failed"`` (``step``, ``error`` and
    ``reason`` say why) or ``"not_run"`` (an earlier pipeline succeeded).
    """

    pipeline: str
    status: str
    step: str | None = None
    error: str | None = None
    reason: str | None = None


@dataclasses.dataclass(kw_only=True)
class PipelineRun:
    """Outcome of `run_pipelines`: which pipeline ran, why others did not, timings, outputs."""

    pipeline: str | None
    attempts: list[PipelineAttempt]
    timings: list[StepTiming]
    outputs: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Return the run's metadata (no pixel outputs) as JSON-friendly data."""
        return {
            "pipeline": self.pipeline,
            "attempts": [dataclasses.asdict(a) for a in self.attempts],
            "timings": [dataclasses.asdict(t) for t in self.timings],
            "outputs": sorted(self.outputs),
        }


class NoPipelineRanError(NonRetriableError, RuntimeError):
    """Every candidate pipeline failed; the message lists each reason."""


def validate_definitions(names: Sequence[str], definitions: Mapping[str, Sequence[str]]) -> None:
    """Check that every named pipeline is defined and uses only known steps.

    Raises
    ------
    ConfigError
        Naming the unknown pipeline or step.
    """
    for name in names:
        if name not in definitions:
            known = ", ".join(sorted(definitions))
            raise ConfigError(f"pipeline {name!r} is not in pipeline_definitions ({known})")
        unknown = [step for step in definitions[name] if step not in STEPS]
        if unknown:
            known = ", ".join(STEPS)
            raise ConfigError(f"pipeline {name!r} uses unknown step(s) {', '.join(unknown)}; known: {known}")


def _run_step(
    name: str, pipeline: str, inputs: ProcessingInputs, state: Mapping[str, Any], timings: list[StepTiming]
) -> dict[str, Any]:
    """Run one step, appending its `StepTiming` (also on failure) and logging it.

    A `numpy.linalg.LinAlgError` escaping the step becomes a `NumericalFailureError`
    (a `ScienceDataError` naming the step), so the fallback logic handles it.
    """
    step = STEPS[name]
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        return step.function(inputs, state)
    except np.linalg.LinAlgError as exc:  # a safety net: steps raise their own ScienceDataErrors
        raise NumericalFailureError(name, f"numerical failure ({exc})") from exc
    finally:
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        timing = StepTiming(pipeline=pipeline, step=name, wall_s=wall, cpu_s=cpu)
        timings.append(timing)
        logging.getLogger(f"timer.{step.module}").debug(
            "%s (%s): wall %.3f s, cpu %.3f s", name, pipeline, timing.wall_s, timing.cpu_s
        )


def _run_one(
    pipeline: str,
    steps: Sequence[str],
    inputs: ProcessingInputs,
    cache: dict[tuple[str, ...], Any],
    timings: list[StepTiming],
) -> dict[str, Any]:
    """Run the steps of one pipeline, reusing cached prefix results; raise on failure."""
    state: dict[str, Any] = {}
    for i, name in enumerate(steps):
        key = tuple(steps[: i + 1])
        cached = cache.get(key)
        if cached is None:
            try:
                cached = _run_step(name, pipeline, inputs, state, timings)
            except ScienceDataError as exc:
                cached = exc
            cache[key] = cached
        else:
            timings.append(StepTiming(pipeline=pipeline, step=name, wall_s=0.0, cpu_s=0.0, reused=True))
        if isinstance(cached, ScienceDataError):
            raise cached
        state.update(cached)
    return state


def run_pipelines(
    names: Sequence[str], definitions: Mapping[str, Sequence[str]], inputs: ProcessingInputs
) -> PipelineRun:
    """Run the first pipeline of ``names`` that succeeds, falling back on data errors.

    Parameters
    ----------
    names : sequence of `str`
        Candidate pipelines in order of preference (from `select_pipelines`).
        Empty: nothing runs (the visit is ignored).
    definitions : mapping
        ``pipeline_definitions``: pipeline name -> ordered step names.
    inputs : `ProcessingInputs`
        Data of the detector-visit.

    Returns
    -------
    run : `PipelineRun`
        The pipeline that ran, every attempt with its reason, step timings and
        the outputs of the successful pipeline (``post_isr``, ``calexp``,
        ``sources``, ``template``, ``difference``, ``dia_sources`` as produced).

    Raises
    ------
    ConfigError
        If a pipeline or step name is unknown.
    NoPipelineRanError
        If every candidate failed for a data reason (chained from the last error).
    """
    validate_definitions(names, definitions)
    cache: dict[tuple[str, ...], Any] = {}
    attempts: list[PipelineAttempt] = []
    timings: list[StepTiming] = []
    last_error: ScienceDataError | None = None
    for index, name in enumerate(names):
        try:
            outputs = _run_one(name, definitions[name], inputs, cache, timings)
        except ScienceDataError as exc:
            last_error = exc
            _log.warning("Pipeline %s could not run: %s", name, exc)
            attempt = PipelineAttempt(
                pipeline=name, status="failed", step=exc.step, error=type(exc).__name__, reason=str(exc)
            )
            attempts.append(attempt)
            continue
        attempts.append(PipelineAttempt(pipeline=name, status="succeeded"))
        attempts += [
            PipelineAttempt(pipeline=other, status="not_run", reason=f"{name} succeeded")
            for other in names[index + 1 :]
        ]
        _log.info("Pipeline %s succeeded for visit %s detector %s", name, inputs.visit, inputs.detector)
        return PipelineRun(pipeline=name, attempts=attempts, timings=timings, outputs=outputs)
    if not names:
        _log.info("No pipeline configured for visit %s detector %s; ignored", inputs.visit, inputs.detector)
        return PipelineRun(pipeline=None, attempts=[], timings=[], outputs={})
    summary = "; ".join(f"{a.pipeline}: {a.reason}" for a in attempts)
    message = f"no pipeline could run for visit {inputs.visit} detector {inputs.detector}: {summary}"
    raise NoPipelineRanError(message) from last_error


def _in_range(value: float, bounds: Sequence[float] | None, wrap: bool = False) -> bool:
    """Return whether ``value`` lies in ``[min, max]``; for RA, min > max wraps through 0."""
    if bounds is None:
        return True
    low, high = float(bounds[0]), float(bounds[1])
    if not wrap:
        return low <= value <= high
    value %= 360.0
    if low > high:
        return value >= low % 360.0 or value <= high % 360.0
    return any(low <= v <= high for v in (value, value - 360.0, value + 360.0))


def select_pipelines(nodes: Sequence[Mapping[str, Any]], *, survey: str, ra: float, dec: float) -> list[str]:
    """Return the pipelines configured for a visit (first matching node wins).

    Parameters
    ----------
    nodes : sequence of mapping
        The config's ``pipelines`` list: each node has optional ``survey``,
        ``ra`` ``[min, max]`` (wrapping through 0 when min > max), ``dec``
        ``[min, max]``, and a ``pipelines`` list.
    survey : `str`
        Survey of the visit.
    ra, dec : `float`
        Pointing in degrees.

    Returns
    -------
    pipelines : `list` [`str`]
        Pipeline names in order; empty if the matching node's list is empty
        (ignore the visit) or no node matches.
    """
    for node in nodes:
        if "survey" in node and node["survey"] != survey:
            continue
        if _in_range(ra, node.get("ra"), wrap=True) and _in_range(dec, node.get("dec")):
            return list(node["pipelines"])
    _log.info("No pipelines node matches survey %r at (%.4f, %.4f)", survey, ra, dec)
    return []
